"""Tables and plots for reports: one routine each, used by compare, the sweep summary, run summaries
and the expert-usage heatmap.

Tables are Markdown for reading and CSV (unrounded) for scripts; plots are PNG files drawn with
matplotlib's file-only backend, so no display is needed on a training machine.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Union


MFU_FORMAT = "{:.1%}"  # model FLOPs utilisation, a fraction of the devices' peak


def cell(value: Any, fmt: str = "{}", missing: str = "") -> str:
    """One Markdown cell: ``missing`` for None, a literal pipe escaped (it would split the cell)."""
    text = missing if value is None else fmt.format(value)
    return text.replace("|", "\\|")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [list(header), ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def write_csv(path: Path, columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> None:
    """One line per row with the given columns (unrounded); keys outside ``columns`` are left out."""
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def write_reported(path: Path, write) -> str:
    """Write ``path`` with ``write(path)``; the returned line says when an earlier file was replaced."""
    existed = path.exists()
    write(path)
    return f"{path} (replaced the earlier one)" if existed else str(path)


@contextmanager
def plot(
    target: Union[Path, io.BytesIO],
    xlabel: str,
    ylabel: str,
    figsize: tuple[float, float] = (6, 4),
    grid: bool = True,
) -> Iterator[Any]:
    """Yields a matplotlib Axes to draw on; labels it, adds a legend when something is labelled, and
    saves it as PNG to ``target`` (a path, or a buffer for bytes)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if grid:
            ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        fig.savefig(target, format="png", bbox_inches="tight", dpi=100)
    finally:
        plt.close(fig)


def png_bytes(draw, xlabel: str, ylabel: str, figsize: tuple[float, float], grid: bool = True) -> bytes:
    """``draw(ax)`` on a new plot, returned as PNG bytes (for loggers that take images)."""
    buffer = io.BytesIO()
    with plot(buffer, xlabel, ylabel, figsize, grid) as ax:
        draw(ax)
    return buffer.getvalue()
