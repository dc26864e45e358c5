"""Downstream evaluation of a checkpoint through lm-evaluation-harness.

The command lives in moe_gpt/cli/evaluate.py (also installed as ``moe-gpt-evaluate``); ``--help`` lists its options.
"""

from moe_gpt.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
