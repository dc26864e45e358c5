"""Dispatch: which rows the experts compute, in what order, and with what routing weight.

A token-slot is one (token, chosen expert) pair; slots are numbered choice-major, k * T + t
(all first choices, then all second choices, ...). Dispatch sorts them by expert so each
expert's rows are contiguous, entirely on the device: counts are a fixed-size index_add (not
bincount, whose size depends on the data), and nothing is read on the host. Slots that are
not computed (over an expert's capacity, or unused under top_p) carry the sentinel expert E
and sort after every expert's rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor


@dataclass
class Dispatch:
    """Rows are token-slots sorted by expert; expert e computes rows offsets[e-1]:offsets[e]."""

    token_of_row_S: Tensor  # the token each row reads and writes back to
    expert_of_row_S: Tensor  # its expert; E (sentinel) for rows not computed
    weight_of_row_S: Tensor  # float32 routing weight; 0 for rows not computed
    offsets_E: Tensor  # int32 running sum of computed rows per expert
    every_row_computed: bool  # known when planning: no sentinel rows can exist
    demand_E: Tensor  # slots that chose each expert, before capacity (what balancing acts on)
    dropped: Tensor  # slots that chose an expert but were over its capacity
    num_experts: int

    def weights_per_expert(self, num_tokens: int) -> Tensor:
        """(T, E) routing weights of the computed slots, 0 elsewhere."""
        flat = self.token_of_row_S * self.num_experts + self.expert_of_row_S.clamp_max(self.num_experts - 1)
        weights = self.weight_of_row_S.new_zeros(num_tokens * self.num_experts)
        return weights.index_add_(0, flat, self.weight_of_row_S).view(num_tokens, self.num_experts)


def _count(expert_S: Tensor, num_experts: int) -> Tensor:
    """Slots per expert, the sentinel bin E included (a fixed shape, unlike bincount's)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_S.device)
    return counts.index_add_(0, expert_S, torch.ones_like(expert_S))


def plan_dispatch(
    topk_idx_TK: Tensor,
    weights_TK: Tensor,
    num_experts: int,
    capacity: Optional[int] = None,
    slot_used_TK: Optional[Tensor] = None,
) -> Dispatch:
    """Sort slots by expert; with a capacity, each expert keeps only its first ``capacity`` slots.

    The sort is stable and slots are choice-major, so under a capacity an expert serves first
    choices before second choices, and earlier tokens before later ones (GShard's priority).
    """
    num_tokens = topk_idx_TK.shape[0]
    expert_S = topk_idx_TK.t().reshape(-1)
    if slot_used_TK is not None:  # top_p: unused slots are never computed
        expert_S = expert_S.masked_fill(~slot_used_TK.t().reshape(-1), num_experts)
    slot_of_row_S = expert_S.argsort(stable=True)
    expert_of_row_S = expert_S[slot_of_row_S]
    counts_E1 = _count(expert_S, num_experts)
    demand_E = counts_E1[:num_experts]
    dropped = demand_E.new_zeros(())
    if capacity is not None:
        first_row_E1 = counts_E1.cumsum(0) - counts_E1
        rank_in_expert_S = torch.arange(expert_S.shape[0], device=expert_S.device) - first_row_E1[expert_of_row_S]
        over_capacity_S = (rank_in_expert_S >= capacity) & (expert_of_row_S < num_experts)
        expert_of_row_S = expert_of_row_S.masked_fill(over_capacity_S, num_experts)
        resort_S = expert_of_row_S.argsort(stable=True)  # dropped rows move behind every expert
        slot_of_row_S, expert_of_row_S = slot_of_row_S[resort_S], expert_of_row_S[resort_S]
        dropped = over_capacity_S.sum()
    computed_E = demand_E if capacity is None else demand_E.clamp_max(capacity)
    weight_of_row_S = weights_TK.t().reshape(-1).float()[slot_of_row_S] * (expert_of_row_S < num_experts)
    return Dispatch(
        token_of_row_S=slot_of_row_S % num_tokens,
        expert_of_row_S=expert_of_row_S,
        weight_of_row_S=weight_of_row_S,
        offsets_E=computed_E.cumsum(0).to(torch.int32),
        every_row_computed=capacity is None and slot_used_TK is None,
        demand_E=demand_E,
        dropped=dropped,
        num_experts=num_experts,
    )
