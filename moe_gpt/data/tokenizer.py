"""GPT-2 byte-pair encoding through tiktoken, usable without a network connection.

The encoding is built from the local copy of GPT-2's ranks that
``scripts/fetch_tokenizer.py`` puts in ``data/tokenizer/gpt2.tiktoken``, pinned by its
sha256, so with that file no run reaches for the network. Only without it do we ask
tiktoken, which downloads the ranks on first use (and caches them).
"""

from __future__ import annotations

import functools
import logging
import os
from pathlib import Path

import tiktoken
import tiktoken.load
from tiktoken_ext.openai_public import r50k_pat_str

from moe_gpt.data.errors import DataError

log = logging.getLogger(__name__)

RANKS_FILENAME = "gpt2.tiktoken"
# sha256 of GPT-2's ranks in tiktoken's format (the file tiktoken calls r50k_base).
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
GPT2_N_VOCAB = 50257
ENDOFTEXT = "<|endoftext|>"
ENDOFTEXT_ID = 50256
# Set to 1 to never ask tiktoken, whose download/cache is the fallback when the local
# ranks file is missing (tests do this so they never reach the network).
OFFLINE_ENV = "MOE_GPT_TOKENIZER_OFFLINE"


def load_gpt2_tokenizer(tokenizer_dir: str | Path = "data/tokenizer", offline: bool | None = None) -> tiktoken.Encoding:
    """Return the GPT-2 encoding from ``<tokenizer_dir>/gpt2.tiktoken``, else tiktoken's own.

    ``offline=True`` (or ``MOE_GPT_TOKENIZER_OFFLINE=1``) never falls back to tiktoken's
    download: without the local file it is an error.
    """
    if offline is None:
        offline = os.environ.get(OFFLINE_ENV, "").strip() not in ("", "0")
    return _load_cached(str(Path(tokenizer_dir).expanduser().resolve()), offline)


@functools.cache
def _load_cached(tokenizer_dir: str, offline: bool) -> tiktoken.Encoding:
    # Building an Encoding parses 50k ranks (~1 s), so do it once per process.
    path = Path(tokenizer_dir) / RANKS_FILENAME
    if path.is_file():  # first, so a machine with the file never tries (or logs) a download
        return _from_ranks_file(path)
    if not offline:
        encoding = _from_tiktoken()
        if encoding is not None:
            return encoding
    reason = "offline mode is on" if offline else "tiktoken could not download it"
    raise DataError(
        f"GPT-2 tokenizer unavailable: {reason} and {path} does not exist; "
        "run `python scripts/fetch_tokenizer.py` once (or connect to the internet)"
    )


def _from_tiktoken() -> tiktoken.Encoding | None:
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as exc:  # offline this is a requests ConnectionError; the caller reports what to do
        log.info("tiktoken could not provide gpt2 (%s: %.100s)", type(exc).__name__, exc)
        return None


def _from_ranks_file(path: Path) -> tiktoken.Encoding:
    try:
        ranks = tiktoken.load.load_tiktoken_bpe(str(path), expected_hash=GPT2_RANKS_SHA256)
    except ValueError as exc:  # tiktoken reports a hash mismatch or an unparsable line as ValueError
        raise DataError(
            f"{path} is not GPT-2's BPE ranks ({str(exc).splitlines()[0][:120]}); "
            "delete it and run `python scripts/fetch_tokenizer.py`"
        ) from None
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: ENDOFTEXT_ID},
        explicit_n_vocab=GPT2_N_VOCAB,
    )
