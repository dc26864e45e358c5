"""The Mixture-of-Experts feed-forward layer: router -> top-k -> experts -> weighted sum.

Shape suffixes name the dimensions where many tensors meet: T tokens (batch and time
flattened), D model width, H expert hidden width, E experts, K experts per token,
S token-slots (T * K, one per token and chosen expert).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_gpt.config import GPTConfig

ACTIVATION_FUNCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    # GPT-2 was trained with the tanh approximation; using it keeps pretrained FFNs exact.
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "swish": F.silu,
    "tanh": torch.tanh,
}


@dataclass
class RouterOutput:
    logits_TE: Tensor  # float32 router logits
    probs_TE: Tensor  # float32 softmax over experts
    topk_scores_TK: Tensor  # routing weights of the chosen experts (renormalised if asked)
    topk_idx_TK: Tensor  # chosen experts, distinct per token


class Router(nn.Module):
    """Gating network: a linear map to one logit per expert, softmax, top-k."""

    def __init__(self, n_embd: int, num_experts: int, top_k: int, normalize_top_k: bool):
        super().__init__()
        self.gate = nn.Linear(n_embd, num_experts, bias=False)
        self.top_k = top_k
        self.normalize_top_k = normalize_top_k

    def forward(self, x_TD: Tensor) -> RouterOutput:
        # Routing decisions are discrete: bf16 logits flip near-ties between experts and make
        # the softmax and z-loss noisy, so the router always runs in float32.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.float(), self.gate.weight.float())
        probs_TE = logits_TE.softmax(dim=-1)
        topk_scores_TK, topk_idx_TK = probs_TE.topk(self.top_k, dim=-1)
        if self.normalize_top_k:
            topk_scores_TK = topk_scores_TK / topk_scores_TK.sum(dim=-1, keepdim=True)
        return RouterOutput(logits_TE, probs_TE, topk_scores_TK, topk_idx_TK)


class Experts(nn.Module):
    """E feed-forward networks (Linear -> activation -> Linear -> dropout) stored as stacked weights.

    Weights are laid out per expert as ``nn.Linear`` would hold them (out, in), so a dense
    GPT-2 MLP copies into every expert unchanged (sparse upcycling).
    """

    def __init__(self, num_experts: int, n_embd: int, hidden: int, activation: str, dropout: float, bias: bool):
        super().__init__()
        self.num_experts = num_experts
        self.c_fc_weight = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.c_proj_weight = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.c_fc_bias = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(num_experts, n_embd)) if bias else None
        self.activation = ACTIVATION_FUNCTIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run one expert on the tokens it was given."""
        b_fc = None if self.c_fc_bias is None else self.c_fc_bias[expert]
        b_proj = None if self.c_proj_bias is None else self.c_proj_bias[expert]
        h_NH = self.activation(F.linear(x_ND, self.c_fc_weight[expert], b_fc))
        return self.dropout(F.linear(h_NH, self.c_proj_weight[expert], b_proj))

    def forward(self, x_SD: Tensor, tokens_per_expert: list[int]) -> Tensor:
        """Token-slots sorted by expert in, expert outputs in the same order out.

        Each expert runs once on its contiguous slice: E dense matmuls instead of E masked
        passes over the whole batch.
        """
        slices = torch.split(x_SD, tokens_per_expert)
        outputs = [self.expert_forward(e, x_ND) for e, x_ND in enumerate(slices) if x_ND.shape[0] > 0]
        return torch.cat(outputs) if outputs else x_SD.new_zeros(x_SD.shape)


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
    """The design's loss: variance of the per-expert mean probability around 1/E."""
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
    """Drop-in replacement for the dense MLP: each token goes to its top-k experts."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        moe = config.moe
        self.num_experts = moe.num_experts
        self.top_k = moe.top_k
        self.load_balance = moe.load_balance
        self.router = Router(config.n_embd, moe.num_experts, moe.top_k, moe.normalize_top_k)
        self.experts = Experts(
            moe.num_experts, config.n_embd, config.ffn_hidden_size, moe.activation, config.expert_dropout, config.bias
        )
        # Routing statistics summed over this process's training forwards since the last reset:
        # the usage metrics read them, so logging costs no extra pass. Plain tensors, not buffers:
        # they are not weights (nothing to checkpoint), and DDP would overwrite every rank's
        # buffers with rank zero's at each forward. They follow the input's device (_record_usage).
        self.tokens_per_expert = torch.zeros(moe.num_experts)
        self.router_entropy_sum = torch.zeros(())
        self.routed_tokens = torch.zeros(())

    def forward(self, x_BTD: Tensor, return_intermediate: bool = False) -> tuple[Tensor, MoELosses, Optional[dict]]:
        B, T, D = x_BTD.shape
        x_TD = x_BTD.reshape(B * T, D)
        route = self.router(x_TD)
        tokens_per_expert_E = torch.bincount(route.topk_idx_TK.flatten(), minlength=self.num_experts)

        # Sort the T*K token-slots by expert so each expert's inputs are one contiguous slice.
        slot_order_S = route.topk_idx_TK.flatten().argsort(stable=True)
        token_of_slot_S = slot_order_S // self.top_k
        expert_out_SD = self.experts(x_TD[token_of_slot_S], tokens_per_expert_E.tolist())
        weights_S1 = route.topk_scores_TK.flatten()[slot_order_S].unsqueeze(-1)
        weighted_SD = (expert_out_SD.float() * weights_S1).to(x_TD.dtype)
        out_TD = torch.zeros_like(x_TD).index_add_(0, token_of_slot_S, weighted_SD)

        losses = MoELosses(self._load_balance_loss(route, tokens_per_expert_E), router_z_loss(route.logits_TE))
        if self.training:
            self._record_usage(route.probs_TE, tokens_per_expert_E)
        intermediate = self._intermediate(route, tokens_per_expert_E, out_TD, losses) if return_intermediate else None
        return out_TD.view(B, T, D), losses, intermediate

    def _load_balance_loss(self, route: RouterOutput, tokens_per_expert_E: Tensor) -> Tensor:
        if self.load_balance == "switch":
            return switch_load_balance_loss(route.probs_TE, tokens_per_expert_E.float())
        if self.load_balance == "variance":
            return variance_load_balance_loss(route.probs_TE)
        return route.probs_TE.new_zeros(())

    @torch.no_grad()
    def _record_usage(self, probs_TE: Tensor, tokens_per_expert_E: Tensor) -> None:
        if self.tokens_per_expert.device != probs_TE.device:  # the model moved (e.g. to the GPU)
            self.tokens_per_expert = self.tokens_per_expert.to(probs_TE.device)
            self.router_entropy_sum = self.router_entropy_sum.to(probs_TE.device)
            self.routed_tokens = self.routed_tokens.to(probs_TE.device)
        self.tokens_per_expert += tokens_per_expert_E
        self.router_entropy_sum += -(probs_TE * probs_TE.clamp_min(1e-9).log()).sum()
        self.routed_tokens += probs_TE.shape[0]

    def reset_usage(self) -> None:
        self.tokens_per_expert.zero_()
        self.router_entropy_sum.zero_()
        self.routed_tokens.zero_()

    def _intermediate(
        self, route: RouterOutput, tokens_per_expert_E: Tensor, out_TD: Tensor, losses: MoELosses
    ) -> dict[str, Any]:
        """The routing data the design lists, for debugging and for backends that return it."""
        slots = tokens_per_expert_E.sum()
        return {
            "gate_scores": route.probs_TE.detach(),
            "top_k_scores": route.topk_scores_TK.detach(),
            "top_k_indices": route.topk_idx_TK.detach(),
            "expert_outputs": {"tokens_per_expert": tokens_per_expert_E.detach()},
            "final_output": out_TD.detach(),
            "load_balance_loss": losses.load_balance.detach(),
            "z_loss": losses.z.detach(),
            "expert_usage": {
                "token_share": (tokens_per_expert_E.float() / slots).detach(),
                "mean_gate_prob": route.probs_TE.mean(dim=0).detach(),
            },
        }


def reference_moe_forward(layer: MoELayer, x_BTD: Tensor) -> Tensor:
    """The plain per-expert mask loop. Slow; kept only to check the sorted dispatch against."""
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
    return out_TD.view(B, T, D)
