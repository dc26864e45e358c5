"""Analysis from the command line: what a config costs, and how a checkpoint routes a text.

    python scripts/analyze.py config model.moe.num_experts=16 model.moe.top_k=1   # any train.py overrides
    python scripts/analyze.py routing --checkpoint outputs/moe/.../checkpoints/best.ckpt --text "def main():"
    python scripts/analyze.py routing --checkpoint ... --json                  # the same as JSON, every digit
    python scripts/analyze.py routing --checkpoint ... --text-file notes.txt --intermediate > routing.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import TYPE_CHECKING

from moe_gpt.compose import compose_run_config
from moe_gpt.config import ConfigError, TrainerConfig, project_path, run_warnings
from moe_gpt.data import load_gpt2_tokenizer
from moe_gpt.reporting import markdown_table
from moe_gpt.cli.common import ArgumentParser, entry_point

if TYPE_CHECKING:
    from moe_gpt.model.analysis import ParallelLayout

# torch and Lightning are imported by the subcommand that runs, after the command line is parsed:
# --help and a malformed command line answer at once.


def parallel_layout(trainer: TrainerConfig) -> ParallelLayout:
    """The processes and what they shard, from the run's trainer settings."""
    from moe_gpt.model.analysis import ParallelLayout
    from moe_gpt.training.parallel_settings import FSDP

    devices = trainer.devices
    if isinstance(devices, str) and "," in devices:
        devices = len([part for part in devices.split(",") if part.strip()])
    elif not isinstance(devices, int) and not str(devices).isdigit():
        devices = len(devices) if isinstance(devices, (list, tuple)) else None
    if devices is None:
        raise ConfigError(
            f"trainer.devices={trainer.devices!r} does not say how many processes share the memory; "
            "give a number, e.g. trainer.devices=8"
        )
    return ParallelLayout(
        processes=int(devices) * trainer.num_nodes,
        sharded=trainer.strategy == FSDP,
        expert_parallel=trainer.expert_parallel,
    )


def analyze_config(args: argparse.Namespace) -> None:
    from moe_gpt.model.analysis import flops_per_token, memory_estimate, parameter_counts, recommended_settings
    from moe_gpt.training.parallel_settings import check_expert_parallel

    run = compose_run_config(args.overrides)
    batch_size = args.batch_size or run.data.batch_size
    layout = parallel_layout(run.trainer)
    check_expert_parallel(run, layout.processes)  # what train.py would refuse is not estimated
    report = {
        "model": "moe" if run.model.use_moe else "dense",
        **parameter_counts(run.model),
        **flops_per_token(run.model),
        "memory_estimate": {
            "per_process": True,
            "processes": layout.processes,
            "strategy": run.trainer.strategy,
            "expert_parallel": layout.expert_parallel,
            "batch_size": batch_size,
            "precision": run.trainer.precision,
            **memory_estimate(run.model, batch_size, run.trainer.precision, layout),
        },
        "warnings": run_warnings(run),
        "advice": recommended_settings(run.model),
    }
    print(json.dumps(report, indent=2))


def analyze_routing(args: argparse.Namespace) -> None:
    text = Path(args.text_file).read_text() if args.text_file else args.text
    if not text:
        raise ConfigError("routing needs --text or --text-file with some text")
    import torch

    from moe_gpt.model.analysis import routing_report
    from moe_gpt.model.intermediate import to_jsonable
    from moe_gpt.weights.safe_load import load_model

    model = load_model(args.checkpoint)
    if not model.moe_layers():
        raise ConfigError(f"{args.checkpoint} is a dense model: it has no routing to report")
    ids = load_gpt2_tokenizer(project_path(args.tokenizer_dir)).encode_ordinary(text)[: model.config.block_size]
    report = routing_report(model, torch.tensor([ids]), include_intermediate=args.intermediate)
    print(json.dumps(to_jsonable(report), indent=2) if args.json or args.intermediate else routing_table(report))


def routing_table(report: dict) -> str:
    """One line per MoE block, in 3 decimals: what a reader compares (the JSON has every digit)."""
    header = ["block", "experts/token", "dropped", "balance loss", "z-loss", "share of token-slots per expert"]
    rows = [
        [
            str(layer["block"]),
            f"{layer['experts_per_token']:.3f}",
            f"{layer['dropped_fraction']:.3f}",
            f"{layer['switch_balance_loss']:.3f}",
            f"{layer['z_loss']:.3f}",
            " ".join(f"{share:.3f}" for share in layer["expert_share"]),
        ]
        for layer in report["moe_layers"]
    ]
    return f"{report['tokens']} tokens\n\n" + markdown_table(header, rows)


@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    config = commands.add_parser("config", help="parameters, FLOPs per token, memory estimate and advice for a config")
    config.add_argument("overrides", nargs="*", help="train.py overrides, e.g. model=dense model/size=gpt2_small")
    config.add_argument("--batch-size", type=int, default=None, help="default: data.batch_size")
    config.set_defaults(run=analyze_config)
    routing = commands.add_parser("routing", help="per-layer routing of a text through a checkpoint")
    routing.add_argument("--checkpoint", required=True)
    routing.add_argument("--text", default=None)
    routing.add_argument("--text-file", default=None)
    routing.add_argument("--tokenizer-dir", default="data/tokenizer", help="relative paths count from the project root")
    routing.add_argument("--json", action="store_true", help="print JSON (every digit) instead of a table")
    routing.add_argument("--intermediate", action="store_true", help="include the full intermediate data (JSON)")
    routing.set_defaults(run=analyze_routing)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
