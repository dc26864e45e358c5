"""Drop the least-used experts of an MoE checkpoint and write the smaller model as a new checkpoint.

    python scripts/prune_experts.py outputs/moe/<run>/checkpoints/best.ckpt --keep 4
    python scripts/prune_experts.py best.ckpt --keep 2 --windows 256 data=shakespeare   # usage on another corpus

Usage is the share of token-slots each expert gets on the first --windows validation windows of the
run's data (the checkpoint remembers its run's overrides; train.py overrides given here change it,
e.g. the corpus). Each MoE layer keeps its --keep most-used experts. The report gives the kept
experts and their shares, the parameter counts, and the validation loss before and after on the
same windows. The pruned checkpoint (default: <checkpoint stem>-pruned-<keep>.ckpt next to it)
starts new runs (init_from=...), and works with scripts/generate.py and scripts/analyze.py; it does not resume.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Optional

from moe_gpt.compose import compose_run_config, merge_overrides, override_key
from moe_gpt.config import ConfigError, RunConfig
from moe_gpt.cli.common import ArgumentParser, entry_point

if TYPE_CHECKING:  # torch is imported once the command line is parsed (prune): --help answers at once
    from moe_gpt.model.gpt import GPT
    from moe_gpt.weights.prune import Measurement

DEFAULT_WINDOWS = 64


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a .ckpt of an MoE run, e.g. <run>/checkpoints/best.ckpt")
    parser.add_argument("--keep", type=int, required=True, help="experts each MoE layer keeps")
    parser.add_argument("--out", default=None, help="pruned checkpoint (default: <stem>-pruned-<keep>.ckpt beside it)")
    parser.add_argument(
        "--windows", type=int, default=DEFAULT_WINDOWS, help="validation windows that measure usage and loss"
    )
    parser.add_argument("overrides", nargs="*", help="train.py overrides for the data, e.g. data=shakespeare")
    return parser.parse_intermixed_args(argv)  # overrides may come before or after the options


def output_path(checkpoint: Path, keep: int, out: Optional[str]) -> Path:
    """Where the pruned checkpoint goes; refused before any work if a file is already there."""
    path = Path(out).expanduser() if out else checkpoint.with_name(f"{checkpoint.stem}-pruned-{keep}.ckpt")
    if path.exists():
        raise ConfigError(f"--out {path} already exists; remove it or pass another --out (it is never overwritten)")
    if not path.parent.is_dir():
        raise ConfigError(f"--out {path}: its folder {path.parent} does not exist; create it or pass another --out")
    return path


def run_config(path: Path, checkpoint: dict, overrides: list[str]) -> RunConfig:
    """The config of the run that wrote the checkpoint, with ``overrides`` (data, seed) applied."""
    from moe_gpt.training.resume import Resume, saved_overrides

    model_keys = [o for o in overrides if override_key(o).split(".")[0].split("/")[0] == "model"]
    if model_keys:
        raise ConfigError(f"{model_keys[0]}: the model comes from the checkpoint, so model overrides do not apply")
    saved = saved_overrides(Resume(path, checkpoint))
    if saved is None:
        print(f"note: {path} has no record of its run's overrides; usage is measured on {overrides or 'the defaults'}")
    return compose_run_config(merge_overrides(saved or [], overrides))


def save_new_file(checkpoint: dict, path: Path) -> None:
    """Write ``checkpoint`` to ``path``, which must not exist (even if created since it was checked)."""
    import torch

    try:
        handle = open(path, "xb")
    except FileExistsError:
        raise ConfigError(
            f"--out {path} already exists; remove it or pass another --out (it is never overwritten)"
        ) from None
    try:
        with handle:
            torch.save(checkpoint, handle)
    except BaseException:
        path.unlink(missing_ok=True)  # a half-written file would later read as a damaged checkpoint
        raise


def report_lines(
    keep_per_layer: list[list[int]], before: Measurement, after: Measurement, models: tuple[GPT, GPT]
) -> Iterator[str]:
    """The printed report: per MoE block the kept experts and their usage, then parameters and loss."""
    original, pruned = models
    blocks = [index for index, block in enumerate(original.transformer.h) if block.is_moe]
    for block, experts, shares in zip(blocks, keep_per_layer, before.shares):
        kept = ", ".join(f"{expert} ({shares[expert]:.1%})" for expert in experts)
        yield f"block {block}: kept experts {kept}: {sum(shares[e] for e in experts):.1%} of the token-slots"
    yield (
        f"parameters: {original.num_parameters():,} -> {pruned.num_parameters():,} "
        f"(active per token: {original.num_active_parameters():,} -> {pruned.num_active_parameters():,})"
    )
    yield f"val loss: {before.loss:.4f} -> {after.loss:.4f}"
    yield f"val perplexity: {before.perplexity:.2f} -> {after.perplexity:.2f}"


def prune(args: argparse.Namespace) -> None:
    from moe_gpt.weights.prune import (
        check_keep,
        experts_to_keep,
        load_moe_model,
        measure,
        prune_experts,
        pruned_checkpoint,
        training_overrides,
        validation_batches,
    )
    from moe_gpt.weights.safe_load import read_checkpoint

    path = Path(args.checkpoint).expanduser()
    model = load_moe_model(path)
    checkpoint = read_checkpoint(path)  # memory-mapped: the second read costs little
    num_experts = model.config.moe.num_experts
    check_keep(args.keep, num_experts)
    if args.windows < 1:
        raise ConfigError(f"--windows {args.windows} must be at least 1")
    out = output_path(path, args.keep, args.out)
    run = run_config(path, checkpoint, args.overrides)
    batches = validation_batches(run, model.config.block_size, args.windows)
    windows = sum(len(x) for x, _ in batches)
    print(
        f"{path}: {num_experts} -> {args.keep} experts per MoE layer, "
        f"by usage on {windows} validation windows of data={run.data.name}"
    )
    before = measure(model, batches)
    keep_per_layer = experts_to_keep(before.shares, args.keep)
    pruned = prune_experts(model, keep_per_layer)
    after = measure(pruned, batches)
    for line in report_lines(keep_per_layer, before, after, (model, pruned)):
        print(line)
    result = pruned_checkpoint(checkpoint, pruned)
    save_new_file(result, out)
    print(f"wrote {out}")
    print(f"train from it: python train.py {shlex.join(training_overrides(result, model, pruned, out))}")


@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    prune(parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
