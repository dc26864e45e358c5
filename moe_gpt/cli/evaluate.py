"""Downstream evaluation of a checkpoint through lm-evaluation-harness.

    python scripts/evaluate.py --checkpoint outputs/moe/<run> --tasks hellaswag,lambada_openai,arc_easy --limit 200
    python scripts/evaluate.py --checkpoint path/to/best.ckpt --tasks my_task --include-path my_tasks/ --out eval/

--checkpoint is a .ckpt or a run folder (its best.ckpt). The scores go to --out (default: the run
folder's lm_eval/) as results.json, results.md and samples_<task>.jsonl, are printed as a table,
and are added to the run's W&B run when it logged to one.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from moe_gpt.cli.common import ArgumentParser, entry_point, resolve_device
from moe_gpt.compare.downstream import (
    OUT_IN_RUN_FOLDER,
    EvalSettings,
    checkpoint_of,
    eval_settings,
    evaluate_checkpoint,
    log_to_wandb,
    results_table,
    write_results,
)
from moe_gpt.config import ConfigError, project_path
from moe_gpt.training.run_folder import run_folder_of


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a .ckpt, or a run folder (its checkpoints/best.ckpt)")
    parser.add_argument("--tasks", required=True, help="lm-eval task names, comma-separated: hellaswag,arc_easy")
    parser.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents of each task")
    parser.add_argument("--include-path", default=None, help="a folder of task YAML files (local tasks)")
    parser.add_argument("--num-fewshot", type=int, default=None, help="examples in each prompt (default: the task's)")
    parser.add_argument("--out", default=None, help="folder for the results (default: <run folder>/lm_eval)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows scored per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, mps, ...")
    parser.add_argument("--no-wandb", action="store_true", help="do not add the scores to the run's W&B run")
    parser.add_argument(
        "--tokenizer-dir", default="data/tokenizer", help="folder with gpt2.tiktoken (relative: to the project root)"
    )
    return parser.parse_args(argv)


def settings_from(args: argparse.Namespace) -> EvalSettings:
    if args.num_fewshot is not None and args.num_fewshot < 0:
        raise ConfigError(f"--num-fewshot {args.num_fewshot} must be >= 0")
    settings = eval_settings(
        args.tasks,
        args.limit,
        args.include_path,
        num_fewshot=args.num_fewshot,
        batch_size=args.batch_size,
        tokenizer_dir=project_path(args.tokenizer_dir),  # as generate.py resolves it
    )
    # The device last: checking it imports torch, which takes seconds; the other mistakes are told at once.
    return replace(settings, device=str(resolve_device(args.device)))


def output_folder(args: argparse.Namespace, run_dir: Path | None) -> Path:
    if args.out is not None:
        return Path(args.out).expanduser()
    if run_dir is None:
        raise ConfigError(f"--checkpoint {args.checkpoint} is not inside a run folder; pass --out for the results")
    return run_dir / OUT_IN_RUN_FOLDER


@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    args = parse_args(argv)
    settings = settings_from(args)
    checkpoint = checkpoint_of(args.checkpoint)
    run_dir = run_folder_of(checkpoint)
    out = output_folder(args, run_dir)  # before the slow part: a missing --out is known now
    results = evaluate_checkpoint(checkpoint, settings)
    written = write_results(out, results, settings)
    print(results_table(results))
    print(f"results: {', '.join(str(path) for path in written)}")
    if not args.no_wandb and (wandb_id := log_to_wandb(run_dir, results)):
        print(f"added to W&B run {wandb_id} in {run_dir / 'wandb'}")


if __name__ == "__main__":
    raise SystemExit(main())
