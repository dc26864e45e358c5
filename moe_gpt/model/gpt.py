"""GPT-2 with a switchable feed-forward network: dense MLP or Mixture-of-Experts per block.

Module names (wte, wpe, h, ln_1, attn.c_attn, mlp.c_fc, ...) equal GPT-2's state-dict keys, so
pretrained weights load without renaming: weights/hf.py only transposes the Conv1D projections
(Hugging Face stores them as (in, out), nn.Linear as (out, in)) and pads the vocabulary rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import register_dataclass

from moe_gpt.config import GPTConfig
from moe_gpt.model.experts import FeedForward
from moe_gpt.model.lm_loss import IGNORE_INDEX, LMLosses, SoftTargets, chunked_losses
from moe_gpt.model.moe import MoELayer

KVCache = tuple[Tensor, Tensor]  # keys and values, each (B, n_head, T_past, head_dim)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.c_proj.is_residual_projection = True
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, past_kv: Optional[KVCache] = None) -> tuple[Tensor, KVCache]:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        y = F.scaled_dot_product_attention(
            q, k, v, **self._causal_mask(T, k.shape[2], x.device), dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y)), (k, v)

    @staticmethod
    def _causal_mask(t_query: int, t_key: int, device: torch.device) -> dict[str, Any]:
        if t_query == t_key:
            return {"is_causal": True}  # no cache: the fused kernels' own causal mask
        if t_query == 1:
            return {}  # one new token sees every cached key: no mask, so the fast kernels apply
        # With a cache, query i sits at absolute position (t_key - t_query + i).
        return {"attn_mask": torch.ones(t_query, t_key, dtype=torch.bool, device=device).tril(t_key - t_query)}


class MLP(FeedForward):
    """GPT-2's dense feed-forward network: 4x wide, gelu."""

    def __init__(self, config: GPTConfig):
        super().__init__(config.n_embd, 4 * config.n_embd, "gelu", config.dropout, config.bias)


@dataclass
class BlockOutput:
    x: Tensor
    cache: Optional[KVCache]
    intermediate: Optional[dict[str, Any]]
    load_balance_loss: Optional[Tensor] = None  # None in dense blocks
    z_loss: Optional[Tensor] = None

    def __iter__(self):
        # Unpacks as a tuple too: x, cache, intermediate = block(x, ...)
        return iter((self.x, self.cache, self.intermediate))


class Block(nn.Module):
    """Pre-LayerNorm transformer block; its FFN is the dense MLP or an MoE layer."""

    def __init__(self, config: GPTConfig, layer_index: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.is_moe = config.is_moe_layer(layer_index)
        self.mlp = MoELayer(config) if self.is_moe else MLP(config)

    def forward(
        self,
        x: Tensor,
        use_cache: bool = False,
        past_kv: Optional[KVCache] = None,
        return_intermediate: bool = False,
    ) -> BlockOutput:
        attn_out, cache = self.attn(self.ln_1(x), past_kv)
        x = x + attn_out
        if not self.is_moe:
            return BlockOutput(x + self.mlp(self.ln_2(x)), cache if use_cache else None, None)
        ffn_out, losses, moe_data = self.mlp(self.ln_2(x), return_intermediate)
        intermediate = {"moe": moe_data} if return_intermediate else None
        return BlockOutput(x + ffn_out, cache if use_cache else None, intermediate, losses.load_balance, losses.z)


@dataclass
class GPTOutput:
    # (B, T, vocab_size): the real tokens only, never the padded rows of the output embedding.
    # None when targets were given and model.loss_chunk_size > 0 (the default): the loss is then
    # computed without materialising them. Call without targets for logits.
    logits: Optional[Tensor]
    lm_loss: Optional[Tensor] = None  # cross-entropy, when targets were given (logged only, when distilling)
    kl_loss: Optional[Tensor] = None  # KL(teacher_T || student_T), when distilling (soft_targets given)
    distill_loss: Optional[Tensor] = None  # alpha * lm_loss + (1 - alpha) * T^2 * kl_loss, when distilling
    aux_loss: Optional[Tensor] = None  # load-balance loss averaged over MoE layers (0 when dense)
    z_loss: Optional[Tensor] = None  # router z-loss averaged over MoE layers (0 when dense)
    loss: Optional[Tensor] = None  # lm_loss (distill_loss) + aux_loss_coef * aux_loss + z_loss_coef * z_loss
    cache: Optional[list[KVCache]] = None
    intermediate: list[Optional[dict[str, Any]]] = field(default_factory=list)  # per block


# A module's output that holds tensors is registered with torch's pytree: FSDP2 gathers a sharded module's
# weights again before their backward through hooks on its output's tensors, which torch 2.11 finds with
# that pytree, where an unregistered dataclass is one opaque leaf (no hook, and the backward meets freed
# weights; torch 2.13 looks into dataclasses itself). The router's output is registered in routers.py.
register_dataclass(BlockOutput)
register_dataclass(GPTOutput)


class GPT(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.padded_vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
                ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # tied input and output embeddings
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        # GPT-2 scales projections into the residual stream so its variance does not grow with depth.
        residual_std = std / math.sqrt(2 * self.config.n_layer)
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, 0.0, residual_std if getattr(module, "is_residual_projection", False) else std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, 0.0, std)
        elif hasattr(module, "c_fc_weight"):  # Experts
            nn.init.normal_(module.c_fc_weight, 0.0, std)
            nn.init.normal_(module.c_proj_weight, 0.0, residual_std)

    def forward(
        self,
        idx: Tensor,
        targets: Optional[Tensor] = None,
        use_cache: bool = False,
        past_kv: Optional[list[KVCache]] = None,
        return_intermediate: bool = False,
        last_logits_only: bool = False,
        soft_targets: Optional[SoftTargets] = None,
    ) -> GPTOutput:
        """``last_logits_only``: logits (B, 1, vocab_size) of the last position alone, the one a
        sampler reads; the output layer is the largest matmul, so generation skips the others.
        ``soft_targets``: a teacher's hidden states for these positions (B*T rows); the loss distils."""
        if last_logits_only and targets is not None:
            raise ValueError("last_logits_only is for sampling: the loss needs every position, pass no targets")
        x, outputs = self._final_hidden(idx, use_cache, past_kv, return_intermediate)
        if last_logits_only:
            x = x[:, -1:]  # (B, 1, C)
        chunked = targets is not None and (self.config.loss_chunk_size > 0 or soft_targets is not None)
        result = GPTOutput(
            logits=None if chunked else self._logits(x),  # chunked: never the full (B, T, V) logits
            cache=[o.cache for o in outputs] if use_cache else None,
            intermediate=[o.intermediate for o in outputs] if return_intermediate else [],
        )
        result.aux_loss, result.z_loss = self._mean_router_losses(outputs, x)
        if targets is not None:
            lm_loss = self._lm_loss(x, result.logits, targets, soft_targets)
            result.lm_loss, result.kl_loss = lm_loss.ce, lm_loss.kl
            result.distill_loss = lm_loss.loss if soft_targets is not None else None
            moe = self.config.moe
            result.loss = lm_loss.loss + moe.aux_loss_coef * result.aux_loss + moe.z_loss_coef * result.z_loss
        return result

    def final_hidden(self, idx: Tensor) -> Tensor:
        """The hidden states (B, T, C) the output layer reads: what a teacher gives its student."""
        return self._final_hidden(idx, False, None, False)[0]

    def _final_hidden(
        self, idx: Tensor, use_cache: bool, past_kv: Optional[list[KVCache]], return_intermediate: bool
    ) -> tuple[Tensor, list[BlockOutput]]:
        T = idx.shape[1]
        start = 0 if past_kv is None else past_kv[0][0].shape[2]
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds model.block_size={self.config.block_size}")
        pos = torch.arange(start, start + T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))  # (B, T, C)
        outputs = []
        for i, block in enumerate(self.transformer.h):
            out = block(x, use_cache, None if past_kv is None else past_kv[i], return_intermediate)
            outputs.append(out)
            x = out.x
        return self.transformer.ln_f(x), outputs

    def _logits(self, x: Tensor) -> Tensor:
        # The matmul keeps the padded width (a multiple of 64 runs on fast kernel tiles); the padded
        # columns are no tokens, and left in they would take probability mass from every softmax.
        return self.lm_head(x)[..., : self.config.vocab_size]  # (B, T, vocab_size)

    def _lm_loss(
        self, x: Tensor, logits: Optional[Tensor], targets: Tensor, soft_targets: Optional[SoftTargets]
    ) -> LMLosses:
        if logits is None:
            hidden = x.flatten(0, 1)
            # Distilling with model.loss_chunk_size=0 still goes through the chunk loop: one chunk of every token.
            chunk_size = self.config.loss_chunk_size or hidden.shape[0]
            return chunked_losses(
                hidden, self.lm_head.weight, targets.flatten(), chunk_size, self.config.vocab_size, soft_targets
            )
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)
        return LMLosses(loss, loss, None)

    @staticmethod
    def _mean_router_losses(outputs: list[BlockOutput], like: Tensor) -> tuple[Tensor, Tensor]:
        moe_outputs = [o for o in outputs if o.load_balance_loss is not None]
        if not moe_outputs:
            zero = like.new_zeros((), dtype=torch.float32)
            return zero, zero
        aux = torch.stack([o.load_balance_loss for o in moe_outputs]).mean()
        z = torch.stack([o.z_loss for o in moe_outputs]).mean()
        return aux, z

    def moe_layers(self) -> list[MoELayer]:
        return [block.mlp for block in self.transformer.h if block.is_moe]

    def num_parameters(self) -> int:
        """All parameters (tied embeddings counted once)."""
        return sum(p.numel() for p in self.parameters())

    def num_active_parameters(self) -> int:
        """Parameters used per token: each MoE layer runs top_k of its E experts."""
        moe = self.config.moe
        inactive = sum(
            (moe.num_experts - moe.top_k) * sum(p[0].numel() for p in layer.experts.parameters())
            for layer in self.moe_layers()
        )
        return self.num_parameters() - inactive
