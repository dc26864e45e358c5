"""What a resumed run may change: one rule for every key of the config.

``python train.py hydra.run.dir=X resume=last <overrides>`` continues X's run with these overrides
applied on top of its own. Each key of ``RunConfig`` is in exactly one list below (a test checks
that a new key cannot be added without a rule):

- ``REFUSED``: the saved weights or the batch order depend on it, so the run could not continue as
  itself. The command stops with one line, before anything is written.
- ``APPLIED``: takes effect from the resumed step on; each change is logged.
- ``NOT_COMPARED``: describes this command, not the run (where it runs, what it resumes from).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from moe_gpt.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

WEIGHTS = "the saved weights were trained with it"
BATCH_ORDER = "it fixes which batches the run sees, in which order"

REFUSED: dict[str, str] = {
    **{
        f"model.{key}": WEIGHTS
        for key in ("block_size", "vocab_size", "n_layer", "n_head", "n_embd", "bias", "use_moe")
    },
    **{
        f"model.moe.{key}": WEIGHTS
        for key in (
            "num_experts", "hidden_size", "every_n_layers", "first_k_dense", "num_shared_experts",
            "activation",  # the experts' weights were learnt for this nonlinearity
            "router",  # noisy adds a noise projection; sigmoid and softmax give the logits other meanings
            "load_balance",  # aux_free keeps a learnt per-expert bias, the others none
        )
    },  # fmt: skip
    **{
        f"data.{key}": BATCH_ORDER
        for key in (
            "corpus", "name", "paths", "hub_path", "hub_config", "hub_split", "hub_revision", "text_field",
            "streaming", "max_documents", "val_fraction", "encoding_errors",
            "batch_size",  # the saved data-loader position counts batches of this size
        )
    },  # fmt: skip
    "seed": BATCH_ORDER,
    "distill.teacher": "the student was trained towards that teacher's predictions (its file is checked on resume)",
}
APPLIED: tuple[str, ...] = (
    *(
        f"model.moe.{key}"
        for key in (
            "top_k", "dropout", "normalize_top_k", "num_groups", "topk_groups", "top_p", "min_experts_per_token",
            "aux_loss_coef", "z_loss_coef", "bias_update_rate", "capacity_factor", "eval_capacity_factor",
            "experts_impl", "growth_noise",
        )
    ),  # fmt: skip
    "model.dropout",
    "model.loss_chunk_size",
    "data.cache_dir",
    "data.tokenizer_dir",
    "data.num_workers",
    *(f"optim.{key}" for key in ("lr", "min_lr_ratio", "weight_decay", "beta1", "beta2", "eps", "warmup_steps")),
    *(
        f"trainer.{key}"
        for key in (
            "accelerator", "devices", "num_nodes", "strategy", "precision", "max_steps", "val_check_interval",
            "limit_val_batches", "gradient_clip_val", "accumulate_grad_batches", "log_every_n_steps",
            "deterministic", "num_sanity_val_steps", "enable_model_summary", "expert_parallel",
        )
    ),  # fmt: skip
    "checkpoint.every_n_steps",
    "checkpoint.save_weights_only",
    *(
        f"logger.{key}"
        for key in ("kind", "project", "mode", "group", "expert_stats_every_n_steps", "heatmap_every_n_steps")
    ),
    *(f"compare.{key}" for key in ("variants", "seeds", "budgets", "match", "eval_data")),
    "compile",
    "distill.alpha",  # the loss's weights, like the router losses' coefficients
    "distill.temperature",
)
# distill.init, like init_from, chooses the first weights only: a resume continues the checkpoint's.
NOT_COMPARED: tuple[str, ...] = ("run_dir", "resume", "init_from", "distill.init")


def config_keys(schema: type = RunConfig, prefix: str = "") -> list[str]:
    """Every leaf key of the config, dotted as on the command line (``model.moe.top_k``)."""
    keys = []
    for item in fields(schema):
        default = item.default_factory() if callable(item.default_factory) else item.default
        if is_dataclass(default):
            keys += config_keys(type(default), f"{prefix}{item.name}.")
        else:
            keys.append(f"{prefix}{item.name}")
    return keys


def flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def effective(flat: dict[str, Any]) -> dict[str, Any]:
    """``model.moe.hidden_size`` None means 4 * n_embd: the same width written either way is no change."""
    if flat.get("model.moe.hidden_size") is None and "model.n_embd" in flat:
        flat["model.moe.hidden_size"] = 4 * flat["model.n_embd"]
    return flat


def check_changes(saved: dict[str, Any], cfg: RunConfig, checkpoint: Path, resume: str) -> list[str]:
    """Refuse the first change to a ``REFUSED`` key; the others, as log lines ``key: old -> new``.

    ``saved`` is the resumed run's config as a dict; a key it lacks (a checkpoint from an older
    version) counts as unchanged.
    """
    before, now = effective(flatten(saved)), effective(flatten(asdict(cfg)))
    dense = not before.get("model.use_moe", True) and not cfg.model.use_moe  # its model.moe settings are unused
    changed = [
        key
        for key in config_keys()
        if key in before
        and key not in NOT_COMPARED
        and not (dense and key.startswith("model.moe."))
        and before[key] != now[key]
    ]
    for key in changed:
        if key in REFUSED:
            raise ConfigError(
                f"resume={resume}: {key}={now[key]!r} but the run being resumed has {key}={before[key]!r}, and "
                f"{REFUSED[key]}; drop the override, or start a new run from the weights with init_from={checkpoint}"
            )
    return [f"{key}: {before[key]!r} -> {now[key]!r}" for key in changed]


def log_applied_changes(changes: list[str], step: int) -> None:
    for change in changes:
        log.info("resumed run changes %s (from step %d on)", change, step)
