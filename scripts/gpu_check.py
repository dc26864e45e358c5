"""Check the GPU path in one command (``make gpu-check``): the expert operator's accuracy, GPT-2 small dense and
MoE training speed, FSDP2, and that the loss falls; a tiny version of the same on a CPU.

The command lives in moe_gpt/cli/gpu_check.py (also installed as ``moe-gpt-gpu-check``); ``--help`` lists its options.
"""

from moe_gpt.cli.gpu_check import main

if __name__ == "__main__":
    raise SystemExit(main())
