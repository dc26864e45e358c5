"""moe-gpt: a GPT-2 whose blocks switch their feed-forward network between a dense MLP and an MoE layer.

Which file answers what: see the Layout table in README.md. Importing the package changes
nothing outside it; entry points tune the CPU allocator themselves (moe_gpt/training/cpu_memory.py).
"""
