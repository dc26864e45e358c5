"""Drop the least-used experts of an MoE checkpoint and write the smaller model as a new checkpoint.

The command lives in moe_gpt/cli/prune_experts.py (also installed as ``moe-gpt-prune-experts``); ``--help`` lists its options.
"""

from moe_gpt.cli.prune_experts import main

if __name__ == "__main__":
    raise SystemExit(main())
