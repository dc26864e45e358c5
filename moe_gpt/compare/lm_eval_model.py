"""A moe-gpt model as an lm-evaluation-harness ``LM``: the three request types every task is built from.

- ``loglikelihood``: log p(continuation | context), and whether greedy decoding would produce it.
  Inputs longer than ``block_size`` lose the start of the context, as lm-eval's ``hf`` model does
  (so the two score the same); a continuation longer than the block is scored a block at a time,
  each part with as much of what precedes it as fits.
- ``loglikelihood_rolling``: a whole text, in lm-eval's disjoint windows of ``block_size`` tokens,
  the first conditioned on ``<|endoftext|>`` (the perplexity tasks).
- ``generate_until``: greedy decoding with the KV cache of ``moe_gpt/model/generate.py``, stopped
  at the task's stop strings.

Tokens are GPT-2's BPE (tiktoken, read from the local file), the model's own tokenizer.
"""

from __future__ import annotations

from typing import Any

import tiktoken
import torch
from lm_eval import utils as lm_eval_utils
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

from moe_gpt.config import ConfigError
from moe_gpt.data.tokenizer import ENDOFTEXT, ENDOFTEXT_ID
from moe_gpt.model.generate import choose_token, next_token_logits
from moe_gpt.model.gpt import GPT

Window = tuple[list[int], int]  # up to block_size + 1 tokens, and how many of the last are scored targets
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for a task that sets none


class MoeGptLM(TemplateLM):
    """lm-eval's interface to a trained GPT (dense or MoE) in eval mode."""

    def __init__(self, model: GPT, tokenizer: tiktoken.Encoding, batch_size: int = 8):
        super().__init__()
        if batch_size < 1:
            raise ConfigError(f"--batch-size {batch_size} must be >= 1")
        self.model = model.eval()
        self.encoding = tokenizer
        self.batch_size = batch_size
        self.block_size = model.config.block_size

    @property
    def eot_token_id(self) -> int:
        return ENDOFTEXT_ID

    @property
    def max_length(self) -> int:
        return self.block_size

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        # <|endoftext|> written in a text is the special token, as Hugging Face's GPT-2 tokenizer reads it.
        return self.encoding.encode(string, allowed_special={ENDOFTEXT})

    def tok_decode(self, tokens: list[int], **kwargs: Any) -> str:
        return self.encoding.decode(tokens)

    # ---- log-likelihoods

    def _loglikelihood_tokens(
        self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[tuple[float, bool]]:
        """(sum of log p, all greedy) of each request's continuation tokens given its context tokens."""
        windows, owner = [], []
        for number, (_, context, continuation) in enumerate(requests):
            for window in scored_windows(context + continuation, len(continuation), self.block_size):
                windows.append(window)
                owner.append(number)
        totals = [0.0] * len(requests)
        greedy = [True] * len(requests)
        for number, (logprob, is_greedy) in zip(owner, self._score_windows(windows)):
            totals[number] += logprob
            greedy[number] &= is_greedy
        return list(zip(totals, greedy))

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        """The log-likelihood of each whole text, predicted in lm-eval's disjoint windows of block_size tokens."""
        pairs, owner = [], []
        for number, (text,) in enumerate(request.args for request in requests):
            windows = lm_eval_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.block_size,
                context_len=1,
            )
            for context, continuation in map(lm_eval_utils.make_disjoint_window, windows):
                pairs.append((None, context, continuation))
                owner.append(number)
        totals = [0.0] * len(requests)
        for number, (logprob, _) in zip(owner, self._loglikelihood_tokens(pairs)):
            totals[number] += logprob
        return totals

    def _score_windows(self, windows: list[Window]) -> list[tuple[float, bool]]:
        """Each window's (summed log p of its scored tokens, whether each is the argmax), in order.

        Batches hold windows of similar length (longest first), right-padded: with causal attention
        the padding after a window changes none of its positions.
        """
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(windows)
        for start in range(0, len(order), self.batch_size):
            batch = [windows[i] for i in order[start : start + self.batch_size]]
            for i, result in zip(order[start : start + self.batch_size], self._score_batch(batch)):
                results[i] = result
        return results

    @torch.no_grad()
    def _score_batch(self, batch: list[Window]) -> list[tuple[float, bool]]:
        inputs, targets = zip(*(window_inputs_and_targets(window) for window in batch))
        width = max(len(tokens) for tokens in inputs)
        idx = torch.zeros(len(batch), width, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            idx[row, : len(tokens)] = torch.tensor(tokens)
        logits = self.model(idx.to(self.device)).logits  # (B, T, vocab_size)
        results = []
        for row, (tokens, scored) in enumerate(zip(inputs, targets)):
            positions = slice(len(tokens) - len(scored), len(tokens))
            logprobs = logits[row, positions].float().log_softmax(dim=-1)  # (scored, vocab_size)
            wanted = torch.tensor(scored, device=logprobs.device)
            picked = logprobs.gather(-1, wanted[:, None]).squeeze(-1)
            is_greedy = bool((logprobs.argmax(dim=-1) == wanted).all())
            results.append((picked.sum().item(), is_greedy))
        return results

    # ---- generation

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(request) for request in requests]

    @torch.no_grad()
    def _generate_one(self, request: Instance) -> str:
        context, gen_kwargs = request.args
        settings = normalize_gen_kwargs(gen_kwargs, DEFAULT_MAX_GEN_TOKS)
        if settings.get("do_sample"):
            raise ConfigError(
                f"task {request.task_name} asks for sampled generation (do_sample=true); "
                "moe-gpt's evaluation decodes greedily only: choose another task or set do_sample: false in its YAML"
            )
        until = handle_stop_sequences(settings.get("until"), eos=ENDOFTEXT)
        prompt = self.tok_encode(context)[-self.block_size :] or [self.eot_token_id]
        tokens = torch.tensor([prompt], dtype=torch.long, device=self.device)
        generated: list[int] = []
        cache = None
        for _ in range(settings["max_gen_toks"]):
            # The cache covers everything but the newest token; past block_size the context slides.
            logits, cache = next_token_logits(self.model, tokens, cache, use_cache=True)
            token = choose_token(logits.float(), 0.0, None, None, None)  # greedy: (1, 1)
            tokens = torch.cat([tokens, token], dim=1)
            generated.append(int(token))
            text = self.tok_decode(generated)
            if any(stop in text for stop in until):
                break
        return cut_at_first_stop(self.tok_decode(generated), until)


def scored_windows(tokens: list[int], scored: int, block_size: int) -> list[Window]:
    """Model inputs that score the last ``scored`` of ``tokens``, a block at a time.

    Each window predicts up to ``block_size`` consecutive targets from the ``block_size`` tokens
    before its last target (fewer at the start): the context is cut from the left, never a scored
    token. One window when the targets fit in a block, which is what lm-eval's ``hf`` model computes.
    """
    if scored >= len(tokens):
        raise ValueError(f"scoring {scored} of {len(tokens)} tokens: at least one token must come before them")
    windows = []
    for first in range(len(tokens) - scored, len(tokens), block_size):
        end = min(first + block_size, len(tokens))  # targets tokens[first:end]
        windows.append((tokens[max(0, end - 1 - block_size) : end], end - first))
    return windows


def window_inputs_and_targets(window: Window) -> tuple[list[int], list[int]]:
    """The model's input (all but the last token) and the scored targets (the last ``scored`` tokens)."""
    tokens, scored = window
    return tokens[:-1], tokens[-scored:]


def cut_at_first_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        text = text.split(stop)[0]
    return text

