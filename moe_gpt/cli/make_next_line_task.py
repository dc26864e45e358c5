"""Write a downstream task from the corpus's held-out documents: which line of code comes next?

    python scripts/make_next_line_task.py --out outputs/eval_tasks/next_line              # the default corpus
    python scripts/make_next_line_task.py --out outputs/eval_tasks/wiki data=wikitext103  # any data= option
    python scripts/evaluate.py --checkpoint <run> --tasks moe_gpt_next_line --include-path outputs/eval_tasks/next_line

The other arguments are train.py's Hydra overrides; only data.* matters (the corpus and
its val_fraction). How the questions are made: moe_gpt/compare/next_line_task.py.
"""

from __future__ import annotations

from pathlib import Path

from moe_gpt.cli.common import ArgumentParser, entry_point
from moe_gpt.compose import compose_run_config


@entry_point(runs_model=False)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the folder for next_line.yaml and next_line.jsonl")
    parser.add_argument("--questions", type=int, default=500, help="how many questions (default: 500)")
    parser.add_argument("--context-lines", type=int, default=8, help="lines of code before each answer (default: 8)")
    parser.add_argument("--seed", type=int, default=0, help="which lines are asked and which distractors are drawn")
    parser.add_argument("overrides", nargs="*", help="train.py's Hydra overrides, e.g. data=wikitext103")
    args = parser.parse_args(argv)
    for flag, value in (("--questions", args.questions), ("--context-lines", args.context_lines)):
        if value < 1:
            parser.error(f"{flag} {value} must be at least 1")
    data = compose_run_config(args.overrides).data
    # Imported once the arguments are checked: reading the corpus imports datasets and Lightning (seconds).
    from moe_gpt.compare.next_line_task import TASK_NAME, write_next_line_task

    yaml = write_next_line_task(data, args.out, args.questions, args.context_lines, args.seed)
    print(f"{args.questions} questions of task {TASK_NAME}: {yaml}")
    print(f"evaluate: python scripts/evaluate.py --checkpoint <run folder> --tasks {TASK_NAME} --include-path {yaml.parent}")


if __name__ == "__main__":
    raise SystemExit(main())
