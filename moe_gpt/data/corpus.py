"""Documents from a DataConfig: Python's standard library, local text files, or a Hugging Face dataset.

Every corpus becomes a ``datasets`` dataset with one column, ``text``, one row per
document. Local files (``stdlib`` and ``text``) are streamed through the ``text``
builder with ``sample_by="document"``, so each file is one document, in the order
resolved here; its newlines are normalised to ``\\n`` (universal newlines).

Which files a directory stands for (``corpus=text``): every regular file below it,
recursively, except hidden ones (a name starting with ``.``, e.g. ``.git``). Use a glob
such as ``notes/**/*.md`` to pick file types. Globs are expanded with ``**`` recursion.
"""

from __future__ import annotations

import glob
import logging
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets

from moe_gpt.config import DataConfig
from moe_gpt.data.errors import DataError

log = logging.getLogger(__name__)

# Directories left out of the stdlib corpus: installed third-party packages, the test
# suites (half the library, much of it fixtures), IDLE and lib2to3 (tool code with their
# own test data), demos, and generated tables (pydoc topics, codec charmaps). What is
# left is ~450 hand-written modules, about 9 MB.
STDLIB_EXCLUDED_DIRS = frozenset(
    {
        "site-packages",
        "dist-packages",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "lib2to3",
        "turtledemo",
        "ensurepip",
        "pydoc_data",
        "encodings",
        "__pycache__",
    }
)

Documents = datasets.Dataset | datasets.IterableDataset


@dataclass(frozen=True)
class CorpusSpec:
    """What a corpus is made of, resolved before anything is read.

    ``fingerprint`` is JSON-able and changes whenever the documents could: the token
    cache key is built from it.
    """

    kind: str
    files: tuple[Path, ...]  # local files read; empty for a dataset on the hub
    fingerprint: dict[str, Any]


@dataclass(frozen=True)
class Corpus:
    documents: Documents  # one column, "text"; local files give an IterableDataset
    replaced_characters: int  # U+FFFD substituted for undecodable bytes (encoding_errors=replace)
    files_with_replacements: int


def hf_datasets_cache(cfg: DataConfig) -> Path:
    """Where ``datasets`` keeps hub downloads, its Arrow copies and its lock files for this pipeline.

    Next to our token caches rather than in ~/.cache, so everything the pipeline
    writes lives under ``data.cache_dir`` (and tests stay inside their tmp dirs).
    """
    return Path(cfg.cache_dir) / "hf-datasets"


def resolve_corpus(cfg: DataConfig) -> CorpusSpec:
    """Find the corpus's files and describe it, without reading any document."""
    if cfg.corpus == "hub":
        return _hub_spec(cfg)
    if cfg.corpus == "stdlib":
        files, extra = stdlib_files(), {"python": sys.version, "excluded_dirs": sorted(STDLIB_EXCLUDED_DIRS)}
    else:
        files, extra = expand_data_paths(cfg.paths), {}
    if cfg.max_documents is not None:
        files = files[: cfg.max_documents]  # one file is one document
    fingerprint = {"kind": cfg.corpus, **extra, "files": file_stats(files)}
    return CorpusSpec(kind=cfg.corpus, files=tuple(files), fingerprint=fingerprint)


def load_corpus(cfg: DataConfig, spec: CorpusSpec | None = None) -> Corpus:
    """Read the documents that ``spec`` (default: ``resolve_corpus(cfg)``) describes."""
    spec = spec or resolve_corpus(cfg)
    if spec.kind == "hub":
        return Corpus(documents=load_hub_documents(cfg), replaced_characters=0, files_with_replacements=0)
    replaced_chars, replaced_files = check_decodable(spec.files, cfg.encoding_errors)
    if replaced_chars:
        log.warning(
            "replaced %d undecodable byte sequence(s) with U+FFFD in %d file(s) (data.encoding_errors=replace)",
            replaced_chars,
            replaced_files,
        )
    return Corpus(
        documents=load_text_documents(spec.files, cfg.encoding_errors, hf_datasets_cache(cfg)),
        replaced_characters=replaced_chars,
        files_with_replacements=replaced_files,
    )


def stdlib_files() -> list[Path]:
    """The running Python's standard-library ``*.py`` files, minus STDLIB_EXCLUDED_DIRS, sorted."""
    files = []
    for root, dirs, names in os.walk(sysconfig.get_paths()["stdlib"]):
        dirs[:] = [d for d in dirs if d not in STDLIB_EXCLUDED_DIRS]  # prune: site-packages alone can be 100+ MB
        files.extend(Path(root) / name for name in names if name.endswith(".py"))
    return sorted(path for path in files if path.is_file())


def expand_data_paths(patterns: list[str]) -> list[Path]:
    """Files named by ``data.paths``: files, directories (recursive) and globs, in the given order."""
    files: dict[Path, None] = {}  # a dict keeps first-seen order and drops repeats
    for pattern in patterns:
        for path in _expand_one(pattern):
            files.setdefault(path.resolve(), None)
    return list(files)


def _expand_one(pattern: str) -> list[Path]:
    path = Path(pattern).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        found = _files_below(path)
        if not found:
            raise DataError(
                f"data.paths entry {pattern!r} is a directory with no (non-hidden) files; add files or fix the path"
            )
        return found
    if any(char in pattern for char in "*?["):
        found = []
        for match in sorted(glob.glob(str(path), recursive=True)):
            found.extend([Path(match)] if os.path.isfile(match) else _files_below(Path(match)))
        if not found:
            raise DataError(f"data.paths entry {pattern!r} matches no files (relative to {os.getcwd()}); fix the pattern")
        return found
    raise DataError(f"data.paths entry {pattern!r} does not exist (relative to {os.getcwd()}); fix the path")


def _files_below(directory: Path) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))  # prune hidden dirs, walk in order
        found.extend(Path(root) / name for name in sorted(names) if not name.startswith("."))
    return [path for path in found if path.is_file()]


def file_stats(files: list[Path] | tuple[Path, ...]) -> list[list[Any]]:
    """[path, size, mtime_ns] per file: enough to notice any edit without reading the files."""
    stats = []
    for path in files:
        stat = path.stat()
        stats.append([str(path), stat.st_size, stat.st_mtime_ns])
    return stats


def check_decodable(files: tuple[Path, ...] | list[Path], encoding_errors: str) -> tuple[int, int]:
    """Check every file is UTF-8 before ``datasets`` reads it; return (replaced characters, files).

    ``strict``: the first bad byte is an error naming the file and the offset (the
    builder's own error would not name the file). ``replace``: count what will be replaced.
    Also fails when no file has any non-whitespace content.
    """
    replaced_chars = replaced_files = 0
    any_text = False
    for path in files:
        data = path.read_bytes()
        any_text = any_text or bool(data.strip())
        count = count_undecodable(data)
        if count and encoding_errors == "strict":
            _raise_undecodable(path, data)
        replaced_chars += count
        replaced_files += bool(count)
    if not any_text:
        raise DataError(
            f"the corpus has no text: all {len(files)} file(s) are empty or whitespace; point data.paths at files with text"
        )
    return replaced_chars, replaced_files


def count_undecodable(data: bytes) -> int:
    """How many U+FFFD characters ``data.decode('utf-8', errors='replace')`` would produce for bad bytes.

    Counted directly (not by counting U+FFFD in the output) so files that legitimately
    contain U+FFFD are not miscounted.
    """
    view, position, count = memoryview(data), 0, 0
    while True:
        try:
            str(view[position:], "utf-8")
            return count
        except UnicodeDecodeError as exc:
            count += 1  # the replace handler emits one U+FFFD per error and resumes at exc.end
            position += exc.end


def _raise_undecodable(path: Path, data: bytes) -> None:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not valid UTF-8: byte 0x{data[exc.start]:02x} at offset {exc.start} ({exc.reason}); "
            "fix or remove the file, or set data.encoding_errors=replace to substitute U+FFFD"
        ) from None


def load_text_documents(
    files: tuple[Path, ...] | list[Path], encoding_errors: str, cache_dir: Path
) -> datasets.IterableDataset:
    """One document per file through datasets' ``text`` builder, streamed.

    Streamed because we read the files once, to tokenise them: a prepared dataset
    would store a second (Arrow) copy, and datasets keys that copy on file mtimes
    alone, so a quick edit could be served stale.
    """
    # datasets would tell the hub it "downloaded" the text builder (a network request, up to 3 s
    # offline); local files are not a download, so that count is switched off.
    datasets.config.HF_UPDATE_DOWNLOAD_COUNTS = False
    return datasets.load_dataset(
        "text",
        data_files=[glob.escape(str(path)) for path in files],  # data_files are patterns: escape [ ] * ?
        sample_by="document",
        encoding_errors=encoding_errors,
        split="train",
        streaming=True,
        cache_dir=str(cache_dir),  # streaming still takes a lock file here; keep it out of ~/.cache
    )


def _hub_spec(cfg: DataConfig) -> CorpusSpec:
    fingerprint: dict[str, Any] = {
        "kind": "hub",
        "path": cfg.hub_path,
        "config": cfg.hub_config,
        "split": cfg.hub_split,
        "revision": cfg.hub_revision,
        "text_field": cfg.text_field,
    }
    local = Path(cfg.hub_path).expanduser()
    files: list[Path] = []
    if local.exists():  # a local dataset folder or file: its edits must change the key too
        files = [local.resolve()] if local.is_file() else [p.resolve() for p in _files_below(local)]
        fingerprint["files"] = file_stats(files)
    elif cfg.hub_revision is None:
        log.info("data.hub_revision is not pinned: a cached copy is reused even if %s changes on the hub", cfg.hub_path)
    return CorpusSpec(kind="hub", files=tuple(files), fingerprint=fingerprint)


def load_hub_documents(cfg: DataConfig) -> Documents:
    """``datasets.load_dataset`` for data.hub_path (a hub name or a local dataset folder), text column only."""
    try:
        dataset = datasets.load_dataset(
            cfg.hub_path,
            cfg.hub_config,
            split=cfg.hub_split,
            revision=cfg.hub_revision,
            streaming=cfg.streaming,
            cache_dir=str(hf_datasets_cache(cfg)),
        )
    except Exception as exc:  # not found, bad config/split, no network: all reported as one line
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0].rstrip(".")
        raise DataError(
            f"could not load data.hub_path={cfg.hub_path!r} (config={cfg.hub_config!r}, split={cfg.hub_split!r}): "
            f"{first_line[:300]}; check those settings and the network"
        ) from exc
    dataset = select_text_column(dataset, cfg.text_field, cfg.hub_path)
    if cfg.max_documents is not None:
        dataset = dataset.take(cfg.max_documents)
    return dataset


def select_text_column(dataset: Documents, text_field: str, source: str) -> Documents:
    """Keep only ``text_field``, renamed to ``text``; a missing or non-text column is an error."""
    columns = dataset.column_names
    if columns is None:  # a streamed dataset may not know its columns until the first row
        columns = list(next(iter(dataset), {}))
    if text_field not in columns:
        raise DataError(
            f"data.text_field={text_field!r} is not a column of {source} (columns: {', '.join(columns) or 'none'}); "
            "set data.text_field to the text column"
        )
    feature = (dataset.features or {}).get(text_field)
    if feature is not None and getattr(feature, "dtype", None) not in ("string", "large_string"):
        raise DataError(f"column {text_field!r} of {source} holds {feature}, not text; set data.text_field to a text column")
    dataset = dataset.select_columns([text_field])
    return dataset if text_field == "text" else dataset.rename_column(text_field, "text")
