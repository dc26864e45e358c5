"""Reading training checkpoints safely: tensors and plain Python values only, never code.

``torch.load(weights_only=True)`` refuses any pickled object that is not a tensor, a container or
a plain value, so a checkpoint carrying a payload is rejected before the payload can run; a file
whose bytes changed since it was written (its stored CRC-32s) is refused before it is unpickled. Every
entry point (resume, init_from, generation, analysis, export) reads checkpoints through here, and
every problem with the file is one line naming it and what to do.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from moe_gpt.config import ConfigError, GPTConfig, MoEConfig
from moe_gpt.model.gpt import GPT

ARCHITECTURE_KEYS = ("n_layer", "n_embd", "n_head", "block_size", "vocab_size", "bias")
MOE_ARCHITECTURE_KEYS = ("num_experts", "every_n_layers", "first_k_dense", "num_shared_experts")
MODEL_PREFIX = "model."  # the LightningModule holds the GPT as ``self.model``
COMPILED_PREFIX = "_orig_mod."  # what torch.compile's wrapper adds to every key


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at ``path`` as a dict; a ConfigError for a missing, damaged, unsafe or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist; pass a .ckpt from a run's checkpoints/ folder")
    if path.stat().st_size == 0:
        raise ConfigError(f"checkpoint {path} is empty (0 bytes); use another checkpoint of that run, e.g. best.ckpt")
    check_stored_checksums(path)
    try:
        # mmap: tensors are read on first use, so checking a large checkpoint costs little memory.
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        if not holds_code(error):
            raise _damaged(path) from None
        raise refused_as_code(
            f"checkpoint {path}", "Load only checkpoints written by moe-gpt (they hold tensors and plain values)"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile):
        raise _damaged(path) from None
    if (
        not isinstance(checkpoint, dict)
        or "state_dict" not in checkpoint
        or "model_config" not in checkpoint.get("hyper_parameters", {})
    ):
        raise ConfigError(
            f"{path} is not a moe-gpt training checkpoint (no model and model config in it); "
            "pass a .ckpt from a run's checkpoints/ folder"
        )
    return checkpoint


def holds_code(error: pickle.UnpicklingError) -> bool:
    """Whether ``torch.load(weights_only=True)`` refused a file for a pickled object that is no plain data
    (rather than for damaged bytes)."""
    return "weights only" in str(error).lower()


def refused_as_code(what: str, instead: str) -> ConfigError:
    """The one line for a file refused before its payload could run. (torch's own message advises
    ``weights_only=False``, which would run it.)"""
    return ConfigError(f"{what} holds Python objects that would run as code when loaded; refused. {instead}")


def check_stored_checksums(path: Path) -> None:
    """Every record of the checkpoint's zip file against the CRC-32 stored with it.

    torch.save stores one per record (``torch.serialization.config.save.compute_crc32``, on by
    default) but torch.load never checks them, so a file with flipped bytes would load as wrong
    weights. The checksums live inside the file, so no kill can leave them out of step with it.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            failed = archive.testzip()  # the first record whose bytes do not match its CRC, or None
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        raise _damaged(path) from None
    if failed is not None:
        raise ConfigError(
            f"checkpoint {path} is damaged: its record {failed} does not match the checksum stored when it was "
            "written; use another checkpoint of that run, e.g. best.ckpt"
        )


def _damaged(path: Path) -> ConfigError:
    return ConfigError(
        f"checkpoint {path} is damaged or truncated (it cannot be read as a torch checkpoint); "
        "use another checkpoint of that run, e.g. best.ckpt"
    )


def model_config(checkpoint: dict[str, Any]) -> GPTConfig:
    """The GPTConfig the checkpoint's model was built with."""
    config = dict(checkpoint["hyper_parameters"]["model_config"])
    try:
        return GPTConfig(**{**config, "moe": MoEConfig(**config["moe"])})
    except (TypeError, KeyError) as error:  # keys this version of moe-gpt does not know
        raise ConfigError(f"the checkpoint's model config does not fit this version of moe-gpt ({error})") from None


def model_state_dict(checkpoint: dict[str, Any]) -> dict[str, Tensor]:
    """The GPT's own weights, under the GPT's key names (also for checkpoints of compiled models)."""
    state = {}
    for key, tensor in checkpoint["state_dict"].items():
        if key.startswith(MODEL_PREFIX):
            state[key.removeprefix(MODEL_PREFIX).removeprefix(COMPILED_PREFIX)] = tensor
    return state


def load_model(path: str | Path, map_location: str = "cpu") -> GPT:
    """The GPT inside a training checkpoint, in eval mode (for generation, analysis and export)."""
    return model_from_checkpoint(read_checkpoint(path), path).to(map_location).eval()


def model_from_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> GPT:
    """The GPT of a checkpoint that ``read_checkpoint`` returned (in train mode, as built)."""
    model = GPT(model_config(checkpoint))
    try:
        model.load_state_dict(model_state_dict(checkpoint))
    except RuntimeError as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(f"checkpoint {path}: its weights do not fit its model config ({reason})") from None
    return model


def check_weights_fit(source: GPTConfig, run: GPTConfig, what: str, keys: tuple[str, ...] = ARCHITECTURE_KEYS) -> None:
    """The weights of a ``source`` model must fit ``run``'s model; the error names the first key that differs."""
    differences = [(f"model.{key}", getattr(source, key), getattr(run, key)) for key in keys]
    if source.use_moe and run.use_moe:
        differences += [
            (f"model.moe.{key}", getattr(source.moe, key), getattr(run.moe, key)) for key in MOE_ARCHITECTURE_KEYS
        ]
        differences.append(("model.moe.hidden_size", source.ffn_hidden_size, run.ffn_hidden_size))
    for key, source_value, run_value in differences:
        if source_value != run_value:
            raise ConfigError(
                f"{what} has {key}={source_value} but this run has {key}={run_value}; set {key}={source_value}"
            )
