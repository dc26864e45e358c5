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
from typing import Any, Callable, Union


MFU_FORMAT = "{:.1%}"  # model FLOPs utilisation, a fraction of the devices' peak
# Loss curves get a second panel over the second half of training, where the first drop (9 -> 4 nats) is over
# and the curves differ by hundredths of a nat that the full panel's scale hides.
ZOOM_FROM = 0.5


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
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=figsize)
    try:
        yield ax
        _label(ax, xlabel, ylabel, grid)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    except BaseException:
        plt.close(fig)
        raise
    save_figure(fig, target)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    return plt


def _label(ax, xlabel: str, ylabel: str, grid: bool) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if grid:
        ax.grid(alpha=0.3)


def curves_figure(draw: Callable[[Any], None], xlabel: str, ylabel: str, title: str, tokens_axis: bool = False):
    """A matplotlib Figure: ``draw(ax)`` on the whole run, and again on a panel zoomed on its second half
    (``zoom_on_the_end``); titled, with the legend on the first panel. ``tokens_axis``: x ticks as 200k, 1.5M."""
    from matplotlib.ticker import EngFormatter

    plt = _pyplot()
    fig, (whole, end) = plt.subplots(1, 2, figsize=(11, 4))
    for ax in (whole, end):
        draw(ax)
        _label(ax, xlabel, ylabel, grid=True)
        if tokens_axis:
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    zoom_on_the_end(end)
    whole.set_title("whole run", fontsize="medium")
    end.set_title(f"last {1 - ZOOM_FROM:.0%}, zoomed", fontsize="medium")
    if whole.get_legend_handles_labels()[0]:
        whole.legend(fontsize="small")
    fig.suptitle(title)
    return fig


def zoom_on_the_end(ax) -> None:
    """Limit ``ax`` to x >= ZOOM_FROM of its largest x, and its y axis to what its lines and bands hold there
    (faint lines, alpha below 0.5, are context: their noise does not set the scale)."""
    import numpy as np

    lines = [line for line in ax.get_lines() if (line.get_alpha() or 1.0) >= 0.5]
    points = [np.column_stack([line.get_xdata(), line.get_ydata()]) for line in lines]
    points += [path.vertices for band in ax.collections for path in band.get_paths()]
    points = [p.astype(float) for p in points if len(p)]
    if not points:  # nothing drawn yet (a run too short to log): nothing to zoom on
        return
    points = np.concatenate(points)
    right = points[:, 0].max()
    start = ZOOM_FROM * right
    shown = points[(points[:, 0] >= start) & np.isfinite(points[:, 1])][:, 1]
    if not len(shown):
        return
    margin = 0.1 * (shown.max() - shown.min()) or 0.01
    ax.set_xlim(start, right + 0.02 * (right - start))
    ax.set_ylim(shown.min() - margin, shown.max() + margin)


def save_figure(fig, target: Union[Path, io.BytesIO]) -> None:
    """``fig`` as PNG to ``target``, then closed."""
    try:
        fig.savefig(target, format="png", bbox_inches="tight", dpi=100)
    finally:
        _pyplot().close(fig)


def png_bytes(draw, xlabel: str, ylabel: str, figsize: tuple[float, float], grid: bool = True) -> bytes:
    """``draw(ax)`` on a new plot, returned as PNG bytes (for loggers that take images)."""
    buffer = io.BytesIO()
    with plot(buffer, xlabel, ylabel, figsize, grid) as ax:
        draw(ax)
    return buffer.getvalue()
