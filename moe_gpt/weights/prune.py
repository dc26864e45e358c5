"""Expert pruning: drop the experts a corpus barely uses, keeping everything else of the model.

Usage is measured as the share of token-slots each expert gets on some text (``measure``); each MoE
layer keeps its ``keep`` most-used experts (``experts_to_keep``), and the model is rebuilt with
``num_experts=keep`` and those experts' weights and router rows (``prune_experts``). The result is
saved as a fresh training checkpoint (``pruned_checkpoint``): a starting point for ``init_from``,
generation and analysis, not a run to resume.

What stays exact: if no token chose a pruned expert, every token keeps its experts and, with
``normalize_top_k`` (the default) or the sigmoid router, their routing weights, so the model's
outputs do not change. A softmax router's probabilities are renormalised over the kept experts,
which shifts what depends on their scale: the weights without ``normalize_top_k``, the mass ``top_p``
counts, and choices near a tie once an aux_free selection bias is added to them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
from torch import Tensor

from moe_gpt.weights.safe_load import MODEL_PREFIX, load_model, model_config, model_state_dict
from moe_gpt.compose import merge_overrides
from moe_gpt.config import ConfigError, MoEConfig, RunConfig
from moe_gpt.model.gpt import GPT
from moe_gpt.training.resume import RUN_RECORD, Resume, saved_overrides

log = logging.getLogger(__name__)

# An MoE layer's tensors with one row per routed expert (dim 0); pruning keeps the kept experts' rows.
# Anything else (shared experts included) is copied unchanged; the strict load in prune_experts
# would refuse a per-expert tensor missing from this list, since its shape would not fit.
PER_EXPERT_KEYS = (
    "router.gate.weight",
    "router.noise.weight",  # router=noisy
    "router.selection_bias",  # load_balance=aux_free
    "experts.c_fc_weight",
    "experts.c_proj_weight",
    "experts.c_fc_bias",  # model.bias=true
    "experts.c_proj_bias",
)
# Entries of a training checkpoint that describe the model rather than the run's progress. The
# optimizer, scheduler, loop and callback states (and step counters) belong to the unpruned model.
KEPT_CHECKPOINT_ENTRIES = ("pytorch-lightning_version", "hparams_name")


def check_keep(keep: int, num_experts: int) -> None:
    """Pruning must leave at least one expert and remove at least one."""
    if num_experts < 2:
        raise ConfigError(f"the model has {num_experts} expert per MoE layer: there is nothing to prune")
    if not 1 <= keep <= num_experts - 1:
        raise ConfigError(
            f"--keep {keep} must be between 1 and {num_experts - 1} (the model has {num_experts} experts per MoE layer)"
        )


def experts_to_keep(shares: list[list[float]], keep: int) -> list[list[int]]:
    """Per layer, the ``keep`` experts with the largest usage shares (ties: the lower index), ascending.

    Ascending order keeps the surviving experts in their original relative order, so expert i of the
    pruned layer is the i-th survivor, which makes reports and group membership easy to follow.
    """
    kept = []
    for layer_shares in shares:
        check_keep(keep, len(layer_shares))
        by_usage = sorted(range(len(layer_shares)), key=lambda expert: (-layer_shares[expert], expert))
        kept.append(sorted(by_usage[:keep]))
    return kept


def prune_experts(model: GPT, keep_per_layer: list[list[int]]) -> GPT:
    """A new GPT (same train/eval mode, device and dtype) with only the listed experts of each MoE layer.

    ``keep_per_layer[i]`` lists the experts kept in the i-th MoE layer (``model.moe_layers()`` order);
    every layer keeps the same number, since one config describes all layers.
    """
    check_keep_lists(model, keep_per_layer)
    config = replace(model.config, moe=pruned_moe_config(model.config.moe, keep_per_layer))
    parameter = next(model.parameters())
    pruned = GPT(config).to(device=parameter.device, dtype=parameter.dtype)
    pruned.load_state_dict(pruned_state_dict(model, keep_per_layer))  # strict: every key and shape must fit
    return pruned.train(model.training)


def check_keep_lists(model: GPT, keep_per_layer: list[list[int]]) -> None:
    """One list per MoE layer, all of one length, each naming distinct existing experts."""
    num_experts = model.config.moe.num_experts
    layers = len(model.moe_layers())
    if layers == 0:
        raise ConfigError("the model is dense (model.use_moe=false): it has no experts to prune")
    if len(keep_per_layer) != layers:
        raise ConfigError(f"{len(keep_per_layer)} lists of experts to keep were given for {layers} MoE layers")
    keep = len(keep_per_layer[0])
    check_keep(keep, num_experts)
    for layer, experts in enumerate(keep_per_layer):
        if len(experts) != keep:
            raise ConfigError(f"MoE layer {layer} keeps {len(experts)} experts but layer 0 keeps {keep}; keep as many")
        if len(set(experts)) != keep or not all(0 <= expert < num_experts for expert in experts):
            raise ConfigError(f"MoE layer {layer}: {experts} are not distinct experts between 0 and {num_experts - 1}")


def pruned_moe_config(moe: MoEConfig, keep_per_layer: list[list[int]]) -> MoEConfig:
    """``moe`` for ``keep`` experts: top_k and min_experts_per_token capped; groups kept only where they still fit."""
    keep = len(keep_per_layer[0])
    top_k = min(moe.top_k, keep)
    changes: dict[str, Any] = dict(
        num_experts=keep, top_k=top_k, min_experts_per_token=min(moe.min_experts_per_token, top_k)
    )
    if moe.num_groups > 1:
        problem = group_routing_problem(moe, keep_per_layer, top_k)
        if problem is not None:
            log.warning("pruning turns off group-limited routing (num_groups=1, topk_groups=1): %s", problem)
            changes.update(num_groups=1, topk_groups=1)
    return replace(moe, **changes)  # replace runs MoEConfig's checks again


def group_routing_problem(moe: MoEConfig, keep_per_layer: list[list[int]], top_k: int) -> Optional[str]:
    """Why the pruned layers cannot keep ``moe``'s expert groups; None when they can.

    Groups are contiguous blocks of experts, so they survive only if every layer keeps as many
    experts from each original group: then the pruned layer's blocks are the original groups.
    """
    groups, keep = moe.num_groups, len(keep_per_layer[0])
    if keep % groups:
        return f"--keep {keep} is not divisible by model.moe.num_groups={groups}"
    group_size, kept_per_group = moe.num_experts // groups, keep // groups
    for layer, experts in enumerate(keep_per_layer):
        counts = [sum(1 for expert in experts if expert // group_size == group) for group in range(groups)]
        if any(count != kept_per_group for count in counts):
            return f"MoE layer {layer} keeps {counts} experts from its {groups} groups, not {kept_per_group} from each"
    if top_k > moe.topk_groups * kept_per_group:
        return f"top_k={top_k} is more than the {moe.topk_groups * kept_per_group} kept experts in topk_groups groups"
    return None


def pruned_state_dict(model: GPT, keep_per_layer: list[list[int]]) -> dict[str, Tensor]:
    """The model's weights with only the kept rows of each MoE layer's per-expert tensors."""
    state = model.state_dict()
    moe_blocks = [index for index, block in enumerate(model.transformer.h) if block.is_moe]
    for block, experts in zip(moe_blocks, keep_per_layer):
        rows = torch.tensor(experts, dtype=torch.long)
        for name in PER_EXPERT_KEYS:
            key = f"transformer.h.{block}.mlp.{name}"
            if key in state:
                state[key] = state[key].index_select(0, rows.to(state[key].device))
    return state


def pruned_checkpoint(checkpoint: dict[str, Any], model: GPT) -> dict[str, Any]:
    """A training checkpoint of the pruned ``model`` in ``checkpoint``'s layout, to start new runs from.

    Optimizer, scheduler, loop and callback states are left out: they describe training the unpruned
    model. Weights keep the source's dtypes (a bf16 checkpoint stays bf16). The run record is kept,
    with the pruning applied to its overrides and settings, so tools that compose the run's config
    from it (pruning again, analysis) get a model that fits these weights.
    """
    source_dtypes = {key: tensor.dtype for key, tensor in model_state_dict(checkpoint).items()}
    state = in_dtypes(model.state_dict(), source_dtypes)
    hyper_parameters = {**checkpoint["hyper_parameters"], "model_config": asdict(model.config)}
    pruned = {key: checkpoint[key] for key in KEPT_CHECKPOINT_ENTRIES if key in checkpoint}
    pruned["state_dict"] = {MODEL_PREFIX + key: tensor for key, tensor in state.items()}
    pruned["hyper_parameters"] = hyper_parameters
    if RUN_RECORD in checkpoint:
        pruned[RUN_RECORD] = pruned_run_record(checkpoint[RUN_RECORD], model_config(checkpoint).moe, model)
    return pruned


def in_dtypes(state: dict[str, Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, Tensor]:
    """``state`` with each tensor in ``dtypes[key]`` (when listed), tied tensors still one tensor.

    The input and output embeddings are one tensor under two keys; converting each key on its own
    would save the largest matrix of the model twice.
    """
    converted: dict[tuple, Tensor] = {}
    result = {}
    for key, tensor in state.items():
        dtype = dtypes.get(key, tensor.dtype)
        same = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), dtype)
        if same not in converted:
            converted[same] = tensor.detach().to(dtype)
        result[key] = converted[same]
    return result


def pruned_run_record(record: dict[str, Any], source_moe: MoEConfig, model: GPT) -> dict[str, Any]:
    """The run record with the pruned model: its overrides gain the changed MoE keys, its config the new model."""
    record = dict(record)
    if record.get("overrides") is not None:
        changes = pruning_overrides(source_moe, model.config.moe)
        record["overrides"] = merge_overrides(list(record["overrides"]), changes)
    if isinstance(record.get("config"), dict) and "model" in record["config"]:
        record["config"] = {**record["config"], "model": asdict(model.config)}
    return record


def pruning_overrides(source: MoEConfig, pruned: MoEConfig) -> list[str]:
    """The train.py overrides that turn ``source``'s MoE settings into ``pruned``'s (e.g. for ``init_from``)."""
    changed = [f.name for f in fields(MoEConfig) if getattr(source, f.name) != getattr(pruned, f.name)]
    return [f"model.moe.{name}={getattr(pruned, name)}" for name in changed]


@dataclass
class Measurement:
    """What a model does on a set of windows: mean cross-entropy per token and each layer's expert usage."""

    loss: float
    shares: list[list[float]]  # per MoE layer, the share of token-slots each expert got

    @property
    def perplexity(self) -> float:
        return math.exp(self.loss) if self.loss < 700 else math.inf  # exp overflows a float above ~709


@torch.no_grad()
def measure(model: GPT, batches: Iterable[tuple[Tensor, Tensor]]) -> Measurement:
    """Mean validation loss and expert usage over ``batches`` of (inputs, targets), in one pass.

    Slots are counted, not averaged per batch, so a short last batch weighs only as much as its tokens.
    """
    loss_sum, tokens = 0.0, 0
    counts: Optional[list[Tensor]] = None
    for x, y in batches:
        out = model(x, y, return_intermediate=True)
        loss_sum += out.lm_loss.item() * y.numel()
        tokens += y.numel()
        batch_counts = slot_counts(out.intermediate)
        counts = batch_counts if counts is None else [total + new for total, new in zip(counts, batch_counts)]
    if tokens == 0:
        raise ConfigError("no windows to measure on; use --windows 1 or more")
    shares = [(layer / layer.sum().clamp_min(1)).tolist() for layer in counts or []]
    return Measurement(loss_sum / tokens, shares)


def slot_counts(intermediate: list[Optional[dict[str, Any]]]) -> list[Tensor]:
    """Per MoE layer, the token-slots that chose each expert (dense blocks have no entry)."""
    return [item["moe"]["expert_outputs"]["tokens_per_expert"].double().cpu() for item in intermediate if item]


def load_moe_model(path: Path) -> GPT:
    """The checkpoint's GPT in eval mode; a dense model is refused (it has nothing to prune)."""
    model = load_model(path)
    if not model.moe_layers():
        raise ConfigError(f"{path} is a dense model (model.use_moe=false): it has no experts to prune")
    return model


def validation_batches(run: RunConfig, block_size: int, windows: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``windows`` validation windows of the run's data, in batches of data.batch_size."""
    # Imports Lightning (seconds): only once the arguments are checked.
    from moe_gpt.data import TokenDataModule

    datamodule = TokenDataModule(run.data, block_size=block_size, seed=run.seed)
    datamodule.setup("validate")
    count = min(windows, len(datamodule.val_dataset))
    pairs = [datamodule.val_dataset[i] for i in range(count)]
    size = run.data.batch_size
    return [batch(pairs[start : start + size]) for start in range(0, count, size)]


def batch(pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.stack([x for x, _ in pairs]), torch.stack([y for _, y in pairs])


def training_overrides(result: dict, original: GPT, pruned: GPT, out: Path) -> list[str]:
    """train.py overrides that start a run from the pruned checkpoint: its run's (pruned) overrides, or the changes."""
    recorded = saved_overrides(Resume(out, result))
    changes = recorded if recorded is not None else pruning_overrides(original.config.moe, pruned.config.moe)
    return [*changes, f"init_from={out}"]
