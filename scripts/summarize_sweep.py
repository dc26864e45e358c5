"""Summarise a Hydra sweep of train.py: one row per job as Markdown and CSV, and two plots.

The command lives in moe_gpt/cli/summarize_sweep.py (also installed as ``moe-gpt-summarize-sweep``); ``--help`` lists its options.
"""

from moe_gpt.cli.summarize_sweep import main

if __name__ == "__main__":
    raise SystemExit(main())
