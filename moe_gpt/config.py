"""Typed configuration: one dataclass per config group.

Hydra merges the YAML presets in ``configs/`` and the command line into these schemas
(``register_schema``), so a misspelled key or a wrong type is an error
that names the key. ``__post_init__`` checks values as soon as a config object is built,
before any data is read or any weight is allocated; each message names the command-line
key to change.

The defaults here are the only ones, and they are the default run (``python train.py`` with no
arguments): each YAML option sets just the keys where it differs from them, so the two cannot
disagree (``tests/test_config.py`` checks both).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Lightning's precision settings (its aliases 32, 16, bf16 and 64 included).
PRECISIONS = ("32-true", "bf16-mixed", "16-mixed", "bf16-true", "16-true", "64-true", "32", "16", "bf16", "64")
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
# The experts' activations, the one list of their names: model/expert_kernels.py keys its kernels by it.
ACTIVATIONS = ("gelu", "relu", "swish", "tanh")
LOAD_BALANCE_TYPES = ("switch", "variance", "aux_free", "none")
ROUTERS = ("softmax", "noisy", "sigmoid")
EXPERTS_IMPLS = ("auto", "grouped_mm", "blocked", "loop")
DISTILL_INITS = ("scratch", "experts")


class ConfigError(ValueError):
    """A setting that cannot work; the one-line message names the key and what to do."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _check_positive(**values: float) -> None:
    for key, value in values.items():
        _require(value > 0, f"{key}={value} must be positive")


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _require(value in choices, f"{key}={value!r} is unknown; choose one of {', '.join(choices)}")


def _check_dropout(key: str, value: float) -> None:
    _require(0.0 <= value < 1.0, f"{key}={value} must be in [0, 1)")


def project_path(path: str) -> str:
    """Relative paths count from the project root, so runs started anywhere share one cache."""
    return str(PROJECT_ROOT / Path(path).expanduser())


@dataclass
class MoEConfig:
    """The Mixture-of-Experts feed-forward layer (used when ``GPTConfig.use_moe``).

    The README's "MoE settings" table gives each key's paper.
    """

    num_experts: int = 8  # E: routed experts per MoE layer
    top_k: int = 2  # experts each token is routed to (the most, with top_p)
    activation: str = "gelu"  # gelu (tanh approximation, as GPT-2) | relu | swish (SiLU) | tanh
    hidden_size: Optional[int] = None  # expert FFN width; None -> 4 * n_embd
    dropout: Optional[float] = None  # dropout on the routed experts' combined output; None -> the model's dropout
    every_n_layers: int = 1  # MoE in blocks where (index + 1) % N == 0; 1 = every block
    first_k_dense: int = 0  # the first k blocks keep a dense MLP (DeepSeekMoE)
    normalize_top_k: bool = True  # renormalise the chosen experts' routing weights to sum to 1
    router: str = "softmax"  # softmax (top-k of a softmax) | noisy (Shazeer 2017) | sigmoid (DeepSeek-V3)
    num_groups: int = 1  # group-limited routing: experts split into this many groups ...
    topk_groups: int = 1  # ... and each token picks experts only inside its best topk_groups groups
    top_p: Optional[float] = None  # dynamic routing: experts in order of probability until their sum reaches p
    min_experts_per_token: int = 1  # with top_p: never fewer experts than this
    load_balance: str = "switch"  # switch (E * sum_i f_i P_i) | variance (of mean probs around 1/E) | aux_free | none
    aux_loss_coef: float = 0.01  # weight of the load-balance loss (with aux_free: of an added switch loss)
    z_loss_coef: float = 0.001  # weight of the router z-loss in the training loss
    bias_update_rate: float = 0.001  # aux_free: step of the per-expert selection bias per optimizer step
    capacity_factor: Optional[float] = None  # slots per expert = ceil(factor * tokens * top_k / E); None: dropless
    eval_capacity_factor: Optional[float] = None  # the same outside training; None: capacity_factor
    num_shared_experts: int = 0  # always-on experts of hidden_size each, added to the routed ones (DeepSeekMoE)
    experts_impl: str = "auto"  # auto | grouped_mm | blocked (moe_gpt/model/expert_kernels.py) | loop (the reference)
    growth_noise: float = 0.01  # progressive growth (init_from fewer experts): copies get noise of this x each row's std

    def __post_init__(self) -> None:
        _require(self.num_experts >= 1, f"model.moe.num_experts={self.num_experts} must be >= 1")
        _require(
            1 <= self.top_k <= self.num_experts,
            f"model.moe.top_k={self.top_k} must be between 1 and model.moe.num_experts={self.num_experts}",
        )
        _check_choice("model.moe.activation", self.activation, ACTIVATIONS)
        _check_choice("model.moe.router", self.router, ROUTERS)
        _check_choice("model.moe.experts_impl", self.experts_impl, EXPERTS_IMPLS)
        _check_choice("model.moe.load_balance", self.load_balance, LOAD_BALANCE_TYPES)
        _check_positive(**{"model.moe.every_n_layers": self.every_n_layers})
        _require(self.first_k_dense >= 0, f"model.moe.first_k_dense={self.first_k_dense} must be >= 0")
        if self.hidden_size is not None:
            _check_positive(**{"model.moe.hidden_size": self.hidden_size})
        if self.dropout is not None:
            _check_dropout("model.moe.dropout", self.dropout)
        for key in ("aux_loss_coef", "z_loss_coef", "bias_update_rate", "growth_noise"):
            value = getattr(self, key)
            _require(math.isfinite(value) and value >= 0, f"model.moe.{key}={value} must be a finite number >= 0")
        _require(self.num_shared_experts >= 0, f"model.moe.num_shared_experts={self.num_shared_experts} must be >= 0")
        self._check_groups()
        self._check_top_p()
        for key in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, key)
            _require(
                value is None or (math.isfinite(value) and value > 0),
                f"model.moe.{key}={value} must be a positive number, or null for no token dropping",
            )

    def _check_groups(self) -> None:
        groups = self.num_groups
        _require(groups >= 1, f"model.moe.num_groups={groups} must be >= 1")
        _require(
            self.num_experts % groups == 0,
            f"model.moe.num_groups={groups} must divide model.moe.num_experts={self.num_experts}",
        )
        _require(
            1 <= self.topk_groups <= groups,
            f"model.moe.topk_groups={self.topk_groups} must be between 1 and model.moe.num_groups={groups}",
        )
        reachable = self.topk_groups * (self.num_experts // groups)
        _require(
            self.top_k <= reachable,
            f"model.moe.top_k={self.top_k} is more than the {reachable} experts in model.moe.topk_groups="
            f"{self.topk_groups} groups; raise model.moe.topk_groups or lower model.moe.top_k",
        )

    def _check_top_p(self) -> None:
        if self.top_p is not None:
            _require(0.0 < self.top_p <= 1.0, f"model.moe.top_p={self.top_p} must be in (0, 1], or null for top_k")
        _require(
            1 <= self.min_experts_per_token <= self.top_k,
            f"model.moe.min_experts_per_token={self.min_experts_per_token} must be between 1 and "
            f"model.moe.top_k={self.top_k}",
        )

    def capacity_factor_for(self, training: bool) -> Optional[float]:
        if training or self.eval_capacity_factor is None:
            return self.capacity_factor
        return self.eval_capacity_factor


@dataclass
class GPTConfig:
    """A GPT-2 whose blocks use a dense MLP or, with ``use_moe``, an MoE layer.

    The defaults are the default run's model: ``model=moe`` at ``model/size=mini``, a CPU-sized
    GPT-2 that trains visibly in minutes on 2 cores (most of its compute is the output layer).
    """

    block_size: int = 128  # context length in tokens
    vocab_size: int = 50257  # GPT-2 BPE; padded up to a multiple of 64 inside the model
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads; must divide n_embd
    n_embd: int = 128  # model width
    dropout: float = 0.0  # on attention weights, residual branches and embeddings; 0: short runs do not overfit
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    use_moe: bool = True  # MoE layers as the FFNs (model=moe); False: the dense GPT-2 MLP in every block (model=dense)
    moe: MoEConfig = field(default_factory=MoEConfig)  # the MoE layers' settings, used when use_moe
    # Tokens per chunk when the training loss runs the output layer and cross-entropy together
    # (moe_gpt/model/lm_loss.py), never holding the full (tokens x vocabulary) logits; 0: the plain path.
    loss_chunk_size: int = 512

    def __post_init__(self) -> None:
        _require(
            self.loss_chunk_size >= 0,
            f"model.loss_chunk_size={self.loss_chunk_size} must be >= 0 (0 computes the loss from full logits)",
        )
        _check_positive(
            **{
                "model.block_size": self.block_size,
                "model.vocab_size": self.vocab_size,
                "model.n_layer": self.n_layer,
                "model.n_head": self.n_head,
                "model.n_embd": self.n_embd,
            }
        )
        _require(
            self.n_embd % self.n_head == 0,
            f"model.n_embd={self.n_embd} must be divisible by model.n_head={self.n_head}",
        )
        _check_dropout("model.dropout", self.dropout)
        _require(
            not self.use_moe or self.num_moe_layers > 0,
            f"model.moe.every_n_layers={self.moe.every_n_layers} and model.moe.first_k_dense={self.moe.first_k_dense} "
            f"leave no MoE block among model.n_layer={self.n_layer}; lower them or use model=dense",
        )

    @property
    def padded_vocab_size(self) -> int:
        # A multiple of 64 keeps the output matmul on fast kernel tiles (nanoGPT's 50304).
        return math.ceil(self.vocab_size / 64) * 64

    @property
    def ffn_hidden_size(self) -> int:
        return self.moe.hidden_size or 4 * self.n_embd

    @property
    def expert_dropout(self) -> float:
        return self.dropout if self.moe.dropout is None else self.moe.dropout

    def is_moe_layer(self, layer_index: int) -> bool:
        moe = self.moe
        return self.use_moe and layer_index >= moe.first_k_dense and (layer_index + 1) % moe.every_n_layers == 0

    @property
    def num_moe_layers(self) -> int:
        return sum(self.is_moe_layer(i) for i in range(self.n_layer))


# Below this many token-slots per expert and optimizer step (on average, per process) an expert's gradient
# comes from a handful of tokens.
MIN_SLOTS_PER_EXPERT = 32


def config_warnings(config: GPTConfig) -> list[str]:
    """Settings of the model that run but are probably not what the user wants, each saying what to change."""
    if not config.use_moe:
        return []
    moe, warnings = config.moe, []
    if moe.num_experts < 2:
        warnings.append(
            "model.moe.num_experts=1: an MoE layer with one expert is a dense FFN with a router; use model=dense "
            "or more experts"
        )
    if moe.top_k == moe.num_experts and moe.num_experts > 1:
        warnings.append(
            f"model.moe.top_k={moe.top_k} equals num_experts: every token uses every expert, so nothing is sparse; "
            "lower model.moe.top_k"
        )
    return warnings


def run_warnings(cfg: RunConfig) -> list[str]:
    """``config_warnings`` for the model, plus settings of the run that work against each other."""
    warnings = config_warnings(cfg.model)
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:
        warnings.append(
            f"optim.warmup_steps={cfg.optim.warmup_steps} is longer than trainer.max_steps={cfg.trainer.max_steps}: "
            f"the learning rate never reaches optim.lr; set optim.warmup_steps={max(1, cfg.trainer.max_steps // 5)} "
            "(a fifth of the run, as in the default run)"
        )
    slots = slots_per_expert(cfg)
    if cfg.model.use_moe and slots < MIN_SLOTS_PER_EXPERT:
        moe = cfg.model.moe
        warnings.append(
            f"model.moe.num_experts={moe.num_experts} with top_k={moe.top_k}: each expert gets {slots:.0f} "
            f"token-slots per optimizer step on average (fewer than {MIN_SLOTS_PER_EXPERT}), too few to learn from; "
            "raise data.batch_size or trainer.accumulate_grad_batches, or lower model.moe.num_experts"
        )
    return warnings


def slots_per_expert(cfg: RunConfig) -> float:
    """Token-slots (token x chosen expert) each expert of an MoE layer gets per optimizer step, on average,
    in one process."""
    tokens = cfg.data.batch_size * cfg.model.block_size * cfg.trainer.accumulate_grad_batches
    return tokens * cfg.model.moe.top_k / cfg.model.moe.num_experts


@dataclass
class DataConfig:
    """Where the text comes from, how it is tokenised and cached, and how it is batched."""

    corpus: str = "stdlib"  # stdlib (Python's own library, no download) | text (local files) | hub
    name: str = "stdlib"  # label for the token cache and the logs
    paths: list[str] = field(default_factory=list)  # corpus=text: files, directories or globs
    hub_path: Optional[str] = None  # corpus=hub: dataset name on the Hugging Face hub
    hub_config: Optional[str] = None  # corpus=hub: dataset configuration name
    hub_split: str = "train"  # corpus=hub: split to read documents from
    hub_revision: Optional[str] = None  # corpus=hub: pin a dataset revision
    text_field: str = "text"  # column holding the document text
    streaming: bool = False  # corpus=hub: stream instead of downloading the whole split
    max_documents: Optional[int] = None  # stop after this many documents (required when streaming)
    val_fraction: float = 0.02  # share of documents held out for validation
    encoding_errors: str = "strict"  # undecodable bytes in local files: strict (error) | replace (count logged)
    cache_dir: str = "data/tokens"  # token arrays, keyed by corpus and tokenizer (relative: to the project root)
    tokenizer_dir: str = "data/tokenizer"  # offline GPT-2 BPE ranks, from scripts/fetch_tokenizer.py (same)
    batch_size: int = 16  # sequences per batch, per process
    num_workers: int = 0  # DataLoader workers; reading a memory map is cheap, 0 is usually fastest

    def __post_init__(self) -> None:
        self.cache_dir, self.tokenizer_dir = project_path(self.cache_dir), project_path(self.tokenizer_dir)
        _require(
            self.corpus in ("stdlib", "text", "hub"),
            f"data.corpus={self.corpus!r} is unknown; choose stdlib, text or hub",
        )
        _require(
            self.corpus != "text" or len(self.paths) > 0,
            "data.corpus=text needs data.paths, e.g. data.paths=[notes/*.txt]",
        )
        _require(
            self.corpus != "hub" or bool(self.hub_path),
            "data.corpus=hub needs data.hub_path, e.g. data.hub_path=roneneldan/TinyStories",
        )
        _require(
            not self.streaming or self.max_documents is not None,
            "data.streaming=true needs data.max_documents so the corpus has an end",
        )
        _require(0.0 < self.val_fraction < 1.0, f"data.val_fraction={self.val_fraction} must be in (0, 1)")
        _require(
            self.encoding_errors in ("strict", "replace"),
            f"data.encoding_errors={self.encoding_errors!r} is unknown; choose strict or replace",
        )
        _check_positive(**{"data.batch_size": self.batch_size})
        if self.max_documents is not None:
            _check_positive(**{"data.max_documents": self.max_documents})
        _require(self.num_workers >= 0, f"data.num_workers={self.num_workers} must be >= 0")


@dataclass
class OptimConfig:
    """AdamW with linear warmup then cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr_ratio: float = 0.1  # the cosine decay ends at min_lr_ratio * lr at trainer.max_steps
    weight_decay: float = 0.1  # applied to matrices (linear and embedding weights); biases and norms never decay
    beta1: float = 0.9  # AdamW's decay rate of the gradient mean
    beta2: float = 0.95  # AdamW's decay rate of the squared-gradient mean
    eps: float = 1e-8  # AdamW's denominator term, against division by ~0
    warmup_steps: int = 50  # optimizer steps of linear warmup from lr / warmup_steps to lr

    def __post_init__(self) -> None:
        _require(math.isfinite(self.lr) and self.lr > 0, f"optim.lr={self.lr} must be a finite positive number")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"optim.min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(self.warmup_steps >= 0, f"optim.warmup_steps={self.warmup_steps} must be >= 0")
        _require(
            math.isfinite(self.weight_decay) and self.weight_decay >= 0,
            f"optim.weight_decay={self.weight_decay} must be a finite number >= 0",
        )
        for key, beta in (("optim.beta1", self.beta1), ("optim.beta2", self.beta2)):
            _require(0.0 <= beta < 1.0, f"{key}={beta} must be in [0, 1)")
        _require(math.isfinite(self.eps) and self.eps > 0, f"optim.eps={self.eps} must be a finite positive number")


@dataclass
class TrainerConfig:
    """Passed as keyword arguments to ``lightning.Trainer``; the names are Lightning's.

    The defaults are ``trainer=cpu``: one CPU process, sized so the default run takes minutes on 2 cores.
    """

    accelerator: str = "cpu"  # cpu | gpu | mps | auto
    devices: Any = 1  # devices per node: a number, a list of ids, -1 (all) or auto; DDP when more than 1
    num_nodes: int = 1  # machines; each runs `devices` processes
    strategy: str = "auto"  # auto | ddp | fsdp (FSDP2: weights sharded, docs/gpu.md) | Lightning's other names
    precision: str = "32-true"  # 32-true | bf16-mixed | 16-mixed | bf16-true | 64-true ...; bf16 is slow on most CPUs
    max_steps: int = 250  # optimizer steps
    val_check_interval: int = 50  # validate every N training batches
    limit_val_batches: int = 10  # batches per validation
    gradient_clip_val: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    accumulate_grad_batches: int = 1  # batches whose gradients add up to one optimizer step
    log_every_n_steps: int = 5  # training metrics are logged every N steps
    deterministic: bool = False  # deterministic torch algorithms only (reproducible, slower)
    num_sanity_val_steps: int = 2  # validation batches run before training to catch a broken val step; 0 skips, -1 all
    enable_model_summary: bool = True  # print the layer table with sizes and FLOPs when training starts
    expert_parallel: int = 1  # N > 1: each process holds E/N experts of each MoE layer (fsdp only, docs/gpu.md)

    def __post_init__(self) -> None:
        _check_positive(
            **{
                "trainer.max_steps": self.max_steps,
                "trainer.val_check_interval": self.val_check_interval,
                "trainer.limit_val_batches": self.limit_val_batches,
                "trainer.accumulate_grad_batches": self.accumulate_grad_batches,
                "trainer.log_every_n_steps": self.log_every_n_steps,
                "trainer.num_nodes": self.num_nodes,
                "trainer.expert_parallel": self.expert_parallel,
            }
        )
        _require(
            self.num_sanity_val_steps >= -1,
            f"trainer.num_sanity_val_steps={self.num_sanity_val_steps} must be 0 (skip), a positive number or -1 (all)",
        )
        _require(
            self.precision in PRECISIONS,
            f"trainer.precision={self.precision!r} is unknown; choose one of {', '.join(PRECISIONS)}",
        )
        _require(
            _valid_devices(self.devices),
            f"trainer.devices={self.devices!r} must be a positive number or auto (on GPUs also a list of device ids "
            "such as [0,1], or -1 for every GPU)",
        )
        if self.accelerator == "cpu":
            check_cpu_devices(self.devices, "with trainer.accelerator=cpu")
        # Lightning skips clipping for a value <= 0 and fails on NaN mid-run; inf clips nothing (or, with an
        # infinite norm, turns every gradient into NaN).
        _require(
            math.isfinite(self.gradient_clip_val) and self.gradient_clip_val >= 0,
            f"trainer.gradient_clip_val={self.gradient_clip_val} must be a finite number >= 0 (0 turns clipping off)",
        )


def check_cpu_devices(devices: Any, where: str) -> None:
    """On the CPU Lightning counts processes and takes no device ids: a positive number or auto only."""
    count = str(devices).strip()
    _require(
        count == "auto" or (count.isdigit() and int(count) >= 1),
        f"trainer.devices={devices!r} does not work {where}: -1 and device ids are for GPUs; give the number of "
        "CPU processes, e.g. trainer.devices=2, or train on GPUs with trainer=gpu",
    )


def _valid_devices(devices: Any) -> bool:
    """What Lightning accepts: auto, -1, a positive count, or device ids as a list or as "0,1"."""
    if devices in ("auto", -1, "-1"):
        return True
    if isinstance(devices, bool) or isinstance(devices, float):
        return False
    if isinstance(devices, int):
        return devices >= 1
    if isinstance(devices, str):
        if devices.isdigit():
            return int(devices) >= 1
        devices = [part for part in devices.split(",") if part.strip()]
    ids = [str(device).strip() for device in devices]
    return bool(ids) and all(device.isdigit() for device in ids)


@dataclass
class CheckpointConfig:
    """When ``checkpoints/last.ckpt`` is written; ``best.ckpt`` follows validation."""

    every_n_steps: int = 100  # optimizer steps between last.ckpt writes (also written at the end and on SIGTERM/SIGINT)
    # true: best.ckpt and last.ckpt hold the weights without AdamW's state (about a third of the size); such a run
    # cannot be continued with resume=last, except after a stop signal, whose last.ckpt is always complete
    save_weights_only: bool = False

    def __post_init__(self) -> None:
        _check_positive(**{"checkpoint.every_n_steps": self.every_n_steps})


@dataclass
class LoggerConfig:
    """Where metrics go: W&B (offline unless asked), CSV, or nowhere."""

    kind: str = "wandb"  # wandb | csv | none
    project: str = "moe-gpt"  # W&B project
    mode: str = "offline"  # offline (no account needed; `wandb sync` later) | online (needs `wandb login`)
    group: Optional[str] = None  # W&B group, e.g. one sweep or comparison
    expert_stats_every_n_steps: int = 10  # per-layer expert usage, entropy, max-load violation
    heatmap_every_n_steps: int = 50  # layer x expert usage image: <run_dir>/usage_heatmaps/step_N.png and W&B

    def __post_init__(self) -> None:
        _require(
            self.kind in ("wandb", "csv", "none"), f"logger.kind={self.kind!r} is unknown; choose wandb, csv or none"
        )
        _require(self.mode in ("offline", "online"), f"logger.mode={self.mode!r} is unknown; choose offline or online")
        _check_positive(
            **{
                "logger.expert_stats_every_n_steps": self.expert_stats_every_n_steps,
                "logger.heatmap_every_n_steps": self.heatmap_every_n_steps,
            }
        )


@dataclass
class CompareConfig:
    """What ``scripts/compare.py`` compares (its flags override these); ``train.py`` ignores them."""

    variants: list[str] = field(default_factory=lambda: ["dense", "moe:4:1", "moe:8:2"])  # dense | moe:E:K[:...]
    seeds: int = 1  # runs per variant and budget, seeds seed, seed+1, ...; 3 or more for a confidence interval
    budgets: list[str] = field(default_factory=lambda: ["tokens"])  # tokens (equal steps) | time=<minutes>
    match: str = "active"  # active | total | none: expert width matched on active or total parameters
    eval_data: Optional[str] = None  # a data option or local file/folder every best checkpoint is evaluated on

    def __post_init__(self) -> None:
        _require(
            self.seeds >= 1,
            f"compare.seeds={self.seeds} (--seeds) must be at least 1; 3 or more give a confidence interval worth reading",
        )


@dataclass
class DistillConfig:
    """Knowledge distillation: the student (``model``) learns from a frozen teacher checkpoint too.

    The training loss is alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T), where _T means
    the logits divided by T (Hinton et al., 2015); validation stays the student's plain cross-entropy.
    """

    teacher: Optional[str] = None  # a training checkpoint (.ckpt) of the same tokenizer; null: no distillation
    alpha: float = 0.5  # weight of the labels' cross-entropy; 1 - alpha weighs the teacher's soft targets
    temperature: float = 2.0  # T: both models' logits are divided by T before the KL; its gradient is scaled by T^2
    init: str = "scratch"  # scratch | experts: a dense student starts from the teacher (each FFN gathered from its experts)

    def __post_init__(self) -> None:
        _require(
            math.isfinite(self.alpha) and 0.0 <= self.alpha <= 1.0, f"distill.alpha={self.alpha} must be in [0, 1]"
        )
        _require(
            math.isfinite(self.temperature) and self.temperature > 0,
            f"distill.temperature={self.temperature} must be a finite positive number",
        )
        _check_choice("distill.init", self.init, DISTILL_INITS)
        _require(
            self.init == "scratch" or self.teacher is not None,
            f"distill.init={self.init} gathers the teacher's weights; set distill.teacher=<checkpoint>",
        )


@dataclass
class RunConfig:
    """The whole run: what ``train.py`` receives after Hydra composed it."""

    model: GPTConfig = field(default_factory=GPTConfig)  # model=moe|dense and model/size=mini|gpt2_small
    data: DataConfig = field(default_factory=DataConfig)  # data=stdlib|text|shakespeare|...
    optim: OptimConfig = field(default_factory=OptimConfig)  # no preset group: optim.* on the command line
    trainer: TrainerConfig = field(default_factory=TrainerConfig)  # trainer=cpu|gpu
    logger: LoggerConfig = field(default_factory=LoggerConfig)  # logger=wandb|csv|none
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoint=default
    compare: CompareConfig = field(default_factory=CompareConfig)  # scripts/compare.py; set by experiment presets
    distill: DistillConfig = field(default_factory=DistillConfig)  # distill.teacher=<ckpt>: learn from a teacher too
    seed: int = 1337  # seeds Python, NumPy and torch, and the data shuffling
    run_dir: str = "outputs/run"  # set by Hydra to its job directory (configs/config.yaml)
    resume: Optional[str] = None  # checkpoint path, or "last" for <run_dir>/checkpoints/last.ckpt (set hydra.run.dir)
    compile: bool = False  # torch.compile the model (GPU; slow to start on CPU)
    init_from: Optional[str] = None  # start from a .ckpt or an HF GPT-2 dir/hub name (dense -> MoE: upcycled)

    def __post_init__(self) -> None:
        _require(0 <= self.seed <= MAX_SEED, f"seed={self.seed} must be between 0 and {MAX_SEED}")
        _require(
            self.distill.init == "scratch" or self.init_from is None,
            f"distill.init={self.distill.init} and init_from={self.init_from} both choose the first weights; drop one",
        )


def register_schema() -> None:
    """Make ``RunConfig`` the schema that ``configs/config.yaml`` composes onto."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="run_schema", node=RunConfig)
