"""The train/validation split: by document, decided by a hash of the document's text.

A document goes to validation when ``split_score(text) < val_fraction``. The score is
a sha256 of the text, so the split is the same on every run and machine, does not
depend on document order, and puts exact duplicates in the same split (no leakage).
When the hash sends every document to one side, the document nearest the boundary is
moved so train always has one document and, given two or more, validation has one.
A corpus of a single document (e.g. one book) is split inside it instead: the last
``val_fraction`` of its tokens are validation.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np


def split_score(text: str) -> float:
    """A stable pseudo-random number in [0, 1) for a document."""
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def goes_to_validation(score: float, val_fraction: float) -> bool:
    """The split rule: a document whose ``split_score`` is below ``val_fraction`` is a validation one
    (before ``ensure_both_splits`` fills an empty side)."""
    return score < val_fraction


@dataclass(frozen=True)
class Span:
    score: float
    offset: int  # in tokens
    length: int


class SplitWriter:
    """Appends documents' token ids to one split's file.

    Remembers the lowest- and highest-scoring documents, the ones to move if the other
    split ends up empty.
    """

    def __init__(self, path: Path, dtype: type[np.unsignedinteger]) -> None:
        self.path, self.dtype = path, np.dtype(dtype)
        self.tokens = self.documents = 0
        self.lowest: Span | None = None
        self.highest: Span | None = None
        self._file = None

    def __enter__(self) -> SplitWriter:
        self._file = open(self.path, "wb")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())  # on disk before the cache directory is published
        self._file.close()

    def append(self, ids: list[int], score: float) -> None:
        np.asarray(ids, dtype=self.dtype).tofile(self._file)
        span = Span(score, self.tokens, len(ids))
        if self.lowest is None or score < self.lowest.score:
            self.lowest = span
        if self.highest is None or score > self.highest.score:
            self.highest = span
        self.tokens += len(ids)
        self.documents += 1


def ensure_both_splits(train: SplitWriter, val: SplitWriter, val_fraction: float) -> None:
    """After writing (files closed): make sure neither split is empty, moving as little as possible."""
    if train.documents == 0 and val.documents > 0:
        _move(val.highest, val, train)
    if train.documents == 1 and val.documents == 0:
        _split_last_tokens(train, val, val_fraction)
    elif val.documents == 0 and train.documents >= 2:
        _move(train.lowest, train, val)


def _split_last_tokens(train: SplitWriter, val: SplitWriter, val_fraction: float) -> None:
    # One document: no document-level split exists, so cut it (as one would cut a book).
    val_tokens = min(max(1, round(train.tokens * val_fraction)), train.tokens - 1)  # both sides non-empty
    keep = train.tokens - val_tokens
    tokens = np.memmap(train.path, dtype=train.dtype, mode="r")
    with open(val.path, "ab") as f:
        tokens[keep:].tofile(f)
    del tokens
    os.truncate(train.path, keep * train.dtype.itemsize)
    train.tokens, val.tokens, val.documents = keep, val_tokens, 1


def _move(span: Span, source: SplitWriter, target: SplitWriter) -> None:
    # Only needed when one split is empty, so target is empty and the move is its only document.
    tokens = np.memmap(source.path, dtype=source.dtype, mode="r")
    remainder = source.path.with_suffix(".tmp")
    with open(target.path, "ab") as f:
        tokens[span.offset : span.offset + span.length].tofile(f)
    with open(remainder, "wb") as f:  # stream the rest out rather than load the split into memory
        tokens[: span.offset].tofile(f)
        tokens[span.offset + span.length :].tofile(f)
    del tokens
    os.replace(remainder, source.path)
    source.tokens -= span.length
    source.documents -= 1
    target.tokens += span.length
    target.documents += 1
