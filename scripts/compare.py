"""Dense vs MoE on equal terms: the same data and seeds, matched parameters, equal tokens or equal time.

The command lives in moe_gpt/cli/compare.py (also installed as ``moe-gpt-compare``); ``--help`` lists its options.
"""

from moe_gpt.cli.compare import main

if __name__ == "__main__":
    raise SystemExit(main())
