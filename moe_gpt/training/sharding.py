"""``trainer.strategy=fsdp``: FSDP2 (``fully_shard``) through Lightning's ``ModelParallelStrategy``.

Every process holds a shard of every weight, gradient and AdamW moment; each transformer block (and
then the rest of the GPT, the root) is all-gathered just before it runs and freed after. Every
process is in the one data-parallel (sharding) group; there is no tensor parallelism.

Checkpoints stay what a one-process run writes: one file, assembled on rank zero, with the same
state-dict keys and the optimizer state in ``optimizer.state_dict()``'s layout, so every consumer
(generate, analyze, export_hf, init_from, prune_experts, held-out evaluation) reads it on one process,
and a run resumes under fsdp from any strategy's checkpoint and the other way round.

``trainer.expert_parallel=N`` (N > 1) adds expert parallelism (moe_gpt/model/expert_parallel.py). With
N = P processes the mesh is one dimension, ``expert``: each MoE layer's experts are DTensors sharded by
expert on it (``Shard(0)``: each process keeps its E/N experts whole) and left out of FSDP2, which shards
every other weight over the same P processes as without expert parallelism. With N < P the mesh is
``expert_replicate`` x ``expert`` (P/N x N): experts ``(Replicate(), Shard(0))``, every other weight sharded
N ways and replicated P/N ways (FSDP2's hybrid sharding). One mesh for every weight keeps clipping, fused
AdamW and the one-file checkpoints working unchanged: the full-state-dict functions gather the whole
expert set on save and hand each process its slice on load, so an expert-parallel checkpoint is a
one-process run's.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import Replicate, Shard, distribute_tensor
from torch.optim import Optimizer

from moe_gpt.config import ConfigError, TrainerConfig
from moe_gpt.model.expert_parallel import EXPERT, REPLICATE, ExpertGroup
from moe_gpt.model.gpt import GPT
from moe_gpt.training.lightning_internals import shard_over_every_process
from moe_gpt.training.parallel_settings import FSDP

# The precisions run and compared with DDP: Lightning's ModelParallelStrategy also takes 16-true, and refuses
# 16-mixed (fp16 needs a gradient scaler, which it has none of for sharded gradients).
SUPPORTED_PRECISIONS = ("32-true", "32", "bf16-mixed", "bf16", "bf16-true")
# Routing stays float32 under bf16 (routers.py): the routers' weights are gathered in float32 too.
ROUTER_POLICY = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)


def check_fsdp_settings(cfg: TrainerConfig) -> None:
    if cfg.strategy == FSDP and cfg.precision not in SUPPORTED_PRECISIONS:
        raise ConfigError(
            f"trainer.strategy=fsdp does not take trainer.precision={cfg.precision} (FSDP2 here runs 32-true, "
            "bf16-mixed and bf16-true); use trainer.precision=bf16-mixed, or trainer.strategy=ddp"
        )


def strategy_for(cfg: TrainerConfig) -> Any:
    """What Lightning's Trainer gets as ``strategy``: FSDP2 for ``fsdp``, Lightning's own name otherwise."""
    return FSDP2Strategy(cfg.expert_parallel) if cfg.strategy == FSDP else cfg.strategy


def shard_gpt(model: GPT, mesh: DeviceMesh, precision: str) -> None:
    """``fully_shard`` each transformer block, then the root (embeddings, final norm, output layer).

    Children first: a module's parameters belong to the innermost ``fully_shard`` around them. On an expert
    mesh the experts are spread over it first, and FSDP2 leaves them alone.
    Already sharded (a validation after fit sets the model up again): nothing to do.
    """
    if isinstance(model, FSDPModule):
        return
    experts = spread_experts(model, mesh) if EXPERT in (mesh.mesh_dim_names or ()) else set()
    policy = mixed_precision_policy(precision)
    if policy.param_dtype is not None:
        for layer in model.moe_layers():
            fully_shard(layer.router, mesh=mesh, mp_policy=ROUTER_POLICY)
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy, ignored_params=experts)
    fully_shard(model, mesh=mesh, mp_policy=policy, ignored_params=experts)


def spread_experts(model: GPT, mesh: DeviceMesh) -> set[nn.Parameter]:
    """Make every MoE layer's expert weights DTensors of which this process holds its E/N experts; returns them.

    Every process built the same whole model (the same seed, or the same init_from weights), so its slice
    is the one-process run's.
    """
    group, spread = ExpertGroup(mesh), set()
    placements = [Shard(0)] if mesh.ndim == 1 else [Replicate(), Shard(0)]
    for layer in model.moe_layers():
        experts = layer.experts
        for name, weight in list(experts.named_parameters(recurse=False)):
            placed = nn.Parameter(distribute_tensor(weight.detach(), mesh, placements))
            setattr(experts, name, placed)
            spread.add(placed)
        experts.parallel = group
    local, total = sum(p.to_local().numel() for p in spread), sum(p.numel() for p in spread)
    num_experts = model.config.moe.num_experts
    rank_zero_info(
        f"experts per rank: {num_experts // group.size} of {num_experts} "
        f"({local:,} of {total:,} expert parameters), expert groups of {group.size} process(es)"
    )
    return spread


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """bf16-mixed: weights gathered and used in bf16, gradients reduced in float32, the float32 shards
    stepped by AdamW (torchtitan's default). Lightning's autocast stays on around it, as without FSDP."""
    if precision == "bf16-mixed":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


class FSDP2Strategy(ModelParallelStrategy):
    """``ModelParallelStrategy(data_parallel_size=<processes>, tensor_parallel_size=1,
    save_distributed_checkpoint=False)``, with checkpoints in a one-process run's layout."""

    def __init__(self, expert_parallel: int = 1) -> None:
        # The data-parallel size is the process count, known once Lightning has resolved trainer.devices
        # (auto, -1, a list of ids): set in setup_environment.
        super().__init__(data_parallel_size="auto", tensor_parallel_size=1, save_distributed_checkpoint=False)
        self.expert_parallel = expert_parallel
        self._expert_mesh: Optional[DeviceMesh] = None

    def setup_environment(self) -> None:
        shard_over_every_process(self)
        super().setup_environment()
        if self.expert_parallel > 1:
            self._expert_mesh = expert_mesh(self.root_device.type, self.world_size, self.expert_parallel)

    @property
    def sharding_mesh(self) -> DeviceMesh:
        """What ``shard_gpt`` shards over: every process (one dimension), or the expert mesh."""
        return self._expert_mesh if self._expert_mesh is not None else self.device_mesh["data_parallel"]

    def optimizer_state(self, optimizer: Optimizer) -> dict[str, Any]:
        # Lightning's own numbers the parameters in the model's order, which a one-process run could not read.
        return full_optimizer_state(self.model, optimizer)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: Optional[bool] = None) -> dict[str, Any]:
        """Every process reads the one file and keeps its shards of the weights and optimizer state.

        Always ``weights_only``: Lightning drops the run's ``weights_only=True`` for strategies that
        restore after setup, as this one does.
        """
        checkpoint = self.checkpoint_io.load_checkpoint(self.broadcast(checkpoint_path), weights_only=True)
        load_full_state(self.model, self.optimizers, checkpoint, strict=self.lightning_module.strict_loading)
        return checkpoint


def expert_mesh(device_type: str, processes: int, expert_parallel: int) -> DeviceMesh:
    """The mesh of every weight under expert parallelism: (expert,) when one group holds every process, else
    (expert_replicate, expert), consecutive processes forming a group."""
    if expert_parallel == processes:
        return init_device_mesh(device_type, (processes,), mesh_dim_names=(EXPERT,))
    shape = (processes // expert_parallel, expert_parallel)
    return init_device_mesh(device_type, shape, mesh_dim_names=(REPLICATE, EXPERT))


def full_optimizer_state(model: nn.Module, optimizer: Optimizer) -> dict[str, Any]:
    """The whole optimizer state on rank zero (empty elsewhere), in ``optimizer.state_dict()``'s layout."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name = get_optimizer_state_dict(model, optimizer, options=options)
    return numbered_by_position(by_name) if by_name else {}


def load_full_state(model: nn.Module, optimizers: list[Optimizer], checkpoint: dict[str, Any], strict: bool) -> None:
    """A one-file checkpoint's weights (its ``state_dict``, which it loses) and optimizer states into the
    sharded model and its optimizers: every process keeps its own shards."""
    options = StateDictOptions(full_state_dict=True, strict=strict)
    set_model_state_dict(model, checkpoint.pop("state_dict"), options=options)
    for optimizer, state in zip(optimizers, checkpoint.get("optimizer_states", [])):
        by_name = keyed_by_name(state, optimizer, model)
        set_optimizer_state_dict(model, optimizer, optim_state_dict=by_name, options=options)


def numbered_by_position(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer state keyed by parameter name in ``optimizer.state_dict()``'s layout: the parameters
    numbered 0, 1, ... through the param groups in order."""
    names = (name for group in state["param_groups"] for name in group["params"])
    return _rekeyed(state, {name: number for number, name in enumerate(names)})


def keyed_by_name(state: dict[str, Any], optimizer: Optimizer, model: nn.Module) -> dict[str, Any]:
    """The reverse, for this optimizer: each saved number names the parameter at its position in the
    optimizer's param groups, as ``Optimizer.load_state_dict`` matches them."""
    name_of = {param: name for name, param in model.named_parameters()}
    groups = zip(state["param_groups"], optimizer.param_groups)
    pairs = [pair for saved, group in groups for pair in zip(saved["params"], group["params"])]
    return _rekeyed(state, {number: name_of[param] for number, param in pairs})


def _rekeyed(state: dict[str, Any], new_key: dict[Any, Any]) -> dict[str, Any]:
    return {
        "state": {new_key[key]: value for key, value in state["state"].items()},
        "param_groups": [
            {**group, "params": [new_key[key] for key in group["params"]]} for group in state["param_groups"]
        ],
    }
