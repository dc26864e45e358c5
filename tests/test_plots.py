"""What the loss plots show: a title, readable token ticks, a panel zoomed on the second half of training where
variants differ by hundredths of a nat, and (curves.png) the loss at step 0 and a smoothed training loss."""

import json
import math

import matplotlib.pyplot as plt
import numpy as np
import pytest

from moe_gpt.compare.report import draw_variants
from moe_gpt.reporting import ZOOM_FROM, curves_figure
from moe_gpt.training.summary import curves_png_figure

TOKENS = [0, 100_000, 200_000, 300_000, 400_000]


def val_history(losses: list[float]) -> list[dict]:
    return [{"step": i, "tokens": t, "seconds": i * 10.0, "val_loss": v} for i, (t, v) in enumerate(zip(TOKENS, losses))]


@pytest.fixture
def closing():
    figures = []
    yield figures.append
    for figure in figures:
        plt.close(figure)


def test_comparison_curves_are_titled_and_zoomed_on_the_second_half_where_variants_differ(closing):
    losses = {"dense": [[10.8, 5.0, 4.10, 4.03, 4.00]], "moe-8-2": [[10.8, 4.9, 4.08, 4.00, 3.97], [10.8, 4.9, 4.07, 3.99, 3.96]]}
    rows = [
        {"variant": variant, "status": "ok", "val_loss": seed[-1], "val_history": val_history(seed)}
        for variant, seeds in losses.items()
        for seed in seeds
    ]
    draw = lambda ax: draw_variants(ax, rows, "tokens")  # noqa: E731
    figure = curves_figure(draw, "training tokens", "val loss", "tokens: val loss", tokens_axis=True)
    closing(figure)
    whole, end = figure.axes
    assert figure._suptitle.get_text() == "tokens: val loss" and whole.get_title() and end.get_title()
    assert whole.get_ylim()[1] > 10.8  # the whole run, from the first point
    assert end.get_xlim()[0] == pytest.approx(ZOOM_FROM * 400_000)
    low, high = end.get_ylim()
    assert 3.9 < low < 3.96 and 4.10 < high < 4.2  # the second half's 0.14 nats fill the panel
    assert whole.xaxis.get_major_formatter()(400_000) == "400k"  # not 400000 run into its neighbours


def test_run_curves_start_at_step_0_and_smooth_the_training_loss(closing):
    rng = np.random.default_rng(0)
    train = [{"step": s, "tokens": s * 2048, "loss": 4 + 6 * math.exp(-s / 20) + rng.normal(0, 0.2)} for s in range(0, 250, 5)]
    val = [{"step": s, "tokens": s * 2048, "val_loss": 4 + 6 * math.exp(-s / 20)} for s in (50, 100, 150, 200, 250)]
    figure = curves_png_figure(train, val, "loss curves of run-1")
    closing(figure)
    whole, end = figure.axes
    assert figure._suptitle.get_text() == "loss curves of run-1"
    raw, smooth, validation = whole.get_lines()
    assert raw.get_xdata()[0] == 0 and smooth.get_label() == "train (total loss, smoothed)"
    roughness = [np.abs(np.diff(line.get_ydata()[25:])).sum() for line in (raw, smooth)]
    assert roughness[1] < roughness[0] / 3
    assert end.get_xlim()[0] == pytest.approx(ZOOM_FROM * 250 * 2048)  # the last validation is the right end


def test_a_run_records_its_training_loss_at_step_0_before_any_update(finished_moe_run):
    history = json.loads((finished_moe_run / "metrics.json").read_text())["train_history"]
    assert history[0]["step"] == 0 and history[0]["tokens"] == 0
    assert abs(history[0]["loss"] - math.log(50257)) < 0.5  # a random GPT-2's loss: about ln(vocabulary)
    assert [point["step"] for point in history[1:]] == [1, 2, 3]  # TINY logs every step


def test_curves_of_a_run_with_no_logged_point_yet_are_drawn_without_a_zoom(closing):
    figure = curves_png_figure([], [], "loss curves of a run stopped before its first log")
    closing(figure)
    whole, end = figure.axes
    assert end.get_xlim() == whole.get_xlim()  # left as drawn
