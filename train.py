"""Train a GPT-2 with dense or Mixture-of-Experts feed-forward blocks: ``python train.py --help``.

The command lives in moe_gpt/cli/train.py (also installed as ``moe-gpt-train``).
"""

from moe_gpt.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
