"""Time the MoE layer's forward + backward against a dense FFN of equal active FLOPs, in one run.

The command lives in moe_gpt/cli/bench_moe.py (also installed as ``moe-gpt-bench-moe``); ``--help`` lists its options.
"""

from moe_gpt.cli.bench_moe import main

if __name__ == "__main__":
    raise SystemExit(main())
