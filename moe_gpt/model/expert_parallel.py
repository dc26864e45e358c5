"""Expert parallelism: each process of an expert group holds E/N of every MoE layer's experts, and the
token-slots travel to the process that owns their expert and back (all-to-all).

The group is the "expert" dimension of the device mesh that every weight is placed on (sharding.py builds
it): ``expert`` alone when the group is every process, ``expert_replicate`` x ``expert`` when there are
several groups. The experts' weights are DTensors sharded by expert on it (and replicated over the groups),
so checkpoints, clipping and AdamW see the whole expert set. Here only the local slice is used.

One forward, on every process of the group, after dispatch.py sorted this process's slots by expert:

1. the computed-slot counts per expert go to every process (a fixed-size all-to-all), and are read on
   the host together: all-to-all's split sizes are host numbers. This is the one host read of a training
   step that does not log (docs/gpu.md), one per MoE layer and forward; torchtitan's expert parallelism
   reads the same counts;
2. the slots' inputs go to their experts' owners (all-to-all, autograd-aware), are sorted by local
   expert there, run through the same fused operator as without expert parallelism, and come back;
3. the source process weights each returning row by its routing weight and sums them per token.

Capacity and top_p act in step 0 (dispatch.py), on the slots of the process that routed them: rows not
computed are never sent. Gradients: an owner's expert gradient sums the losses of every process of its
group; it is divided by the process count and summed over the replicas, which is the mean over every
process's batch that data parallelism gives the other weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed import _functional_collectives as funcol
from torch.distributed.device_mesh import DeviceMesh

from moe_gpt.model.dispatch import Dispatch
from moe_gpt.model.expert_kernels import moe_ffn

if TYPE_CHECKING:  # experts.py imports this module
    from moe_gpt.model.experts import Experts

EXPERT, REPLICATE = "expert", "expert_replicate"  # the mesh dimensions (sharding.py builds the mesh)


@dataclass(frozen=True)
class ExpertGroup:
    """This process's place in expert parallelism: its slice of the experts and whom it exchanges with."""

    mesh: DeviceMesh  # (expert,) or (expert_replicate, expert)

    @property
    def size(self) -> int:
        return self.mesh.size(self.mesh.mesh_dim_names.index(EXPERT))

    @property
    def replicas(self) -> int:
        """Expert groups: processes holding the same experts."""
        return self.mesh.size() // self.size



class _MeanOverProcesses(torch.autograd.Function):
    """Identity forward; backward: the gradient summed over the replicas and divided by the process count."""

    @staticmethod
    def forward(ctx, weight: Tensor, group: ExpertGroup) -> Tensor:
        ctx.group = group
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad: Tensor):
        group = ctx.group
        grad = grad / group.mesh.size()
        if group.replicas > 1:
            dist.all_reduce(grad, group=group.mesh.get_group(REPLICATE))
        return grad, None


def local_weight(weight: Tensor, group: ExpertGroup, dtype: torch.dtype) -> Tensor:
    """This process's slice of a (DTensor) expert weight, in ``dtype``, with the data-parallel gradient mean."""
    return _MeanOverProcesses.apply(weight.to_local(), group).to(dtype)


@dataclass(frozen=True)
class _Exchange:
    """The split sizes of one forward's all-to-alls, on the host, and the received rows' experts on the device."""

    sent: list[int]  # rows this process sends to each process of the group
    received: list[int]  # rows it receives from each
    received_per_expert: Tensor  # (N * L,) rows from each process for each local expert, on the device


def _plan_exchange(dispatch: Dispatch, group: ExpertGroup) -> _Exchange:
    offsets_E = dispatch.offsets_E.long()
    computed_E = torch.diff(offsets_E, prepend=offsets_E.new_zeros(1))
    # Equal splits (L counts to each process): no sizes needed for this one.
    received_per_expert = funcol.all_to_all_single(computed_E, None, None, group.mesh.get_group(EXPERT)).wait()
    sizes = torch.stack([computed_E, received_per_expert]).view(2, group.size, -1).sum(-1).tolist()  # host read
    return _Exchange(sizes[0], sizes[1], received_per_expert)


def exchanged_experts_forward(experts: Experts, x_TD: Tensor, dispatch: Dispatch, dtype: torch.dtype) -> Tensor:
    """(T, D): for each token, the sum over its computed slots of routing weight x expert output, the experts
    being spread over ``experts.parallel``'s group."""
    group: ExpertGroup = experts.parallel
    exchange = _plan_exchange(dispatch, group)
    process_group = group.mesh.get_group(EXPERT)
    sent_rows = sum(exchange.sent)
    tokens_S = dispatch.token_of_row_S[:sent_rows]
    x_RD = funcol.all_to_all_single_autograd(
        x_TD.index_select(0, tokens_S), exchange.received, exchange.sent, process_group
    )
    y_RD = _run_local_experts(experts, x_RD, exchange.received_per_expert, group, dtype)
    y_SD = funcol.all_to_all_single_autograd(y_RD, exchange.sent, exchange.received, process_group)
    weighted_SD = (y_SD.float() * dispatch.weight_of_row_S[:sent_rows, None]).to(x_TD.dtype)
    return torch.zeros_like(x_TD).index_add(0, tokens_S, weighted_SD)


def _run_local_experts(
    experts: Experts, x_RD: Tensor, received_per_expert: Tensor, group: ExpertGroup, dtype: torch.dtype
) -> Tensor:
    """Each received row through its local expert (output bias included), in the order received:
    source-major, the fused operator wants rows expert-major."""
    local = received_per_expert.numel() // group.size
    expert_of_row_R = torch.repeat_interleave(
        torch.arange(local, device=x_RD.device).repeat(group.size), received_per_expert, output_size=x_RD.shape[0]
    )
    order_R = expert_of_row_R.argsort(stable=True)
    offsets_L = received_per_expert.view(group.size, local).sum(0).cumsum(0).to(torch.int32)
    rows_R = torch.arange(x_RD.shape[0], device=x_RD.device)
    b1 = None if experts.c_fc_bias is None else local_weight(experts.c_fc_bias, group, dtype)
    y_RD, _, _ = moe_ffn(
        x_RD.index_select(0, order_R),
        rows_R,
        torch.ones(x_RD.shape[0], device=x_RD.device),  # routing weights apply on the source process
        offsets_L,
        local_weight(experts.c_fc_weight, group, dtype),
        b1,
        local_weight(experts.c_proj_weight, group, dtype),
        True,
        experts.activation_name,
        experts.impl if experts.impl != "loop" else "blocked",
    )
    if experts.c_proj_bias is not None:
        y_RD = y_RD + local_weight(experts.c_proj_bias, group, dtype).index_select(0, expert_of_row_R[order_R])
    return y_RD.index_select(0, order_R.argsort())  # back to the order received
