"""Expert-usage statistics computed from the counts an MoE layer keeps."""

import io
import math

import matplotlib
import numpy as np
import pytest
import torch
from PIL import Image

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.training.expert_usage import usage_heatmap_png, usage_stats
from moe_gpt.model.moe import MoELayer
from tests.helpers import TINY, csv_column, train_main


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
    image = np.asarray(Image.open(io.BytesIO(usage_heatmap_png(shares))))
    viridis = matplotlib.colormaps["viridis"]
    hot_rows, hot_columns = pixels_of_colour(image, np.array(viridis(1.0, bytes=True)))  # the largest share
    # The median skips the colour bar's few pixels of the same colour.
    hot_y, hot_x = int(np.median(hot_rows)), int(np.median(hot_columns))
    cold_rows, cold_columns = pixels_of_colour(image, np.array(viridis(0.05 / 0.65, bytes=True)))
    # Along the hot cell's row and column the cold cells span the whole heatmap, the hot one excepted.
    row_span = cold_columns[cold_rows == hot_y]
    column_span = cold_rows[cold_columns == hot_x]
    expert = (hot_x - row_span.min()) / (row_span.max() - row_span.min()) * 8
    layer = (hot_y - column_span.min()) / (column_span.max() - column_span.min()) * 4
    assert (int(layer), int(expert)) == (2, 5)
    assert len(hot_rows) == pytest.approx(len(cold_rows) / 31, rel=0.2)  # one cell's area against 31 cells'


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
