"""What a finished run leaves for a reader: a short plain-text summary and a loss-curve picture.

Both come from ``metrics.json``'s numbers, so they read the same with any logger (``logger=none``
included): the summary is printed and saved as ``summary.txt``, the picture as ``curves.png``.
"""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Any, Optional

from moe_gpt.reporting import MFU_FORMAT, curves_figure, save_figure
from moe_gpt.training.run_folder import CHECKPOINT_FOLDER

CURVES_FILE = "curves.png"
SMOOTHING_HALF_WINDOW = 4  # the smoothed training loss averages each logged point with up to 4 on each side
SUMMARY_FILE = "summary.txt"
COMPARISON_ENV = "MOE_GPT_COMPARISON"  # set by compare.py for its runs: the command that resumes them


def summary_text(metrics: dict[str, Any], run_dir: Path, logger_kind: str, weights_only: bool = False) -> str:
    """A dozen lines: where the run is, how it ended, how fast it trained, what it wrote, and what to run next."""
    folder = shlex.quote(str(run_dir))
    checkpoints = run_dir / CHECKPOINT_FOLDER
    # best.ckpt follows validation during training: a run shorter than val_check_interval has none.
    saved = [name for name in ("best.ckpt", "last.ckpt") if (checkpoints / name).is_file()]
    sizes = f": {_megabytes(sum((checkpoints / name).stat().st_size for name in saved))}" if saved else ""
    kept = "weights only" if weights_only else "with AdamW's state; checkpoint.save_weights_only=true keeps a third"
    lines = [
        f"run finished: {run_dir}",
        f"  {metrics['steps']} steps, {metrics['train_tokens']:,} training tokens, {_duration(metrics['wall_time_s'])}",
        f"  val loss {_number(metrics['val_loss'])} (perplexity {_number(metrics['val_ppl'], 1)}), "
        f"best {_number(metrics.get('best_val_loss'))}",
        f"  {_number(metrics['tokens_per_sec'], 0, thousands=True)} tokens/s (training only), "
        f"MFU {_mfu(metrics.get('mfu'))}",
        f"  checkpoints: {checkpoints}/ ({', '.join(saved) or 'none written'}{sizes}, {kept})",
        f"  disk: {_megabytes(_folder_bytes(run_dir))} in {run_dir}",
        f"  logs: {_logs(run_dir, logger_kind)}",
        f"  loss curves: {run_dir / CURVES_FILE}",
    ]
    if saved:
        checkpoint = shlex.quote(str(checkpoints / saved[0]))
        lines.append(f"  generate: python scripts/generate.py --checkpoint {checkpoint} --prompt 'def '")
    comparison = os.environ.get(COMPARISON_ENV)
    if comparison:  # a run of compare.py, which resumes its own runs; train.py's resume=last would not tell it
        lines.append(f"  continue: {comparison} (run it again: unfinished runs resume, finished ones are kept)")
    elif weights_only and saved:  # no optimizer state to continue from: a new run starts from the weights
        lines.append(f"  start from it: python train.py init_from={shlex.quote(str(checkpoints / saved[0]))}")
    elif not weights_only:
        lines.append(
            f"  continue: python train.py hydra.run.dir={folder} resume=last trainer.max_steps={2 * metrics['steps']}"
        )
    return "\n".join(lines)


def _folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file() and not path.is_symlink())


def _megabytes(size: int) -> str:
    return f"{size / 1e6:,.1f} MB"


def _logs(run_dir: Path, logger_kind: str) -> str:
    files = {
        "wandb": f"{run_dir / 'wandb'}/ (offline: wandb sync {run_dir / 'wandb'}/offline-run-*)",
        "csv": str(run_dir / "csv" / "metrics.csv"),
        "none": "no metrics logger (logger=none)",
    }
    return f"{run_dir / 'train.log'}, {run_dir / 'metrics.json'}, {files[logger_kind]}"


def _number(value: Optional[float], digits: int = 3, thousands: bool = False) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"


def _mfu(value: Optional[float]) -> str:
    return "n/a (no known peak)" if value is None else MFU_FORMAT.format(value)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds} s" if minutes else f"{seconds} s"


def write_curves_png(path: Path, train_history: list[dict], val_history: list[dict], title: str) -> None:
    save_figure(curves_png_figure(train_history, val_history, title), path)


def curves_png_figure(train_history: list[dict], val_history: list[dict], title: str):
    """Training loss (each logged step faintly, smoothed boldly; from step 0, before any update) and validation
    loss against training tokens: the whole run, and its second half zoomed."""
    tokens, losses = [h["tokens"] for h in train_history], [h["loss"] for h in train_history]

    def draw(ax) -> None:
        ax.plot(tokens, losses, color="C0", alpha=0.3, linewidth=0.8)
        ax.plot(tokens, smoothed(losses), color="C0", label="train (total loss, smoothed)")
        ax.plot([h["tokens"] for h in val_history], [h["val_loss"] for h in val_history], "o-", color="C1",
                label="validation")  # fmt: skip

    return curves_figure(draw, "training tokens", "loss (nats per token)", title, tokens_axis=True)


def smoothed(values: list[float]) -> list[float]:
    """A centred moving average (``SMOOTHING_HALF_WINDOW`` points each side, fewer at the ends): drawn after the
    run, it can look ahead, so unlike a running average it does not lag behind the first steep drop."""
    half = SMOOTHING_HALF_WINDOW
    return [
        sum(window) / len(window)
        for window in (values[max(0, i - half) : i + half + 1] for i in range(len(values)))
    ]
