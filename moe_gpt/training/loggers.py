"""Metric loggers that continue across a resume: one W&B run and one CSV file per run folder."""

from __future__ import annotations

import csv
import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.core.saving import save_hparams_to_yaml
from lightning.pytorch.loggers import CSVLogger, Logger, WandbLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.utilities import rank_zero_only
from torch import Tensor

from moe_gpt.config import LoggerConfig
from moe_gpt.training.atomic_write import replacing
from moe_gpt.training.lightning_internals import drop_wandb_anonymous_setting

PROGRESS = "train/epochs"  # lit_module.py logs it with every training and validation row


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
    """``<run_dir>/csv/metrics.csv``, kept across a resume (Lightning's own logger deletes it), and never
    left without a row it had: its writer is ``MetricsFile``, not Lightning's.
    """

    def __init__(self, run_dir: Path, resumed_step: Optional[int]):
        # Every row is written when it is logged (not every 100 steps): a killed run's file then
        # holds every step its last checkpoint covers.
        super().__init__(save_dir=str(run_dir), name="csv", version="", flush_logs_every_n_steps=1)
        self.resumed_step = resumed_step
        self._file: Optional[MetricsFile] = None

    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        super().log_metrics(without_whole_epochs(metrics), step)

    @property
    @rank_zero_experiment
    def experiment(self) -> MetricsFile:
        if self._file is None:
            self._file = MetricsFile(Path(self.log_dir), self.resumed_step)
        return self._file

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.save()


class MetricsFile:
    """What Lightning's CSV ``ExperimentWriter`` does (rows held until ``save``, ``hparams.yaml``), written
    so that a kill at any moment keeps every row already saved.

    New rows are appended in one write. When a new column appears the file needs a new header:
    Lightning rewrites it in place, and a kill in between leaves a truncated log; here the new file is
    written beside it and renamed over it (atomic_write.py).

    A run resumed at step N keeps the earlier rows except those it logs again. Rows after step N are
    dropped at the start: the resumed run repeats that work. Rows at step N stay: a finished run's final
    validation is never logged again; but Lightning numbers the rows of the batch after step N
    (training loss, learning rate, the validation that follows it) N as well, and the resumed run logs
    step N's expert usage again from the checkpoint's counts (expert_usage.py), so an earlier row at
    step N is dropped when the resumed run logs the same measurement.
    """

    def __init__(self, log_dir: Path, resumed_step: Optional[int]):
        log_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir = str(log_dir)
        self.path = log_dir / ExperimentWriter.NAME_METRICS_FILE
        self.metrics: list[dict[str, Any]] = []  # logged, not saved yet (Lightning's CSVLogger reads its length)
        self.hparams: dict[str, Any] = {}
        self.resumed_step = resumed_step
        self.metrics_keys, rows = read_rows(self.path)
        kept = [row for row in rows if resumed_step is not None and row_step(row) <= resumed_step]
        self._earlier_rows = len(kept)  # the file's first rows, from the sessions before this one
        if resumed_step is None:  # a fresh run starts a new log
            self.metrics_keys = []
            self.path.unlink(missing_ok=True)
        elif self.path.is_file():
            write_rows(self.path, self.metrics_keys, kept)

    def log_metrics(self, metrics_dict: Mapping[str, Any], step: Optional[int] = None) -> None:
        row = {key: value.item() if isinstance(value, Tensor) else value for key, value in metrics_dict.items()}
        self.metrics.append({**row, "step": len(self.metrics) if step is None else step})

    def log_hparams(self, params: dict[str, Any]) -> None:
        self.hparams.update(params)
        save_hparams_to_yaml(Path(self.log_dir) / ExperimentWriter.NAME_HPARAMS_FILE, self.hparams)

    def save(self) -> None:
        if not self.metrics:
            return
        columns = sorted(set(self.metrics_keys).union(*self.metrics))
        repeated = self._logged_again(self.metrics)
        if columns == self.metrics_keys and not repeated and self.path.is_file():
            with open(self.path, "ab") as file:
                file.write(csv_text(columns, self.metrics, header=False))  # one write: whole rows or none
        else:
            rows = [row for index, row in enumerate(read_rows(self.path)[1]) if index not in repeated]
            write_rows(self.path, columns, rows + self.metrics)
            self._earlier_rows -= len(repeated)
        self.metrics_keys, self.metrics = columns, []

    def _logged_again(self, new_rows: list[dict[str, Any]]) -> set[int]:
        """The positions of the earlier sessions' rows at the resumed step that one of ``new_rows`` logs again."""
        again = {measurement(row) for row in new_rows if row["step"] == self.resumed_step}
        if not again or not self._earlier_rows:
            return set()
        earlier = read_rows(self.path)[1][: self._earlier_rows]
        return {
            index
            for index, row in enumerate(earlier)
            if row_step(row) == self.resumed_step and measurement(row) in again
        }


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """A CSV metrics file's columns and rows, as written; an unfinished last line (a kill mid-append) is left out."""
    if not path.is_file():
        return [], []
    text = path.read_text()
    reader = csv.DictReader(io.StringIO(text[: text.rfind("\n") + 1]))
    rows = list(reader)
    return list(reader.fieldnames or []), rows


def row_step(row: dict[str, str]) -> int:
    return int(float(row.get("step") or -1))


def measurement(row: dict[str, Any]) -> tuple[frozenset[str], Optional[float]]:
    """What a row measured and when: the columns it fills, and the fraction of the data trained on when it
    was logged (every training and validation row has it; it tells a validation after step N from the
    one after step N+1, which Lightning numbers alike)."""
    progress = row.get(PROGRESS)
    names = frozenset(key for key, value in row.items() if key != "step" and value not in ("", None))
    return names, None if progress in ("", None) else float(progress)


def write_rows(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    with replacing(path) as file:
        file.write(csv_text(columns, rows, header=True))


def csv_text(columns: list[str], rows: list[dict[str, Any]], header: bool) -> bytes:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    if header:
        writer.writeheader()
    writer.writerows(rows)
    return text.getvalue().encode()
