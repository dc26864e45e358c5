"""Expert-usage statistics: computed from the routing counts the MoE layers keep, logged by a callback."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from torch import Tensor

from moe_gpt.model.moe import MoELayer
from moe_gpt.reporting import png_bytes
from moe_gpt.training.atomic_write import replacing

HEATMAP_DIR = "usage_heatmaps"  # in the run folder: step_000050.png, ...


def usage_counters(layer: MoELayer) -> Tensor:
    """One layer's routing counters as one row: token-slots per expert, dropped slots, router entropy sum,
    routed tokens."""
    scalars = [layer.dropped_slots, layer.router_entropy_sum, layer.routed_tokens]
    return torch.cat([layer.tokens_per_expert.float(), *(value.float()[None] for value in scalars)])


def restore_usage_counters(layer: MoELayer, row: Tensor) -> None:
    """The inverse of ``usage_counters``: the layer's counters set from one row (on the counters' own device)."""
    counters = (layer.tokens_per_expert, layer.dropped_slots, layer.router_entropy_sum, layer.routed_tokens)
    for counter, value in zip(counters, (row[:-3], row[-3], row[-2], row[-1])):
        counter.copy_(value)


def usage_stats(layer: MoELayer) -> dict[str, float | list[float]]:
    """Share of token-slots per expert, router entropy and max-load violation since the last reset."""
    return stats_from_counters(usage_counters(layer))


def stats_from_counters(counters: Tensor) -> dict[str, float | list[float]]:
    counts, dropped, entropy_sum, routed = counters[:-3], counters[-3], counters[-2], counters[-1]
    slots = counts.sum().clamp_min(1)
    share = (counts / slots).tolist()
    entropy = (entropy_sum / routed.clamp_min(1)).item()
    return {
        "experts_per_token": (counts.sum() / routed.clamp_min(1)).item(),  # top_k, or fewer with top_p
        "dropped_fraction": (dropped / slots).item(),  # slots over an expert's capacity
        "share": share,
        # max share / mean share - 1: 0 when balanced; E/k - 1 when every token picks the same k experts.
        "max_load_violation": max(share) * len(share) - 1,
        "router_entropy": entropy,
        "router_entropy_ratio": entropy / math.log(len(share)) if len(share) > 1 else 1.0,
    }


def usage_heatmap_png(shares: list[list[float]], title: str) -> bytes:
    """A layer x expert image of token shares (``draw_usage_heatmap``), as PNG bytes."""
    size = (max(4.5, 1.6 + 0.45 * len(shares[0])), 1.4 + 0.45 * len(shares))  # room for the title
    return png_bytes(lambda ax: draw_usage_heatmap(ax, shares, title), "expert", "MoE layer", size, grid=False)


def draw_usage_heatmap(ax, shares: list[list[float]], title: str) -> None:
    """Each MoE layer's share of token-slots per expert: white at the balanced share 1/E (marked on the colour
    bar), red for experts above it, blue below, so an imbalance shows at a glance whatever E is."""
    from matplotlib.colors import TwoSlopeNorm

    balanced = 1 / len(shares[0])
    top = max(2 * balanced, *(max(row) for row in shares))
    image = ax.imshow(shares, cmap="coolwarm", norm=TwoSlopeNorm(balanced, vmin=0.0, vmax=top), aspect="auto")
    ax.set_xticks(range(len(shares[0])))
    ax.set_yticks(range(len(shares)))
    ax.set_title(title, fontsize="medium")
    bar = ax.figure.colorbar(image, ax=ax, label="share of token-slots")
    bar.set_ticks([0.0, balanced, top], labels=["0", f"1/E = {balanced:.3g}", f"{top:.2f}"])
    bar.ax.axhline(balanced, color="black", linewidth=1.5)


LAYER_METRICS = (
    "max_load_violation",
    "router_entropy",
    "router_entropy_ratio",
    "experts_per_token",
    "dropped_fraction",
)


class ExpertUsageLogger(L.Callback):
    """Every N optimizer steps, logs each MoE layer's usage; every M steps a heatmap, as a PNG in
    ``heatmap_dir`` (with any logger) and to W&B.

    A step's usage is logged when the next step starts (or training ends): after any checkpoint of
    that step, which holds the counts since the last log. A run resumed from it then logs that step's
    usage itself, as a resumed run logs its first step's other metrics (loggers.py drops the rows from
    that step on).
    """

    def __init__(self, every_n_steps: int, heatmap_every_n_steps: int, heatmap_dir: Path):
        self.every_n_steps = every_n_steps
        self.heatmap_every_n_steps = heatmap_every_n_steps
        self.heatmap_dir = heatmap_dir
        self._last_logged_step = 0
        self._layers: list[MoELayer] = []
        self._trainer: Optional[L.Trainer] = None
        self._restored: Optional[dict[str, Any]] = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer, self._layers = trainer, pl_module.model.moe_layers()

    def state_dict(self) -> dict[str, Any]:
        if not self._layers:
            return {}
        # Summed over the processes (every process saves): the log reads only the sums, so the counts come
        # back right at any process count.
        return {"counters": self._summed_counters().cpu(), "last_logged_step": self._last_logged_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._restored = state_dict or None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._restored is None:  # a new run (step 0), or a checkpoint without the counts: nothing to log yet
            self._last_logged_step = trainer.global_step
            return
        self._last_logged_step = self._restored["last_logged_step"]
        if trainer.is_global_zero:  # the sums on one process, zeros on the others
            for layer, row in zip(self._layers, self._restored["counters"]):
                restore_usage_counters(layer, row)
        self._restored = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx) -> None:
        self._log_if_due(trainer)  # the step that has just ended (within accumulation the step repeats)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log_if_due(trainer)  # the last step

    def _log_if_due(self, trainer: L.Trainer) -> None:
        step = trainer.global_step
        layers = self._layers
        if not layers or step % self.every_n_steps != 0 or step == self._last_logged_step:
            return
        self._last_logged_step = step
        trainer.lightning_module.stop_if_diverged()  # a non-finite step's routing (NaN entropy) is never logged
        counters = self._summed_counters()
        stats = [stats_from_counters(row) for row in counters]
        for layer, layer_stats in zip(layers, stats):
            if layer.router.selection_bias is not None:  # aux_free: the same on every process
                layer_stats["selection_bias"] = layer.router.selection_bias.tolist()
        # Straight to the loggers: self.log would hold these until Lightning's own log interval.
        for logger in trainer.loggers:
            logger.log_metrics(self._flatten(stats), step=step)
        for layer in layers:
            layer.reset_usage()
        if step % self.heatmap_every_n_steps == 0:
            self._log_heatmap(trainer, [s["share"] for s in stats])

    def _summed_counters(self) -> Tensor:
        """Every MoE layer's counters as one row each, summed over every process: each rank only counts the
        tokens of its own batches."""
        counters = torch.stack([usage_counters(layer) for layer in self._layers])
        return self._trainer.strategy.reduce(counters, reduce_op="sum")

    @staticmethod
    def _flatten(stats: list[dict]) -> dict[str, float]:
        metrics = {}
        for index, layer_stats in enumerate(stats):
            prefix = f"moe/layer{index}"
            for expert, share in enumerate(layer_stats["share"]):
                metrics[f"{prefix}/expert{expert}_share"] = share
            for key in LAYER_METRICS:
                metrics[f"{prefix}/{key}"] = layer_stats[key]
            for expert, bias in enumerate(layer_stats.get("selection_bias", [])):
                metrics[f"{prefix}/expert{expert}_bias"] = bias
        metrics["moe/max_load_violation"] = max(s["max_load_violation"] for s in stats)
        metrics["moe/dropped_fraction"] = sum(s["dropped_fraction"] for s in stats) / len(stats)
        metrics["moe/experts_per_token"] = sum(s["experts_per_token"] for s in stats) / len(stats)
        metrics["moe/router_entropy_ratio"] = sum(s["router_entropy_ratio"] for s in stats) / len(stats)
        return metrics

    def _log_heatmap(self, trainer: L.Trainer, shares: list[list[float]]) -> None:
        if not trainer.is_global_zero:  # the shares are summed over processes: one picture, from rank zero
            return
        step = trainer.global_step
        png = usage_heatmap_png(shares, f"expert usage at step {step:,} (last {self.every_n_steps} steps)")
        with replacing(self.heatmap_dir / f"step_{step:06d}.png") as file:
            file.write(png)
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                from PIL import Image

                logger.log_image(key="moe/usage_heatmap", images=[Image.open(io.BytesIO(png))], step=step)
