"""Analysis from the command line: what a config costs, and how a checkpoint routes a text.

The command lives in moe_gpt/cli/analyze.py (also installed as ``moe-gpt-analyze``); ``--help`` lists its options.
"""

from moe_gpt.cli.analyze import main

if __name__ == "__main__":
    raise SystemExit(main())
