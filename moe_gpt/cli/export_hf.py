"""Export a dense training checkpoint as a Hugging Face GPT-2 (``GPT2LMHeadModel.from_pretrained`` loads it),
with GPT-2's tokenizer (``AutoTokenizer.from_pretrained`` loads it).

    python scripts/export_hf.py --checkpoint outputs/dense/<run>/checkpoints/best.ckpt --out exports/my-gpt2
    python scripts/export_hf.py --checkpoint path/to/last.ckpt --out exports/my-gpt2 --overwrite

MoE checkpoints have no HF GPT-2 equivalent and are refused. A non-empty --out is refused
unless --overwrite is given.
"""

from __future__ import annotations

from pathlib import Path

from moe_gpt.config import project_path
from moe_gpt.cli.common import ArgumentParser, entry_point


@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description="Export a dense moe-gpt checkpoint in Hugging Face GPT-2 format.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt from a dense run's checkpoints/ folder")
    parser.add_argument("--out", required=True, help="directory to write config.json and model.safetensors into")
    parser.add_argument("--overwrite", action="store_true", help="write into --out even if it holds files")
    parser.add_argument("--tokenizer-dir", default="data/tokenizer", help="relative paths count from the project root")
    args = parser.parse_args(argv)
    # Imported once the command line is parsed (torch takes seconds): --help answers at once.
    from moe_gpt.weights.hf import export_hf_gpt2, export_hf_tokenizer
    from moe_gpt.weights.safe_load import load_model

    model = load_model(args.checkpoint)
    directory = export_hf_gpt2(model, args.out, overwrite=args.overwrite)
    export_hf_tokenizer(Path(project_path(args.tokenizer_dir)), directory, model.config.block_size)
    print(f"exported {args.checkpoint} and GPT-2's tokenizer to {directory}")


if __name__ == "__main__":
    raise SystemExit(main())
