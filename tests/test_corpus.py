"""Corpora: stdlib file selection, local text files (paths, globs, encodings), hub loading on local folders."""

import json
import logging
import sysconfig
from pathlib import Path
from types import SimpleNamespace

import datasets
import pytest

from moe_gpt.config import DataConfig
from moe_gpt.data import DataError, load_corpus, resolve_corpus
from moe_gpt.data.corpus import STDLIB_EXCLUDED_DIRS


def texts(cfg: DataConfig) -> list[str]:
    return [row["text"] for row in load_corpus(cfg).documents]


def hub_config(tmp_path: Path, folder: Path, **overrides) -> DataConfig:
    settings = dict(corpus="hub", name="hub", hub_path=str(folder), cache_dir=str(tmp_path / "cache"))
    return DataConfig(**{**settings, **overrides})


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def test_stdlib_corpus_is_sorted_library_modules_without_tests():
    spec = resolve_corpus(DataConfig())
    root = Path(sysconfig.get_paths()["stdlib"])
    relative = [path.relative_to(root) for path in spec.files]
    assert len(spec.files) > 100 and list(spec.files) == sorted(spec.files)
    assert root / "json" / "decoder.py" in spec.files
    assert all(path.suffix == ".py" and not STDLIB_EXCLUDED_DIRS.intersection(path.parts) for path in relative)


def test_text_corpus_has_one_document_per_file_in_path_order(text_corpus):
    cfg = text_corpus({"b.txt": "second\r\nfile\n", "a.md": "first file"})
    assert texts(cfg) == ["first file", "second\nfile\n"]  # sorted within the directory; universal newlines


def test_directory_skips_hidden_files(text_corpus):
    cfg = text_corpus({"note.txt": "kept", ".hidden.txt": "skipped", ".git/config": "skipped"})
    assert texts(cfg) == ["kept"]


def test_glob_expands_recursively_and_keeps_order(text_corpus, tmp_path):
    cfg = text_corpus(
        {"x/one.txt": "one", "x/deep/two.txt": "two", "x/skip.md": "md"},
        paths=[str(tmp_path / "corpus" / "**" / "*.txt"), str(tmp_path / "corpus" / "x" / "one.txt")],
    )
    assert texts(cfg) == ["two", "one"]  # glob matches sorted; the repeated file counts once


def test_missing_path_names_it(text_corpus, tmp_path):
    missing = str(tmp_path / "nope.txt")
    with pytest.raises(DataError, match="does not exist") as error:
        resolve_corpus(text_corpus({"a.txt": "a"}, paths=[missing]))
    assert missing in str(error.value) and "\n" not in str(error.value)


def test_glob_matching_nothing_names_it(text_corpus, tmp_path):
    pattern = str(tmp_path / "corpus" / "*.rst")
    with pytest.raises(DataError, match="matches no files") as error:
        resolve_corpus(text_corpus({"a.txt": "a"}, paths=[pattern]))
    assert pattern in str(error.value)


def test_empty_corpus_is_an_error(text_corpus):
    with pytest.raises(DataError, match="no text") as error:
        load_corpus(text_corpus({"a.txt": "", "b.txt": " \n\t\n"}))
    assert "\n" not in str(error.value)


def test_undecodable_bytes_strict_names_file(text_corpus, tmp_path):
    cfg = text_corpus({"good.txt": "fine", "bad.txt": b"caf\xe9 au lait"})
    with pytest.raises(DataError) as error:
        load_corpus(cfg)
    message = str(error.value)
    assert str(tmp_path / "corpus" / "bad.txt") in message and "offset 3" in message
    assert "data.encoding_errors=replace" in message and "\n" not in message


def test_undecodable_bytes_replace_counts(text_corpus, caplog):
    cfg = text_corpus(
        {"bad.txt": b"caf\xe9 \xff\xfe ok", "legit.txt": "\ufffd is a real character here"}, encoding_errors="replace"
    )
    with caplog.at_level(logging.WARNING, logger="moe_gpt.data.corpus"):
        corpus = load_corpus(cfg)
    assert (corpus.replaced_characters, corpus.files_with_replacements) == (3, 1)
    assert "caf\ufffd \ufffd\ufffd ok" in [row["text"] for row in corpus.documents]
    assert "replaced 3 undecodable" in caplog.text


def test_max_documents_limits_local_files(text_corpus):
    cfg = text_corpus({"a.txt": "a", "b.txt": "b", "c.txt": "c"}, max_documents=2)
    assert texts(cfg) == ["a", "b"]


def test_hub_loader_reads_local_dataset_folder(tmp_path):
    folder = tmp_path / "stories"
    write_jsonl(folder / "train.jsonl", [{"id": i, "story": f"story {i}"} for i in range(5)])
    corpus = load_corpus(hub_config(tmp_path, folder, text_field="story", max_documents=3))
    assert isinstance(corpus.documents, datasets.Dataset)
    assert corpus.documents.column_names == ["text"]
    assert corpus.documents["text"] == ["story 0", "story 1", "story 2"]


def test_hub_streaming_honours_max_documents(tmp_path):
    folder = tmp_path / "parquet"
    folder.mkdir()
    datasets.Dataset.from_dict({"text": [f"doc {i}" for i in range(10)]}).to_parquet(str(folder / "train.parquet"))
    corpus = load_corpus(hub_config(tmp_path, folder, streaming=True, max_documents=4))
    assert isinstance(corpus.documents, datasets.IterableDataset)
    assert [row["text"] for row in corpus.documents] == ["doc 0", "doc 1", "doc 2", "doc 3"]


def test_hub_missing_column_lists_columns(tmp_path):
    folder = tmp_path / "rows"
    write_jsonl(folder / "train.jsonl", [{"title": "t", "body": "b"}])
    for streaming in (False, True):
        cfg = hub_config(tmp_path, folder, streaming=streaming, max_documents=1)
        with pytest.raises(DataError, match=r"data.text_field='text' is not a column .*\(columns: title, body\)"):
            load_corpus(cfg)


def test_hub_non_text_column_is_an_error(tmp_path):
    folder = tmp_path / "numbers"
    write_jsonl(folder / "train.jsonl", [{"text": 1}, {"text": 2}])
    with pytest.raises(DataError, match="not text"):
        load_corpus(hub_config(tmp_path, folder))


def test_hub_unknown_split_is_a_one_line_error(tmp_path):
    folder = tmp_path / "rows"
    write_jsonl(folder / "train.jsonl", [{"text": "t"}])
    with pytest.raises(DataError, match="hub_split|split='validation'") as error:
        load_corpus(hub_config(tmp_path, folder, hub_split="validation"))
    assert "\n" not in str(error.value)


def test_reading_local_files_asks_the_network_nothing(text_corpus, monkeypatch):
    requests = []
    # As on a machine that is online (the test session itself is forced offline).
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_UPDATE_DOWNLOAD_COUNTS", True)
    monkeypatch.setattr(datasets.load, "get_session", lambda: SimpleNamespace(head=lambda *a, **k: requests.append(a)))
    assert texts(text_corpus({"a.txt": "hello"})) == ["hello"]
    assert requests == []
