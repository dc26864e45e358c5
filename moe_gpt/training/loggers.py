"""Metric loggers that continue across a resume: one W&B run and one CSV file per run folder."""

from __future__ import annotations

import csv
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from moe_gpt.config import LoggerConfig
from moe_gpt.training.lightning_internals import drop_wandb_anonymous_setting


def build_loggers(
    cfg: LoggerConfig, run_dir: Path, run_name: str, config: dict[str, Any], wandb_id: str, resumed_step: Optional[int]
) -> list[Logger]:
    """The configured logger; when resuming, it continues the run's W&B run and CSV log."""
    if cfg.kind == "wandb":
        logger = StepCountedWandbLogger(
            project=cfg.project,
            name=run_name,
            group=cfg.group,
            save_dir=str(run_dir),
            offline=cfg.mode == "offline",
            config=config,
            id=wandb_id,  # the same id on resume: W&B continues the run instead of opening a second one
            resume="allow",
        )
        drop_wandb_anonymous_setting(logger)  # only silences wandb's warning about it
        return [logger]
    if cfg.kind == "csv":
        return [ContinuingCSVLogger(run_dir, resumed_step)]
    return []


def without_whole_epochs(metrics: Mapping[str, float]) -> dict[str, float]:
    """Lightning adds its whole-epoch counter ``epoch`` to what it logs: 0 during a run, 1 once the fit
    has ended, whatever the run's length. Runs here count steps and tokens; ``train/epochs`` (the
    fraction of the training split seen) says how far through the data a run is."""
    return {key: value for key, value in metrics.items() if key != "epoch"}


class StepCountedWandbLogger(WandbLogger):
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(without_whole_epochs(metrics), step)


class ContinuingCSVLogger(CSVLogger):
    """``<run_dir>/csv/metrics.csv``, kept across a resume (Lightning's own logger deletes it).

    Rows logged after the resumed checkpoint's step are dropped: the resumed run logs those steps
    again, with the same values when the resume is exact. The rows before it are handed to
    Lightning's writer when it is first used, so it writes them back before anything new.
    """

    def __init__(self, run_dir: Path, resumed_step: Optional[int]):
        # Every row is written when it is logged (not every 100 steps): a killed run's file then
        # holds every step its last checkpoint covers.
        super().__init__(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
        self.resumed_step = resumed_step
        self._earlier_rows_restored = False

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(without_whole_epochs(metrics), step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if not self._earlier_rows_restored:
            self._earlier_rows_restored = True
            kept = take_rows_before(Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE, self.resumed_step)
            writer = super().experiment
            for step, metrics in kept:
                writer.log_metrics(metrics, step)
            writer.save()
        return super().experiment


def take_rows_before(path: Path, before_step: Optional[int]) -> list[tuple[int, dict[str, float]]]:
    """The rows of a CSV metrics file logged before ``before_step`` (none for a fresh run: None), as
    (step, metrics); the file is removed."""
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        rows = [(int(float(row["step"])), row) for row in csv.DictReader(handle) if row.get("step")]
    path.unlink()
    if before_step is None:
        return []
    return [
        (step, {key: float(value) for key, value in row.items() if key != "step" and value != ""})
        for step, row in rows
        if step < before_step
    ]
