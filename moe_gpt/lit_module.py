"""The Lightning wrapper: losses and their logging, AdamW, warmup + cosine schedule."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import torch
from torch import Tensor
from torchmetrics import MeanMetric

from moe_gpt.config import ConfigError, GPTConfig, MoEConfig, OptimConfig
from moe_gpt.model import GPT


class GPTLightningModule(L.LightningModule):
    def __init__(self, model_config: GPTConfig | dict, optim_config: OptimConfig | dict, max_steps: int):
        super().__init__()
        # Plain dicts in the checkpoint, so loading one never needs this code's dataclasses pickled.
        model_config = _as_gpt_config(model_config)
        optim_config = optim_config if isinstance(optim_config, OptimConfig) else OptimConfig(**optim_config)
        self.save_hyperparameters(
            {"model_config": asdict(model_config), "optim_config": asdict(optim_config), "max_steps": max_steps}
        )
        self.optim_config = optim_config
        self.max_steps = max_steps
        self.model = GPT(model_config)
        self.val_loss = MeanMetric()
        self._last_batch_end = None
        self.start_step = 0  # global step this fit started from (non-zero when resumed)
        self.val_history: list[dict[str, float]] = []  # one entry per validation during fit
        self._fit_started = time.perf_counter()
        # One sequence through forward() lets Lightning's model summary report FLOPs and sizes.
        self.example_input_array = torch.zeros(1, model_config.block_size, dtype=torch.long)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits for token ids (B, T); training and validation steps call the GPT directly."""
        return self.model(idx).logits

    def on_train_start(self) -> None:
        self.start_step = self.trainer.global_step
        self._fit_started = time.perf_counter()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        out = self.model(x, y)
        self.log("train/loss", out.loss, prog_bar=True)
        self.log_dict({"train/lm_loss": out.lm_loss, "train/aux_loss": out.aux_loss, "train/z_loss": out.z_loss})
        return out.loss

    def on_train_batch_end(self, outputs, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        # Wall time between consecutive batch ends covers data loading and the optimizer step.
        now = time.perf_counter()
        if self._last_batch_end is not None:
            self.log("train/tokens_per_sec", batch[0].numel() / (now - self._last_batch_end), prog_bar=True)
        self._last_batch_end = now

    def on_validation_start(self) -> None:
        self._last_batch_end = None  # the pause for validation is not training throughput

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        # Pure language-model cross-entropy: the auxiliary router losses never enter val/loss.
        self.val_loss.update(self.model(x, y).lm_loss, weight=y.numel())

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss.compute()
        self.val_loss.reset()
        self.log_dict({"val/loss": val_loss, "val/ppl": torch.exp(val_loss)}, prog_bar=True, sync_dist=True)
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            # For loss-against-tokens and loss-against-time curves (scripts/compare.py).
            self.val_history.append(
                {
                    "step": self.trainer.global_step,
                    "seconds": time.perf_counter() - self._fit_started,
                    "val_loss": val_loss.item(),
                }
            )

    def configure_optimizers(self):
        cfg = self.optim_config
        # Matrices (linear and embedding weights) decay; biases and LayerNorm gains do not.
        params = [p for p in self.model.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        optimizer = torch.optim.AdamW(
            groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=self.device.type == "cuda"
        )
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def _lr_factor(self, step: int) -> float:
        """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
        cfg = self.optim_config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _as_gpt_config(config: GPTConfig | dict) -> GPTConfig:
    if isinstance(config, GPTConfig):
        return config
    return GPTConfig(**{**config, "moe": MoEConfig(**config["moe"])})


def load_model(checkpoint_path: str | Path, map_location: str = "cpu") -> GPT:
    """The GPT inside a training checkpoint, in eval mode (for generation and analysis)."""
    path = Path(checkpoint_path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ folder")
    module = GPTLightningModule.load_from_checkpoint(path, map_location=map_location, weights_only=False)
    return module.model.eval()
