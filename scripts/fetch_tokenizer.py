"""Setup step: put GPT-2's BPE ranks in data/tokenizer/gpt2.tiktoken so training works offline.

The command lives in moe_gpt/cli/fetch_tokenizer.py (also installed as ``moe-gpt-fetch-tokenizer``); ``--help`` lists its options.
"""

from moe_gpt.cli.fetch_tokenizer import main

if __name__ == "__main__":
    raise SystemExit(main())
