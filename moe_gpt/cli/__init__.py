"""The command-line entry points: each module's ``main(argv)`` is one command (train.py and scripts/*.py call them)."""
