"""The Lightning wrapper: losses and their logging, divergence checks, AdamW, warmup + cosine schedule."""

from __future__ import annotations

import math
from dataclasses import asdict
from typing import Any, Optional

import lightning as L
import torch
import torch.distributed
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import Tensor
from torchmetrics import MeanMetric

from moe_gpt.model.analysis import flops_per_token
from moe_gpt.config import GPTConfig, OptimConfig
from moe_gpt.model.lm_loss import IGNORE_INDEX
from moe_gpt.model.gpt import GPT
from moe_gpt.errors import Diverged
from moe_gpt.training.divergence import NonFiniteWatch
from moe_gpt.training.lightning_internals import logs_training_metrics_at
from moe_gpt.training.sharding import FSDP2Strategy, shard_gpt
from moe_gpt.weights.teacher import TEACHER_RECORD, Teacher


class GPTLightningModule(L.LightningModule):
    def __init__(
        self, model_config: GPTConfig, optim_config: OptimConfig, max_steps: int, teacher: Optional[Teacher] = None
    ):
        super().__init__()
        # Plain dicts in the checkpoint, so loading one never needs this code's dataclasses pickled.
        self.save_hyperparameters(
            {"model_config": asdict(model_config), "optim_config": asdict(optim_config), "max_steps": max_steps}
        )
        self.optim_config = optim_config
        self.max_steps = max_steps
        self.model = GPT(model_config)
        # distill.teacher: a plain attribute, not a submodule, so it is never saved, optimised, wrapped or sharded.
        self.teacher = teacher
        self.val_loss = MeanMetric()
        # Training tokens, all processes together: saved in and restored from checkpoints.
        self.tokens_seen = 0
        self.non_finite = NonFiniteWatch()  # divergence, noted on the device (divergence.py)
        self.train_flops_per_token = flops_per_token(model_config)["train_flops_per_token"]
        # One sequence through forward() lets Lightning's model summary report FLOPs and sizes.
        self.example_input_array = torch.zeros(1, model_config.block_size, dtype=torch.long)

    def forward(self, idx: Tensor) -> Tensor:
        """Logits for token ids (B, T); training and validation steps call the GPT directly."""
        return self.model(idx).logits

    def configure_model(self) -> None:
        """trainer.strategy=fsdp: shard the GPT over the processes (FSDP2); every other strategy keeps it whole."""
        if isinstance(self.trainer.strategy, FSDP2Strategy):
            shard_gpt(self.model, self.trainer.strategy.sharding_mesh, self.trainer.precision)

    def on_fit_start(self) -> None:
        if self.teacher is not None:  # to the student's device, and its dtype under a -true precision
            self.trainer.precision_plugin.convert_module(self.teacher.model.to(self.device))

    def on_train_start(self) -> None:
        self._apply_optim_config()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        soft_targets = self.teacher.soft_targets(x) if self.teacher is not None else None  # under autocast, as below
        out = self.model(x, y, soft_targets=soft_targets)
        step = self.trainer.global_step + 1  # the optimizer step this batch is part of
        self.non_finite.observe_loss(out.loss, step)
        # Counted here, not at batch end: callbacks that checkpoint at batch end run before the module's hook.
        self.tokens_seen += x.numel() * self.trainer.world_size  # every process trained on a batch this size
        # Only the steps Lightning logs read values on the host (and, with several processes, reduce them):
        # logged at every step, each value would make the host wait for the device.
        if logs_training_metrics_at(self.trainer, step):
            self.stop_if_diverged()  # before a non-finite value is logged, and before this step's update
            self._log_losses(out)
            self._log_epochs()
        return out.loss

    def _log_losses(self, out) -> None:
        # Averaged over the processes (each saw as many tokens): the loss of the whole step's batch. Not
        # prog_bar: Lightning would read a progress-bar value on the host after every batch (console.py shows it).
        self.log("train/loss", out.loss, sync_dist=True)
        losses = {"train/lm_loss": out.lm_loss, "train/aux_loss": out.aux_loss, "train/z_loss": out.z_loss}
        if out.kl_loss is not None:  # distilling: lm_loss is the labels' cross-entropy, distill_loss the mix
            losses.update({"train/kl_loss": out.kl_loss, "train/distill_loss": out.distill_loss})
        self.log_dict(losses, sync_dist=True)

    def _log_epochs(self) -> None:
        """Passes over the training split so far, as a fraction (0.03 after a few steps); the loggers
        leave out Lightning's whole-epoch counter (moe_gpt/training/loggers.py)."""
        datamodule = self.trainer.datamodule
        if datamodule is not None and datamodule.train_tokens:
            self.log("train/epochs", self.tokens_seen / datamodule.train_tokens)

    def stop_if_diverged(self) -> None:
        """Raise ``Diverged`` if a step of this session went non-finite (reads the host; with several processes, a
        collective that all of them reach at the same point). Its update and every later one were skipped."""
        self.non_finite.raise_if_seen(
            self.trainer,
            f"lower optim.lr (now {self.optim_config.lr}) or raise optim.warmup_steps; the checkpoints keep the last "
            "finite weights",
        )

    def on_before_optimizer_step(self, optimizer) -> None:
        """Once per optimizer step, after all accumulated batches: skip the update on the device from the first
        non-finite step on (divergence.py), and move aux_free's selection biases."""
        skip = self._skip_on_device(optimizer)
        self._update_selection_biases(keep=1.0 - skip)

    def _skip_on_device(self, optimizer) -> Tensor:
        # Under fp16's gradient scaler, overflowing gradients are routine: it skips those steps itself (setting
        # found_inf in place of this one), and only a non-finite loss is divergence.
        if self._gradient_scaler() is None:
            gradients = [p.grad for p in self.model.parameters() if p.grad is not None]
            self.non_finite.observe_gradients(gradients, self.trainer.global_step + 1)
        optimizer.found_inf = self.non_finite.skip_updates(self.device)  # read by fused AdamW, on the device
        return optimizer.found_inf

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip the global gradient norm to ``trainer.gradient_clip_val`` (0: no clipping).

        Lightning's mixed-precision plugin refuses to clip for a fused optimizer (it takes fused to mean that a
        gradient scaler unscales inside the step), so under it the norm is clipped here, as Lightning's other
        plugins do it; under fp16's scaler the gradients are unscaled first, and the scaler's step then leaves them.
        """
        if not isinstance(self.trainer.precision_plugin, MixedPrecision):
            return super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)
        if not gradient_clip_val:
            return
        scaler = self._gradient_scaler()
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), gradient_clip_val)

    def _gradient_scaler(self) -> Optional[torch.amp.GradScaler]:
        """fp16's gradient scaler (``16-mixed`` on a GPU), else None."""
        plugin = self.trainer.precision_plugin
        return plugin.scaler if isinstance(plugin, MixedPrecision) else None

    def _update_selection_biases(self, keep: Tensor) -> None:
        """aux_free balancing: every MoE layer moves its selection bias by this step's load, summed over processes
        so every process applies the same update (a skipped step's load counts as none: no move)."""
        layers = [layer for layer in self.model.moe_layers() if layer.router.selection_bias is not None]
        if not layers:
            return
        loads = torch.stack([layer.load_since_bias_update for layer in layers]) * keep
        if self.trainer.world_size > 1:
            # torch's all-reduce, queued on the device; Lightning's strategy.reduce adds a barrier, which blocks the host.
            torch.distributed.all_reduce(loads)
        for layer, load in zip(layers, loads):
            layer.update_selection_bias(load)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        # Pure language-model cross-entropy (the router losses never enter val/loss), averaged
        # over the targets that count: lm_loss is already a mean over them.
        self.val_loss.update(self.model(x, y).lm_loss, weight=(y != IGNORE_INDEX).sum())

    def on_validation_epoch_end(self) -> None:
        val_loss = self.val_loss.compute()  # over every process's batches
        self.val_loss.reset()
        self.log_dict({"val/loss": val_loss, "val/ppl": torch.exp(val_loss)}, prog_bar=True, sync_dist=True)
        self._log_epochs()

    def on_train_end(self) -> None:
        self.stop_if_diverged()  # a bad step after the last logging step is not left unreported

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.stop_if_diverged()  # a checkpoint holds no weights trained past a non-finite step
        _refuse_non_finite_weights(checkpoint["state_dict"], self.trainer.global_step)
        checkpoint["progress"] = {"tokens_seen": self.tokens_seen}
        if self.teacher is not None:  # which teacher, not its weights: a resume reloads and checks it
            checkpoint[TEACHER_RECORD] = self.teacher.fingerprint

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.tokens_seen = checkpoint.get("progress", {}).get("tokens_seen", 0)

    def configure_optimizers(self):
        cfg = self.optim_config
        # Matrices (linear and embedding weights) decay; biases and LayerNorm gains do not.
        params = [p for p in self.model.parameters() if p.requires_grad]
        # The names label the logged learning rates: lr/with_weight_decay, lr/without_weight_decay.
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        for group, name in zip(groups, ("with_weight_decay", "without_weight_decay")):
            group["name"] = name
        # Fused on every device: one kernel for all parameters, its step count on the device, and an update
        # skipped there when found_inf is set (divergence.py).
        optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, self._lr_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "name": "lr"}}

    def _apply_optim_config(self) -> None:
        """Make the optimizer follow this run's ``optim`` settings, also after a resume.

        A resumed optimizer and scheduler come back with the values of the run that saved them, so
        ``optim.lr=...`` on the command line would be silently ignored. Here the configured values
        win (resume_changes.py logs each change). (warmup_steps, min_lr_ratio and max_steps need
        nothing: the schedule reads them from the config at every step.)
        """
        cfg = self.optim_config
        optimizer, schedule = self.optimizers(use_pl_optimizer=False), self.lr_schedulers()
        for group, decay in zip(optimizer.param_groups, (cfg.weight_decay, 0.0)):
            group.update(initial_lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=decay)
            group["lr"] = cfg.lr * self._lr_factor(schedule.last_epoch)
        schedule.base_lrs = [cfg.lr] * len(optimizer.param_groups)

    def _lr_factor(self, step: int) -> float:
        """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
        cfg = self.optim_config
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, self.max_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _refuse_non_finite_weights(state_dict: dict[str, Tensor], step: int) -> None:
    """No checkpoint may hold NaN or inf: best.ckpt and last.ckpt keep the last finite state instead."""
    for name, tensor in state_dict.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise Diverged(
                f"training diverged: {name} holds non-finite values at step {step}; lower optim.lr or raise "
                "optim.warmup_steps; the checkpoints keep the last finite weights",
                step,
            )
