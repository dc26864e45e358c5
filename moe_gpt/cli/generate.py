"""Sample text from a trained checkpoint.

    python scripts/generate.py --checkpoint outputs/moe/<run>/checkpoints/best.ckpt --prompt "def main(" \\
        --max-new-tokens 100 --temperature 0.8 --top-k 50 --seed 0 --num-samples 3
    python scripts/generate.py --checkpoint path/to/last.ckpt --temperature 0   # greedy

The prompt and the output use GPT-2's BPE (read offline from --tokenizer-dir). Samples are
printed one after another, each under a "--- sample N ---" line.
"""

from __future__ import annotations

import argparse

from moe_gpt.config import ConfigError, project_path
from moe_gpt.data import load_gpt2_tokenizer
from moe_gpt.data.tokenizer import ENDOFTEXT, GPT2_N_VOCAB
from moe_gpt.model.sampling import check_sampling_arguments
from moe_gpt.cli.common import ArgumentParser, entry_point, resolve_device


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description="Sample text from a moe-gpt training checkpoint.")
    parser.add_argument("--checkpoint", required=True, help="a .ckpt from a run's checkpoints/ folder")
    parser.add_argument(
        "--prompt", default=ENDOFTEXT, help=f"text to continue; default {ENDOFTEXT}, the start of a new document"
    )
    parser.add_argument("--max-new-tokens", type=int, default=100, help="tokens to add to each sample")
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy; below 1 = more conservative")
    parser.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    parser.add_argument(
        "--top-p", type=float, default=None, help="sample only among the most likely tokens summing to p"
    )
    parser.add_argument("--seed", type=int, default=None, help="seed for reproducible samples (default: random)")
    parser.add_argument("--num-samples", type=int, default=1, help="samples drawn, as one batch")
    parser.add_argument(
        "--no-cache", action="store_true", help="recompute every position each step (slower; for checks)"
    )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    parser.add_argument(
        "--tokenizer-dir", default="data/tokenizer", help="folder with gpt2.tiktoken (relative: to the project root)"
    )
    return parser.parse_args(argv)


def sample_texts(args: argparse.Namespace) -> list[str]:
    """Decoded samples (prompt included) for the parsed command line."""
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples {args.num_samples} must be >= 1")
    check_sampling_arguments(args.max_new_tokens, args.temperature, args.top_k, args.top_p)  # before slow loading
    device = resolve_device(args.device)
    # Imported once the arguments are checked (torch takes seconds): --help and mistakes answer at once.
    import torch

    from moe_gpt.model.generate import generate
    from moe_gpt.weights.safe_load import load_model

    tokenizer = load_gpt2_tokenizer(project_path(args.tokenizer_dir))  # as train.py resolves data.tokenizer_dir
    model = load_model(args.checkpoint, map_location=str(device))
    if model.config.vocab_size != GPT2_N_VOCAB:
        raise ConfigError(
            f"{args.checkpoint} has model.vocab_size={model.config.vocab_size}, not GPT-2's {GPT2_N_VOCAB}; "
            "its tokens cannot be decoded with the GPT-2 tokenizer"
        )
    prompt = tokenizer.encode(args.prompt, allowed_special={ENDOFTEXT})
    if not prompt:
        raise ConfigError("--prompt is empty; give at least one character (the default starts a new document)")
    idx = torch.tensor([prompt] * args.num_samples, dtype=torch.long, device=device)
    generator = None if args.seed is None else torch.Generator(device=device).manual_seed(args.seed)
    tokens = generate(
        model, idx, args.max_new_tokens, args.temperature, args.top_k, args.top_p, not args.no_cache, generator
    )
    return [tokenizer.decode(row) for row in tokens.tolist()]


@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    for number, text in enumerate(sample_texts(parse_args(argv)), start=1):
        print(f"--- sample {number} ---\n{text}")


if __name__ == "__main__":
    raise SystemExit(main())
