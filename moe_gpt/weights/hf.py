"""GPT-2 in Hugging Face ``transformers`` format: load it into our dense GPT, export ours back.

Our module names equal GPT-2's, so the state dicts differ only in three ways: HF's attention
and MLP projections are ``Conv1D`` layers holding (in, out) weights where ``nn.Linear`` holds
(out, in); our embedding has padded vocabulary rows; HF's older checkpoints carry causal-mask
buffers that are no weights. Only HF configs we reproduce exactly are accepted.

``transformers`` is imported inside the functions that need it: it takes seconds to import,
and training without ``init_from`` never does.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from torch import Tensor

from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.data.tokenizer import ENDOFTEXT, ENDOFTEXT_ID, RANKS_FILENAME
from moe_gpt.model.gpt import GPT
from moe_gpt.weights.safe_load import holds_code, refused_as_code

# model/gpt.py builds nn.LayerNorm with its default eps; tests/test_hf.py pins that the two agree.
LAYER_NORM_EPS = 1e-5
CONV1D_WEIGHT = re.compile(r"\.(c_attn|c_proj|c_fc)\.weight$")
MASK_BUFFER = re.compile(r"\.attn\.(bias|masked_bias)$")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # in the order from_pretrained prefers them

# Our GPTConfig's size fields and their names in HF's GPT2Config.
SIZE_NAMES = {
    "block_size": "n_positions",
    "vocab_size": "vocab_size",
    "n_layer": "n_layer",
    "n_head": "n_head",
    "n_embd": "n_embd",
}
# HF GPT-2 settings our GPT has no switch for: (attribute, value we implement, what it changes).
FIXED_HF_SETTINGS = (
    ("activation_function", "gelu_new", "the MLP activation (ours is GELU with the tanh approximation)"),
    ("layer_norm_epsilon", LAYER_NORM_EPS, "the LayerNorm epsilon"),
    ("scale_attn_weights", True, "attention scaling by 1/sqrt(head_dim)"),
    ("scale_attn_by_inverse_layer_idx", False, "attention scaling by layer depth"),
    ("reorder_and_upcast_attn", False, "the attention's float32 upcast"),
    ("add_cross_attention", False, "cross-attention layers"),
    ("tie_word_embeddings", True, "the tied input and output embeddings"),
)


def load_hf_gpt2(source: str) -> GPT:
    """A dense GPT (eval mode) holding the weights of a ``transformers`` GPT-2.

    ``source`` is a directory written by ``save_pretrained`` or, online, a hub name such as ``gpt2``.
    Dropout is a training setting and starts at 0 here; a training run uses its own ``model.dropout``.
    """
    from transformers import GPT2LMHeadModel

    location = locate(source)
    hf_config = _load_hf_config(location, source)
    config = gpt_config_from_hf(hf_config, source)
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(location, config=hf_config)
    except pickle.UnpicklingError as error:
        if holds_code(error):
            instead = "Use weights saved as model.safetensors (save_pretrained's default), which hold tensors only"
            raise refused_as_code(_weights_name(location), instead) from None
        raise _damaged(location, error) from None
    except (SafetensorError, RuntimeError, EOFError) as error:  # what safetensors and torch.load raise on cut bytes
        raise _damaged(location, error) from None
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{source}: no GPT-2 weights could be read ({reason})") from None
    model = GPT(config)
    model.load_state_dict(state_dict_from_hf(hf_model.state_dict(), config))
    return model.eval()


def _weights_name(location: str) -> str:
    """The file ``from_pretrained`` reads in a local folder (the first it would choose), else the hub name."""
    folder = Path(location)
    return next((str(folder / name) for name in WEIGHT_FILES if (folder / name).is_file()), location)


def _damaged(location: str, error: Exception) -> ConfigError:
    reason = (str(error).strip().splitlines() or [type(error).__name__])[0]
    return ConfigError(f"{_weights_name(location)} is damaged or truncated ({reason}); save or download it again")


def locate(source: str) -> str:
    """A local directory's expanded path, else the hub name unchanged."""
    path = Path(source).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ConfigError(f"{source} is a file; pass the directory that save_pretrained wrote, or a hub name like gpt2")
    # Hub names are "name" or "owner/name"; anything else can only mean a local directory.
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise ConfigError(f"{source} does not exist; pass a directory that save_pretrained wrote, or a hub name like gpt2")
    return source


def _load_hf_config(location: str, source: str) -> Any:
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(location)
    except (OSError, ValueError) as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"{source} is neither a save_pretrained directory nor a reachable hub model ({reason})") from None
    if hf_config.model_type != "gpt2":
        raise ConfigError(f"{source} holds a {hf_config.model_type!r} model; only GPT-2 (model_type 'gpt2') loads")
    return hf_config


def gpt_config_from_hf(hf_config: Any, source: str) -> GPTConfig:
    """Our dense GPTConfig for an HF GPT2Config; a ConfigError for anything we cannot reproduce."""
    for attribute, ours, meaning in FIXED_HF_SETTINGS:
        value = getattr(hf_config, attribute)
        if value != ours:
            raise ConfigError(f"{source}: {attribute}={value!r} ({meaning}) is not supported; only {ours!r} is")
    if hf_config.n_inner not in (None, 4 * hf_config.n_embd):
        raise ConfigError(
            f"{source}: n_inner={hf_config.n_inner} is not supported; the MLP width must be 4*n_embd={4 * hf_config.n_embd}"
        )
    sizes = {ours: getattr(hf_config, theirs) for ours, theirs in SIZE_NAMES.items()}
    return GPTConfig(**sizes, dropout=0.0, bias=True, use_moe=False)  # GPT-2 is dense and always has biases


def state_dict_from_hf(hf_state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    ours = {}
    for key, value in hf_state.items():
        if MASK_BUFFER.search(key):
            continue
        ours[key] = value.t() if CONV1D_WEIGHT.search(key) else value
    wte = ours["transformer.wte.weight"]
    # Padded rows are no tokens; the model keeps them out of every softmax, so zeros are fine.
    padding = wte.new_zeros(config.padded_vocab_size - wte.shape[0], wte.shape[1])
    ours["transformer.wte.weight"] = ours["lm_head.weight"] = torch.cat([wte, padding])
    return ours


def state_dict_to_hf(state: dict[str, Tensor], config: GPTConfig) -> dict[str, Tensor]:
    hf_state = {key: value.t() if CONV1D_WEIGHT.search(key) else value for key, value in state.items()}
    hf_state["transformer.wte.weight"] = hf_state["lm_head.weight"] = state["lm_head.weight"][: config.vocab_size]
    return hf_state


def hf_config_from_gpt(config: GPTConfig) -> Any:
    from transformers import GPT2Config

    # GPT-2's end-of-text token marks sequence ends; a smaller vocabulary has no such token.
    eos = ENDOFTEXT_ID if config.vocab_size > ENDOFTEXT_ID else None
    return GPT2Config(
        **{theirs: getattr(config, ours) for ours, theirs in SIZE_NAMES.items()},
        n_inner=None,
        resid_pdrop=config.dropout,
        embd_pdrop=config.dropout,
        attn_pdrop=config.dropout,
        bos_token_id=eos,
        eos_token_id=eos,
        **{attribute: ours for attribute, ours, _ in FIXED_HF_SETTINGS},
    )


def export_hf_gpt2(model: GPT, directory: str | Path, overwrite: bool = False) -> Path:
    """Write a dense GPT where ``GPT2LMHeadModel.from_pretrained(directory)`` loads it; returns the directory."""
    from transformers import GPT2LMHeadModel

    check_exportable(model.config)
    directory = Path(directory)
    check_output_directory(directory, overwrite)
    hf_model = GPT2LMHeadModel(hf_config_from_gpt(model.config))
    hf_model.load_state_dict(state_dict_to_hf(model.state_dict(), model.config))
    hf_model.save_pretrained(directory)
    return directory


def export_hf_tokenizer(tokenizer_dir: Path, directory: Path, max_length: int) -> None:
    """GPT-2's tokenizer beside an export (``tokenizer.json`` and its settings), converted from the local ranks
    file by transformers' own tiktoken converter: ``AutoTokenizer.from_pretrained(directory)`` then encodes as
    training did."""
    from tiktoken_ext.openai_public import r50k_pat_str
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    ranks = tokenizer_dir / RANKS_FILENAME
    if not ranks.is_file():
        raise ConfigError(f"no {ranks} to export the tokenizer from; run `python scripts/fetch_tokenizer.py` once")
    converted = TikTokenConverter(vocab_file=str(ranks), pattern=r50k_pat_str, extra_special_tokens=[ENDOFTEXT])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=converted.converted(), bos_token=ENDOFTEXT, eos_token=ENDOFTEXT, unk_token=ENDOFTEXT,
        model_max_length=max_length,
    )  # fmt: skip
    tokenizer.save_pretrained(directory)


def check_exportable(config: GPTConfig) -> None:
    if config.use_moe:
        raise ConfigError("only dense models export to HF GPT-2; this one has MoE layers (model.use_moe=true)")
    if not config.bias:
        raise ConfigError("only models with biases (model.bias=true) export to HF GPT-2, which always has them")


def check_output_directory(directory: Path, overwrite: bool) -> None:
    if directory.is_file():
        raise ConfigError(f"{directory} is a file; pass a directory to export into")
    if directory.is_dir() and any(directory.iterdir()) and not overwrite:
        raise ConfigError(f"{directory} is not empty; choose an empty or new directory, or overwrite it (--overwrite)")
