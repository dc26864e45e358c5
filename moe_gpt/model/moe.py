"""The Mixture-of-Experts feed-forward layer: router -> dispatch -> experts -> weighted sum (+ shared experts).

Shape suffixes name the dimensions where many tensors meet: T tokens (batch and time
flattened), D model width, H expert hidden width, E experts, K experts per token,
S token-slots (K * T, one per token and chosen expert).

Which file does what: routers.py picks experts and weights, dispatch.py sorts token-slots
by expert (on the device, never reading a count on the host), experts.py holds the experts'
weights and runs them through the fused operator of expert_kernels.py (grouped matrix
multiplies, or one expert's block of rows at a time), which sums their weighted outputs per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor, nn

from moe_gpt.config import GPTConfig
from moe_gpt.model.dispatch import Dispatch, plan_dispatch
from moe_gpt.model.experts import Experts, FeedForward
from moe_gpt.model.routers import Router, RouterOutput

__all__ = ["Experts", "MoELayer", "Router", "RouterOutput"]


def switch_load_balance_loss(probs_TE: Tensor, tokens_per_expert_E: Tensor) -> Tensor:
    """Switch Transformer loss E * sum_i f_i * P_i: 1.0 for uniform routing; at most E / top_k, reached
    when every token sends its top_k slots to the same top_k experts with all their probability.

    f_i is the share of token-slots sent to expert i (not differentiable; a constant weight),
    P_i the mean router probability of expert i (carries the gradient).
    """
    num_experts = probs_TE.shape[-1]
    share_E = tokens_per_expert_E / tokens_per_expert_E.sum()
    return num_experts * (share_E * probs_TE.mean(dim=0)).sum()


def variance_load_balance_loss(probs_TE: Tensor) -> Tensor:
    """Variance of the per-expert mean probability around 1/E: 0 when every expert gets equal mean
    probability. Unlike the switch loss it ignores where the top-k choices actually went."""
    num_experts = probs_TE.shape[-1]
    return ((probs_TE.mean(dim=0) - 1.0 / num_experts) ** 2).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE z-loss: keeps router logits small so the softmax stays numerically tame."""
    return torch.logsumexp(logits_TE, dim=-1).pow(2).mean()


@dataclass
class MoELosses:
    load_balance: Tensor
    z: Tensor


class MoELayer(nn.Module):
    """Drop-in replacement for the dense MLP: each token goes to its top-k experts (plus any shared ones)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        moe = config.moe
        self.moe_config = moe
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.load_balance = moe.load_balance
        self.router = Router(config.n_embd, moe)
        hidden = config.ffn_hidden_size
        self.experts = Experts(
            moe.num_experts, config.n_embd, hidden, moe.activation, config.expert_dropout, config.bias, moe.experts_impl
        )
        # DeepSeekMoE's shared experts: N always-on experts are one FFN N times as wide.
        self.shared_experts = (
            FeedForward(
                config.n_embd, moe.num_shared_experts * hidden, moe.activation, config.expert_dropout, config.bias
            )
            if moe.num_shared_experts > 0
            else None
        )
        # Routing statistics summed over this process's training forwards since the last reset:
        # the usage metrics read them, so logging costs no extra pass. Plain tensors, not buffers:
        # they are not weights (nothing to checkpoint), and DDP would overwrite every rank's
        # buffers with rank zero's at each forward. They follow the input's device (_record_usage).
        self.tokens_per_expert = torch.zeros(moe.num_experts)  # slots that chose each expert
        self.dropped_slots = torch.zeros(())  # of those, slots over an expert's capacity
        self.router_entropy_sum = torch.zeros(())
        self.routed_tokens = torch.zeros(())
        # aux_free: slots per expert since the last selection-bias update (one optimizer step).
        self.load_since_bias_update = torch.zeros(moe.num_experts)

    def capacity(self, num_tokens: int) -> Optional[int]:
        """Token-slots each expert may take for this many tokens; None when dropless."""
        factor = self.moe_config.capacity_factor_for(self.training)
        if factor is None:
            return None
        return math.ceil(factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x_BTD: Tensor, return_intermediate: bool = False) -> tuple[Tensor, MoELosses, Optional[dict]]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        route = self.router(x_TD)
        plan = plan_dispatch(
            route.topk_idx_TK, route.topk_scores_TK, self.num_experts, self.capacity(B * T), route.slot_used_TK
        )
        out_TD = self.experts(x_TD, plan)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)

        losses = MoELosses(self._load_balance_loss(route, plan.demand_E), router_z_loss(route.logits_TE))
        if self.training:
            self._record_usage(route.probs_TE, plan)
        intermediate = self._intermediate(route, plan, out_TD, losses) if return_intermediate else None
        return out_TD.view(B, T, D), losses, intermediate

    def _load_balance_loss(self, route: RouterOutput, demand_E: Tensor) -> Tensor:
        # aux_free balances with its selection bias; its optional loss is the switch loss.
        if self.load_balance in ("switch", "aux_free"):
            return switch_load_balance_loss(route.probs_TE, demand_E.float())
        if self.load_balance == "variance":
            return variance_load_balance_loss(route.probs_TE)
        return route.probs_TE.new_zeros(())

    @torch.no_grad()
    def _record_usage(self, probs_TE: Tensor, plan: Dispatch) -> None:
        if self.tokens_per_expert.device != probs_TE.device:  # the model moved (e.g. to the GPU)
            for name in ("tokens_per_expert", "dropped_slots", "router_entropy_sum", "routed_tokens"):
                setattr(self, name, getattr(self, name).to(probs_TE.device))
            self.load_since_bias_update = self.load_since_bias_update.to(probs_TE.device)
        self.tokens_per_expert += plan.demand_E
        self.dropped_slots += plan.dropped
        self.router_entropy_sum += -(probs_TE * probs_TE.clamp_min(1e-9).log()).sum()
        self.routed_tokens += probs_TE.shape[0]
        if self.router.selection_bias is not None:
            self.load_since_bias_update += plan.demand_E

    def reset_usage(self) -> None:
        for counter in (self.tokens_per_expert, self.dropped_slots, self.router_entropy_sum, self.routed_tokens):
            counter.zero_()

    @torch.no_grad()
    def update_selection_bias(self, load_E: Optional[Tensor] = None) -> None:
        """aux_free, after each optimizer step: move the selection bias by this step's load.

        ``load_E`` defaults to this process's count; multi-process training passes the sum over
        processes so every process applies the same update.
        """
        if self.router.selection_bias is None:
            return
        load_E = self.load_since_bias_update if load_E is None else load_E
        self.router.update_selection_bias(load_E.to(self.router.selection_bias.device))
        self.load_since_bias_update.zero_()

    def _intermediate(self, route: RouterOutput, plan: Dispatch, out_TD: Tensor, losses: MoELosses) -> dict[str, Any]:
        """One forward's routing (scores, choices, per-expert load, losses, output), for debugging and analysis."""
        demand_E = plan.demand_E.detach()
        slots = demand_E.sum()
        used_TK = (
            route.slot_used_TK
            if route.slot_used_TK is not None
            else torch.ones_like(route.topk_idx_TK, dtype=torch.bool)
        )
        data = {
            "gate_scores": route.probs_TE.detach(),
            "top_k_scores": route.topk_scores_TK.detach(),
            "top_k_indices": route.topk_idx_TK.detach(),
            "top_k_used": used_TK.detach(),
            "expert_outputs": {"tokens_per_expert": demand_E},
            "final_output": out_TD.detach(),
            "load_balance_loss": losses.load_balance.detach(),
            "z_loss": losses.z.detach(),
            "expert_usage": {
                "token_share": demand_E.float() / slots,
                "mean_gate_prob": route.probs_TE.mean(dim=0).detach(),
                "experts_per_token": slots.float() / route.probs_TE.shape[0],
                "dropped_fraction": plan.dropped.float() / slots.clamp_min(1),
            },
        }
        if self.router.selection_bias is not None:
            data["expert_usage"]["selection_bias"] = self.router.selection_bias.detach().clone()
        return data


def reference_moe_forward(layer: MoELayer, x_BTD: Tensor) -> Tensor:
    """The plain per-expert mask loop, dropless. Slow; kept only to check the dispatch against."""
    B, T, D = x_BTD.shape
    x_TD = x_BTD.reshape(B * T, D)
    route = layer.router(x_TD)
    out_TD = torch.zeros_like(x_TD)
    for expert in range(layer.num_experts):
        token_idx, slot_idx = torch.where(route.topk_idx_TK == expert)
        if token_idx.numel() == 0:
            continue
        expert_out = layer.experts.expert_forward(expert, x_TD[token_idx])
        weight = route.topk_scores_TK[token_idx, slot_idx].unsqueeze(-1)
        out_TD[token_idx] += (expert_out.float() * weight).to(x_TD.dtype)
    if layer.shared_experts is not None:
        out_TD = out_TD + layer.shared_experts(x_TD)
    return out_TD.view(B, T, D)
