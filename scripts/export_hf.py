"""Export a dense training checkpoint as a Hugging Face GPT-2 (``GPT2LMHeadModel.from_pretrained`` loads it).

The command lives in moe_gpt/cli/export_hf.py (also installed as ``moe-gpt-export-hf``); ``--help`` lists its options.
"""

from moe_gpt.cli.export_hf import main

if __name__ == "__main__":
    raise SystemExit(main())
