"""Time full training steps of a composed config against the memory settings that speed them up.

The command lives in moe_gpt/cli/bench_train_step.py (also installed as ``moe-gpt-bench-train-step``); ``--help`` lists its options.
"""

from moe_gpt.cli.bench_train_step import main

if __name__ == "__main__":
    raise SystemExit(main())
