"""Tokenise a corpus once into ``train.bin`` / ``val.bin`` and reuse them while the inputs are unchanged.

A cache lives in ``<data.cache_dir>/<data.name>-<key>/`` where ``key`` is a short
sha256 of everything that decides its contents (corpus files and their sizes and
mtimes, or the hub dataset's coordinates; tokenizer; val_fraction; encoding policy;
FORMAT_VERSION). Changed inputs give a new directory; old ones are never touched.
A build writes into a hidden temp directory that is renamed into place at the end,
so an interrupted build never leaves a half cache behind.

Files: ``train.bin`` and ``val.bin`` hold uint16 token ids (``np.memmap``-readable),
each document followed by ``<|endoftext|>``; ``meta.json`` holds counts, each token
file's sha256, and the key inputs. Every load checks the files' sizes and sha256s
against it, so a file changed after the build is reported instead of trained on.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken

from moe_gpt.config import DataConfig
from moe_gpt.data.corpus import Corpus, load_corpus, resolve_corpus
from moe_gpt.data.errors import DataError
from moe_gpt.data.split import SplitWriter, ensure_both_splits, goes_to_validation, split_score

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the files' layout, meta.json's checks or the split rule change
TOKEN_DTYPE = np.uint16  # GPT-2's 50257 ids fit; half the size of int32
ENCODE_BATCH_DOCUMENTS = 256  # documents per encode_ordinary_batch call
META_FILENAME = "meta.json"
SPLITS = ("train", "val")
# hashlib's fastest digest here: on an 8 MiB file sha256 ~1.5 GiB/s (SHA-NI), blake2b ~1.1 GiB/s.
CHECKSUM = "sha256"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class TokenCache:
    directory: Path
    train_path: Path
    val_path: Path
    train_tokens: int
    val_tokens: int
    train_documents: int
    val_documents: int
    reused: bool  # True: found on disk; False: built by this call


_ANNOUNCED: set[Path] = set()  # caches this process has already logged


def build_or_load_token_cache(cfg: DataConfig, tokenizer: tiktoken.Encoding) -> TokenCache:
    """Return the token cache for ``cfg``, building it first when no cache has these inputs."""
    _check_name(cfg.name)
    _check_vocab_fits(tokenizer)
    started = time.perf_counter()
    spec = resolve_corpus(cfg)
    key_inputs = cache_key_inputs(cfg, spec.fingerprint, tokenizer)
    directory = Path(cfg.cache_dir) / f"{cfg.name}-{cache_key(key_inputs)}"
    if directory.exists():
        cache = open_token_cache(directory, reused=True)
    else:
        cache = _build(cfg, tokenizer, key_inputs, directory, load_corpus(cfg, spec))
    # Fit and the final validation both set the data up: say it once per process and cache.
    level = logging.DEBUG if cache.reused and directory in _ANNOUNCED else logging.INFO
    _ANNOUNCED.add(directory)
    log.log(
        level,
        "token cache %s %s in %.2fs: train %d tokens (%d docs), val %d tokens (%d docs)",
        directory,
        "reused" if cache.reused else "built",
        time.perf_counter() - started,
        cache.train_tokens,
        cache.train_documents,
        cache.val_tokens,
        cache.val_documents,
    )
    return cache


def cache_key_inputs(
    cfg: DataConfig, corpus_fingerprint: dict[str, Any], tokenizer: tiktoken.Encoding
) -> dict[str, Any]:
    """Everything that decides the cache's contents (and nothing that does not, like batch_size)."""
    return {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_fingerprint,
        "max_documents": cfg.max_documents,
        "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab},
        "val_fraction": cfg.val_fraction,
        "encoding_errors": cfg.encoding_errors,
    }


def cache_key(key_inputs: dict[str, Any]) -> str:
    canonical = json.dumps(key_inputs, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def open_token_cache(directory: Path, reused: bool) -> TokenCache:
    """Read ``meta.json`` and check the token files have the sizes and checksums it records."""
    try:
        meta = json.loads((directory / META_FILENAME).read_text())
        cache = _cache_from_meta(directory, meta, reused)
        checksums = {directory / f"{split}.bin": str(meta[split][CHECKSUM]) for split in SPLITS}
        complete = all(
            path.stat().st_size == tokens * np.dtype(TOKEN_DTYPE).itemsize
            for path, tokens in ((cache.train_path, cache.train_tokens), (cache.val_path, cache.val_tokens))
        )
    except (OSError, ValueError, KeyError, TypeError):
        complete = False
    if not complete:
        # Renames make this impossible for our own builds; something else changed the
        # directory. Never overwrite it: the user decides.
        raise DataError(f"token cache {directory} is incomplete or damaged; delete that directory to rebuild it")
    _verify_checksums(directory, checksums)
    return cache


def _verify_checksums(directory: Path, checksums: dict[Path, str]) -> None:
    # Sizes catch a truncated file; only the content catches one overwritten in place (say, with zeros).
    started = time.perf_counter()
    for path, expected in checksums.items():
        if _file_checksum(path) != expected:
            raise DataError(
                f"token cache {directory}: {path.name} does not match the {CHECKSUM} in {META_FILENAME}, "
                "so it changed after the build; delete that directory to rebuild it"
            )
    # Hashing reads every token, so on a large cache it is most of the "reused in" time.
    log.debug("token cache %s: token files' %s checked in %.2fs", directory, CHECKSUM, time.perf_counter() - started)


def _file_checksum(path: Path) -> str:
    stat = path.stat()
    return _checksum_of(str(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _checksum_of(path: str, size: int, mtime_ns: int) -> str:
    # A run opens its cache several times (prepare, fit, validate): each file is hashed once per
    # process, and again whenever its size or modification time changes.
    with open(path, "rb") as f:
        return hashlib.file_digest(f, CHECKSUM).hexdigest()


def _cache_from_meta(directory: Path, meta: dict[str, Any], reused: bool) -> TokenCache:
    return TokenCache(
        directory=directory,
        train_path=directory / "train.bin",
        val_path=directory / "val.bin",
        train_tokens=int(meta["train"]["tokens"]),
        val_tokens=int(meta["val"]["tokens"]),
        train_documents=int(meta["train"]["documents"]),
        val_documents=int(meta["val"]["documents"]),
        reused=reused,
    )


def _build(
    cfg: DataConfig, tokenizer: tiktoken.Encoding, key_inputs: dict[str, Any], directory: Path, corpus: Corpus
) -> TokenCache:
    directory.parent.mkdir(parents=True, exist_ok=True)
    # Hidden temp dir in the same parent, so the final rename is atomic.
    staging = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.building-"))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the published cache is ordinary data
    try:
        started = time.perf_counter()
        counts = tokenize_documents(corpus, tokenizer, staging, cfg.val_fraction)
        # Hash the finished files: the split's fix-ups may rewrite them after the writers close.
        for split in SPLITS:
            counts[split][CHECKSUM] = _file_checksum(staging / f"{split}.bin")
        meta = {
            **counts,
            "format_version": FORMAT_VERSION,
            "name": cfg.name,
            "key": directory.name.rsplit("-", 1)[1],
            "key_inputs": key_inputs,
            "tokenizer": {"name": tokenizer.name, "n_vocab": tokenizer.n_vocab, "eot_token": tokenizer.eot_token},
            "dtype": np.dtype(TOKEN_DTYPE).name,
            "replaced_characters": corpus.replaced_characters,
            "files_with_replacements": corpus.files_with_replacements,
            "build_seconds": round(time.perf_counter() - started, 3),
            "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        (staging / META_FILENAME).write_text(json.dumps(meta, indent=1) + "\n")
        return _publish(staging, directory, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)  # only our own staging dir
        raise


def _publish(staging: Path, directory: Path, meta: dict[str, Any]) -> TokenCache:
    try:
        os.rename(staging, directory)
    except OSError:
        if not directory.exists():
            raise
        # Another process published the same key first; its files are equivalent.
        shutil.rmtree(staging, ignore_errors=True)
        return open_token_cache(directory, reused=True)
    return _cache_from_meta(directory, meta, reused=False)


def tokenize_documents(
    corpus: Corpus, tokenizer: tiktoken.Encoding, out_dir: Path, val_fraction: float
) -> dict[str, Any]:
    """Encode every document, append EOT, and write each to train.bin or val.bin; return the counts."""
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    train, val = SplitWriter(out_dir / "train.bin", TOKEN_DTYPE), SplitWriter(out_dir / "val.bin", TOKEN_DTYPE)
    seen = skipped = 0
    with train, val:
        for batch in corpus.documents.iter(batch_size=ENCODE_BATCH_DOCUMENTS):
            seen += len(batch["text"])
            _check_texts(batch["text"])
            texts = [text for text in batch["text"] if text and not text.isspace()]
            skipped += len(batch["text"]) - len(texts)
            encoded = tokenizer.encode_ordinary_batch(texts, num_threads=threads)
            for text, ids in zip(texts, encoded, strict=True):
                ids.append(tokenizer.eot_token)
                score = split_score(text)
                (val if goes_to_validation(score, val_fraction) else train).append(ids, score)
    if train.documents + val.documents == 0:
        raise DataError(
            f"the corpus has no text: all {seen} document(s) are empty or whitespace; "
            "check data.paths, data.hub_path or data.text_field"
        )
    ensure_both_splits(train, val, val_fraction)
    return {
        "train": {"tokens": train.tokens, "documents": train.documents},
        "val": {"tokens": val.tokens, "documents": val.documents},
        "skipped_empty_documents": skipped,
    }


def _check_texts(values: list[Any]) -> None:
    # A streamed dataset may not declare its column types, so the first wrong value is caught here.
    wrong = next((value for value in values if value is not None and not isinstance(value, str)), None)
    if wrong is not None:
        raise DataError(
            f"the text column holds {type(wrong).__name__} values, not text; set data.text_field to a text column"
        )


def _check_name(name: str) -> None:
    if not _NAME_PATTERN.fullmatch(name):
        raise DataError(f"data.name={name!r} is used as a directory name; use letters, digits, '.', '_' or '-'")


def _check_vocab_fits(tokenizer: tiktoken.Encoding) -> None:
    limit = np.iinfo(TOKEN_DTYPE).max + 1
    if tokenizer.n_vocab > limit:
        raise DataError(
            f"tokenizer {tokenizer.name} has {tokenizer.n_vocab} ids, more than uint16 token files hold ({limit})"
        )
