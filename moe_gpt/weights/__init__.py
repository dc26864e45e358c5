"""Weights from elsewhere: safe checkpoint reading, Hugging Face import/export, upcycling, growth, pruning, init_from."""
