"""The feed-forward networks: GPT-2's dense FFN (also the shared experts) and the stacked routed experts."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_gpt.model.dispatch import Dispatch
from moe_gpt.model.expert_kernels import ACTIVATIONS, moe_ffn, row_blocks
from moe_gpt.model.expert_parallel import ExpertGroup, exchanged_experts_forward


class FeedForward(nn.Module):
    """Linear -> activation -> Linear -> dropout: GPT-2's MLP, and DeepSeekMoE's shared experts."""

    def __init__(self, n_embd: int, hidden: int, activation: str, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, hidden, bias=bias)
        self.c_proj = nn.Linear(hidden, n_embd, bias=bias)
        self.c_proj.is_residual_projection = True
        self.activation = ACTIVATIONS[activation].forward
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(self.activation(self.c_fc(x))))


class Experts(nn.Module):
    """E feed-forward networks (Linear -> activation -> Linear) stored as stacked weights; dropout on their weighted sum.

    Weights are laid out per expert as ``nn.Linear`` would hold them (out, in), so a dense
    GPT-2 MLP copies into every expert unchanged (sparse upcycling).
    """

    def __init__(
        self,
        num_experts: int,
        n_embd: int,
        hidden: int,
        activation: str,
        dropout: float,
        bias: bool,
        impl: str = "auto",
    ):
        super().__init__()
        self.num_experts = num_experts
        self.impl = impl  # auto | grouped_mm | blocked (moe_gpt/model/expert_kernels.py) | loop (the reference)
        self.activation_name = activation  # the fused operator takes the name; expert_forward looks it up
        self.c_fc_weight = nn.Parameter(torch.empty(num_experts, hidden, n_embd))
        self.c_proj_weight = nn.Parameter(torch.empty(num_experts, n_embd, hidden))
        self.c_fc_bias = nn.Parameter(torch.zeros(num_experts, hidden)) if bias else None
        self.c_proj_bias = nn.Parameter(torch.zeros(num_experts, n_embd)) if bias else None
        self.dropout = nn.Dropout(dropout)
        # trainer.expert_parallel > 1: the weights are DTensors and this process computes its slice of the
        # experts for every process of its group (expert_parallel.py; set by training/sharding.py).
        self.parallel: Optional[ExpertGroup] = None

    def forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        """(T, D): for each token, the sum over its computed slots of routing weight x expert output."""
        # moe_ffn is an opaque operator, so autocast would not cast its inputs: do it here.
        device = x_TD.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        if self.parallel is not None:
            return self.dropout(exchanged_experts_forward(self, x_TD, dispatch, dtype))
        if self.impl == "loop":
            return self.per_expert_forward(x_TD, dispatch)
        b1 = None if self.c_fc_bias is None else self.c_fc_bias.to(dtype)
        out_TD, _, _ = moe_ffn(
            x_TD,
            dispatch.token_of_row_S,
            dispatch.weight_of_row_S,
            dispatch.offsets_E,
            self.c_fc_weight.to(dtype),
            b1,
            self.c_proj_weight.to(dtype),
            dispatch.every_row_computed,
            self.activation_name,
            self.impl,
        )
        if self.c_proj_bias is not None:  # weighted once per token and expert: a (T, E) x (E, D) matmul
            out_TD = out_TD + (dispatch.weights_per_expert(x_TD.shape[0]) @ self.c_proj_bias.float()).to(x_TD.dtype)
        return self.dropout(out_TD)

    def expert_forward(self, expert: int, x_ND: Tensor) -> Tensor:
        """Run one expert on the tokens it was given."""
        b_fc = None if self.c_fc_bias is None else self.c_fc_bias[expert]
        b_proj = None if self.c_proj_bias is None else self.c_proj_bias[expert]
        h_NH = ACTIVATIONS[self.activation_name].forward(F.linear(x_ND, self.c_fc_weight[expert], b_fc))
        return F.linear(h_NH, self.c_proj_weight[expert], b_proj)

    def per_expert_forward(self, x_TD: Tensor, dispatch: Dispatch) -> Tensor:
        """The reference path: one matmul pair per expert on its rows (reads the offsets on the host)."""
        blocks = row_blocks(dispatch.offsets_E)
        x_SD = x_TD[dispatch.token_of_row_S]
        outputs = [self.expert_forward(e, x_SD[start:end]) for e, start, end in blocks]
        computed = blocks[-1][2] if blocks else 0  # rows past the last expert's are not computed
        y_SD = torch.cat([*outputs, x_SD.new_zeros(x_SD.shape[0] - computed, x_SD.shape[1])])
        weighted_SD = (y_SD.float() * dispatch.weight_of_row_S.unsqueeze(-1)).to(x_TD.dtype)
        return self.dropout(torch.zeros_like(x_TD).index_add_(0, dispatch.token_of_row_S, weighted_SD))
