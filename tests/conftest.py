"""Shared test fixtures."""

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from moe_gpt.config import DataConfig

# Set before datasets / huggingface_hub are imported: tests never reach the network, and
# the tokenizer always comes from the local ranks file, the same on every machine.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("MOE_GPT_TOKENIZER_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
TOKENIZER_DIR = REPO_ROOT / "data" / "tokenizer"


@pytest.fixture(scope="session")
def gpt2():
    """The GPT-2 tokenizer from data/tokenizer/gpt2.tiktoken (offline path)."""
    if not (TOKENIZER_DIR / "gpt2.tiktoken").is_file():
        pytest.fail("data/tokenizer/gpt2.tiktoken is missing; run `python scripts/fetch_tokenizer.py` once", pytrace=False)
    from moe_gpt.data import load_gpt2_tokenizer

    return load_gpt2_tokenizer(TOKENIZER_DIR, offline=True)


@pytest.fixture
def text_corpus(tmp_path: Path, gpt2) -> Callable[..., DataConfig]:  # gpt2: fail early if the ranks file is missing
    """Factory: write ``{relative path: text or bytes}`` under tmp_path/corpus, return a DataConfig for it."""

    def make(files: dict[str, str | bytes], **overrides) -> DataConfig:
        root = tmp_path / "corpus"
        for relative, content in files.items():
            path = root / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
        settings = dict(
            corpus="text",
            name="tiny",
            paths=[str(root)],
            cache_dir=str(tmp_path / "cache"),
            tokenizer_dir=str(TOKENIZER_DIR),
            val_fraction=0.3,
            batch_size=2,
        )
        return DataConfig(**{**settings, **overrides})

    return make
