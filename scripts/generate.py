"""Sample text from a trained checkpoint.

The command lives in moe_gpt/cli/generate.py (also installed as ``moe-gpt-generate``); ``--help`` lists its options.
"""

from moe_gpt.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
