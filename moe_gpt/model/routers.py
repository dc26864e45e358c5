"""Gating networks: which experts each token goes to, and with what weights.

One ``Router`` covers the choices of ``model.moe``: the score function (``router``: softmax,
noisy softmax, sigmoid), an optional per-expert selection bias (``load_balance=aux_free``),
group-limited selection (``num_groups``/``topk_groups``) and dynamic routing (``top_p``).
Shape suffixes as in moe.py: T tokens, E experts, K chosen experts per token, G groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import register_dataclass

from moe_gpt.config import MoEConfig


@dataclass
class RouterOutput:
    logits_TE: Tensor  # float32 router logits, before any noise (the z-loss keeps them small)
    probs_TE: Tensor  # float32 affinities normalised over the experts (the balance losses read them)
    topk_scores_TK: Tensor  # routing weight of each chosen expert (0 for unused slots; renormalised if asked)
    topk_idx_TK: Tensor  # chosen experts, distinct per token, best selection score (bias and groups included) first
    slot_used_TK: Optional[Tensor] = None  # bool, with top_p: whether the token really uses that expert


register_dataclass(RouterOutput)  # its tensors visible to torch's pytree, as FSDP2 needs (model/gpt.py)


@dataclass
class _Scores:
    scores_TE: Tensor  # what the chosen experts' weights are made of (softmax or sigmoid)
    log_scores_TE: Tensor  # their logarithms up to a per-token constant: renormalising is a softmax of these
    probs_TE: Tensor  # the scores normalised over all experts


class Router(nn.Module):
    """A linear map to one logit per expert, a score function, then the top-k choice."""

    def __init__(self, n_embd: int, moe: MoEConfig):
        super().__init__()
        self.gate = nn.Linear(n_embd, moe.num_experts, bias=False)
        self.kind = moe.router
        self.top_k = moe.top_k
        self.normalize_top_k = moe.normalize_top_k
        self.num_groups, self.topk_groups = moe.num_groups, moe.topk_groups
        self.top_p, self.min_experts = moe.top_p, moe.min_experts_per_token
        self.bias_update_rate = moe.bias_update_rate
        if moe.router == "noisy":
            # Shazeer et al. (2017): the noise scale is learned per token and expert.
            self.noise = nn.Linear(n_embd, moe.num_experts, bias=False)
        if moe.load_balance == "aux_free":
            # DeepSeek-V3: shifts which experts are chosen, never their weights; moved by
            # update_selection_bias, not by gradients. A buffer, so checkpoints keep it.
            self.register_buffer("selection_bias", torch.zeros(moe.num_experts))
        else:
            self.selection_bias = None

    def forward(self, x_TD: Tensor) -> RouterOutput:
        # Routing decisions are discrete: bf16 logits flip near-ties between experts and make
        # the softmax and z-loss noisy, so the router always runs in float32.
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            logits_TE = F.linear(x_TD, self.gate.weight.float())
            scores = self._scores(x_TD, logits_TE)
        selection_TE = scores.scores_TE if self.selection_bias is None else scores.scores_TE + self.selection_bias
        if self.num_groups > 1:
            selection_TE = self._only_best_groups(selection_TE)
        topk_idx_TK = selection_TE.topk(self.top_k, dim=-1).indices
        slot_used_TK = None
        if self.top_p is not None and self.top_p < 1.0:
            slot_used_TK = self._within_top_p(scores.probs_TE.gather(1, topk_idx_TK))
        weights_TK = self._weights(scores, topk_idx_TK, slot_used_TK)
        return RouterOutput(logits_TE, scores.probs_TE, weights_TK, topk_idx_TK, slot_used_TK)

    def _scores(self, x_TD: Tensor, logits_TE: Tensor) -> _Scores:
        """The score function of ``model.moe.router`` (with its noise in training, for noisy)."""
        if self.kind == "sigmoid":
            # Independent affinities: experts do not compete for mass. Normalising sigmoids is a
            # softmax of log-sigmoids, which stays finite where every sigmoid underflows to 0.
            log_scores_TE = F.logsigmoid(logits_TE)
            return _Scores(logits_TE.sigmoid(), log_scores_TE, log_scores_TE.softmax(dim=-1))
        if self.kind == "noisy" and self.training:
            noise_std_TE = F.softplus(F.linear(x_TD, self.noise.weight.float()))
            logits_TE = logits_TE + torch.randn_like(logits_TE) * noise_std_TE
        probs_TE = logits_TE.softmax(dim=-1)
        return _Scores(probs_TE, logits_TE, probs_TE)

    def _weights(self, scores: _Scores, topk_idx_TK: Tensor, slot_used_TK: Optional[Tensor]) -> Tensor:
        """Routing weight of each chosen expert; 0 for slots top_p left unused."""
        if not self.normalize_top_k:
            weights_TK = scores.scores_TE.gather(1, topk_idx_TK)
            return weights_TK if slot_used_TK is None else weights_TK * slot_used_TK
        # Renormalised as a softmax over the chosen log-scores: equal to score / sum of chosen
        # scores, but never 0 / 0 when the chosen scores underflow (logits far below zero, or
        # experts picked by the selection bias or the group limit despite a tiny probability).
        log_scores_TK = scores.log_scores_TE.gather(1, topk_idx_TK)
        if slot_used_TK is not None:
            log_scores_TK = log_scores_TK.masked_fill(~slot_used_TK, float("-inf"))
        return log_scores_TK.softmax(dim=-1)

    def _only_best_groups(self, selection_TE: Tensor) -> Tensor:
        """Group-limited routing: rank groups by the sum of their two best scores, keep topk_groups."""
        T, E = selection_TE.shape
        grouped_TGe = selection_TE.view(T, self.num_groups, E // self.num_groups)
        group_score_TG = grouped_TGe.topk(min(2, E // self.num_groups), dim=-1).values.sum(dim=-1)
        best_TG = group_score_TG.topk(self.topk_groups, dim=-1).indices
        keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, best_TG, True)
        return grouped_TGe.masked_fill(~keep_TG[..., None], float("-inf")).view(T, E)

    def _within_top_p(self, chosen_probs_TK: Tensor) -> Tensor:
        """The chosen experts in descending probability until their sum reaches top_p, at least
        min_experts_per_token. The selection bias and the group limit decide which experts are
        candidates, in their own order; the probability mass is counted best probability first."""
        sorted_probs_TK, order_TK = chosen_probs_TK.sort(dim=-1, descending=True, stable=True)
        mass_before_TK = sorted_probs_TK.cumsum(dim=-1) - sorted_probs_TK
        rank_K = torch.arange(self.top_k, device=chosen_probs_TK.device)
        used_sorted_TK = (mass_before_TK < self.top_p) | (rank_K < self.min_experts)
        return torch.empty_like(used_sorted_TK).scatter_(1, order_TK, used_sorted_TK)

    @torch.no_grad()
    def update_selection_bias(self, load_E: Tensor) -> None:
        """Aux-loss-free balancing: raise the bias of under-loaded experts, lower over-loaded ones."""
        load_E = load_E.float()
        self.selection_bias += self.bias_update_rate * torch.sign(load_E.mean() - load_E)
