"""Data pipeline: corpus -> GPT-2 tokens cached on disk -> next-token windows for Lightning.

Exports load on first use (PEP 562): importing Lightning takes seconds, and the
tokenizer setup script should not pay for it.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataError": "moe_gpt.data.errors",
    "GPT2_RANKS_SHA256": "moe_gpt.data.tokenizer",
    "load_gpt2_tokenizer": "moe_gpt.data.tokenizer",
    "Corpus": "moe_gpt.data.corpus",
    "CorpusSpec": "moe_gpt.data.corpus",
    "STDLIB_EXCLUDED_DIRS": "moe_gpt.data.corpus",
    "load_corpus": "moe_gpt.data.corpus",
    "resolve_corpus": "moe_gpt.data.corpus",
    "FORMAT_VERSION": "moe_gpt.data.tokens",
    "TokenCache": "moe_gpt.data.tokens",
    "build_or_load_token_cache": "moe_gpt.data.tokens",
    "TokenDataModule": "moe_gpt.data.datamodule",
    "TokenWindows": "moe_gpt.data.datamodule",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__
