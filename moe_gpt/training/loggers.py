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
        # Lightning 2.6 always passes anonymous=None to wandb.init, and wandb 0.31 warns on every run that
        # the setting has no effect; leaving it out changes nothing else.
        logger._wandb_init.pop("anonymous", None)
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

    Rows logged after the resumed checkpoint's step are dropped first: the resumed run logs those
    steps again, with the same values when the resume is exact.
    """

    def __init__(self, run_dir: Path, resumed_step: Optional[int]):
        # Every row is written when it is logged (not every 100 steps): a killed run's file then
        # holds every step its last checkpoint covers.
        super().__init__(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
        self.resumed_step = resumed_step

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(without_whole_epochs(metrics), step)

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._experiment = _ContinuingWriter(self.log_dir, self.resumed_step)
        return self._experiment


class _ContinuingWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resumed_step: Optional[int]):
        self.resumed_step = resumed_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        # Lightning warns and deletes metrics.csv here. A fresh run starts an empty file; a resumed
        # run keeps the rows up to its checkpoint.
        path = Path(self.metrics_file_path)
        if not path.is_file():
            return
        if self.resumed_step is None:
            path.unlink()
            return
        with open(path, newline="") as handle:
            reader = csv.DictReader(handle)
            columns, rows = list(reader.fieldnames or []), list(reader)
        kept = [row for row in rows if row.get("step") and int(float(row["step"])) < self.resumed_step]
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(kept)
        self.metrics_keys = columns  # new columns later rewrite the header, as Lightning's writer does
