"""Expert-usage statistics computed from the counts an MoE layer keeps."""

import io
import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.training.expert_usage import HEATMAP_DIR, draw_usage_heatmap, usage_heatmap_png, usage_stats
from moe_gpt.model.moe import MoELayer
from tests.helpers import TINY, assert_drawn_plot, csv_column, train_main


def layer_with_counts(counts: list[float]) -> MoELayer:
    layer = MoELayer(GPTConfig(n_embd=16, n_head=2, use_moe=True, moe=MoEConfig(num_experts=len(counts), top_k=1)))
    layer.tokens_per_expert.copy_(torch.tensor(counts))
    return layer


def test_balanced_usage_has_no_load_violation():
    stats = usage_stats(layer_with_counts([5, 5, 5, 5]))
    assert stats["share"] == [0.25] * 4
    assert stats["max_load_violation"] == pytest.approx(0.0)


def test_collapsed_usage_violation_is_experts_minus_one():
    stats = usage_stats(layer_with_counts([0, 12, 0, 0]))
    assert stats["max_load_violation"] == pytest.approx(3.0)


def test_router_entropy_is_the_mean_over_routed_tokens():
    layer = layer_with_counts([1, 1, 1, 1])
    layer.train()
    layer(torch.zeros(1, 3, 16))  # equal logits: uniform probabilities, entropy ln(E)
    stats = usage_stats(layer)
    assert stats["router_entropy"] == pytest.approx(math.log(4), rel=1e-5)
    assert stats["router_entropy_ratio"] == pytest.approx(1.0, rel=1e-5)


def pixels_of_colour(image: np.ndarray, colour: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows, columns) of the pixels within 2 levels of ``colour`` per channel."""
    return np.nonzero((np.abs(image[:, :, :3].astype(int) - colour[:3]) <= 2).all(axis=2))


def test_the_heatmap_draws_each_share_in_its_layers_row_and_experts_column():
    # The default model's 4 MoE layers x 8 experts; one hot cell (layer 2, expert 5) among equal shares.
    shares = [[0.05] * 8 for _ in range(4)]
    shares[2][5] = 0.65
    image = np.asarray(Image.open(io.BytesIO(usage_heatmap_png(shares, "title"))))
    colours = matplotlib.colormaps["coolwarm"]
    scale = matplotlib.colors.TwoSlopeNorm(1 / 8, vmin=0.0, vmax=0.65)  # white at the balanced share 1/8
    hot_rows, hot_columns = pixels_of_colour(image, np.array(colours(1.0, bytes=True)))  # the largest share
    # The median skips the colour bar's few pixels of the same colour.
    hot_y, hot_x = int(np.median(hot_rows)), int(np.median(hot_columns))
    cold_rows, cold_columns = pixels_of_colour(image, np.array(colours(scale(0.05), bytes=True)))
    # Along the hot cell's row and column the cold cells span the whole heatmap, the hot one excepted.
    row_span = cold_columns[cold_rows == hot_y]
    column_span = cold_rows[cold_columns == hot_x]
    expert = (hot_x - row_span.min()) / (row_span.max() - row_span.min()) * 8
    layer = (hot_y - column_span.min()) / (column_span.max() - column_span.min()) * 4
    assert (int(layer), int(expert)) == (2, 5)
    assert len(hot_rows) == pytest.approx(len(cold_rows) / 31, rel=0.2)  # one cell's area against 31 cells'


def test_the_heatmap_has_a_title_and_marks_the_balanced_share_one_over_e():
    import matplotlib.pyplot as plt

    figure, ax = plt.subplots()
    try:
        draw_usage_heatmap(ax, [[0.5, 0.3, 0.1, 0.1], [0.25] * 4], "expert usage at step 50")
        assert ax.get_title() == "expert usage at step 50"
        bar = ax.images[0].colorbar
        assert "1/E = 0.25" in [label.get_text() for label in bar.ax.get_yticklabels()]
        assert [line.get_ydata()[0] for line in bar.ax.lines] == [0.25]  # the balanced share, drawn across the bar
        assert ax.images[0].norm(0.25) == 0.5  # the middle (white) of the colour map
    finally:
        plt.close(figure)


@pytest.mark.parametrize("fixture", ["finished_moe_run", "tiny_moe_checkpoint"])  # logger=csv, logger=none
def test_a_run_leaves_its_usage_heatmaps_in_its_folder_with_any_logger(fixture, request):
    run_dir = request.getfixturevalue(fixture)
    run_dir = run_dir if run_dir.is_dir() else run_dir.parents[1]  # a checkpoint's run folder
    heatmaps = sorted((run_dir / HEATMAP_DIR).iterdir())
    assert [path.name for path in heatmaps] == ["step_000002.png"]  # TINY: every 2 steps; the runs end at 3 and 2
    assert_drawn_plot(heatmaps[0])


def test_a_run_resumed_between_two_usage_logs_logs_the_usage_of_the_run_left_alone(tmp_path, corpus_overrides):
    # Logged every 2 steps, stopped at step 3 with gradient accumulation: the counts of step 3 and the
    # repeated step number within step 4's batches both matter. A constant lr after warm-up makes the
    # shorter first session train as the longer run does.
    args = [*TINY, *corpus_overrides, "logger=csv", "trainer.accumulate_grad_batches=2", "optim.min_lr_ratio=1.0"]
    assert train_main([*args, "trainer.max_steps=4", f"hydra.run.dir={tmp_path / 'alone'}"]).returncode == 0
    assert train_main([*args, "trainer.max_steps=3", f"hydra.run.dir={tmp_path / 'resumed'}"]).returncode == 0
    assert train_main([f"hydra.run.dir={tmp_path / 'resumed'}", "resume=last", "trainer.max_steps=4"]).returncode == 0

    share = "moe/layer0/expert0_share"
    assert [step for step, _ in csv_column(tmp_path / "alone", share)] == [2, 4]
    assert csv_column(tmp_path / "resumed", share) == csv_column(tmp_path / "alone", share)
