"""Summarise a Hydra sweep of train.py: one row per job as Markdown and CSV, and two plots.

    python scripts/summarize_sweep.py multirun/2026-11-23_12-00-00
    python scripts/summarize_sweep.py multirun/2026-11-23_12-00-00 --out reports/experts

A job is any directory under SWEEP_DIR with ``.hydra/overrides.yaml``. Its outcome is
``metrics.json`` (it finished) or ``failure.json`` (it raised; train.py writes it), the newer one
when an earlier attempt left the other; with neither, the job is still running or was killed.
Besides the model columns, the table has a column for every override that differs between jobs.
Writes summary.md, summary.csv, val_ppl_vs_experts.png and tokens_per_sec_vs_experts.png to
--out (default: SWEEP_DIR) and prints the table.
"""

from __future__ import annotations

from pathlib import Path

from moe_gpt.cli.common import ArgumentParser, entry_point
from moe_gpt.config import ConfigError
from moe_gpt.training.sweep_summary import summarize


@entry_point(runs_model=False)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, help="a multirun directory, e.g. multirun/2026-11-23_12-00-00")
    parser.add_argument(
        "--out", type=Path, default=None, help="where to write the table and plots (default: SWEEP_DIR)"
    )
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        raise ConfigError(f"{args.sweep_dir} is not a directory; pass a sweep directory such as multirun/<date_time>")
    print(summarize(args.sweep_dir, args.out or args.sweep_dir))


if __name__ == "__main__":
    raise SystemExit(main())
