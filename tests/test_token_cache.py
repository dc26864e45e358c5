"""The token cache: contents, the document split, reuse, rebuilds on changed inputs, and safe failure."""

import hashlib
import json
import os

import numpy as np
import pytest

from moe_gpt.data import DataError, build_or_load_token_cache
from moe_gpt.data.split import split_score

EOT = 50256


def documents(count: int) -> dict[str, str]:
    sentence = "The quick brown fox jumps over the lazy dog. "
    return {f"doc{i:02d}.txt": f"Document {i}. " + sentence * (i + 1) for i in range(count)}


def read_tokens(path) -> list[int]:
    return np.fromfile(path, dtype=np.uint16).tolist()


def split_into_documents(tokens: list[int]) -> list[list[int]]:
    docs, current = [], []
    for token in tokens:
        current.append(token)
        if token == EOT:
            docs.append(current)
            current = []
    assert not current, "every document ends with <|endoftext|>"
    return docs


def cache_dirs(cfg) -> list[str]:
    return sorted(os.listdir(cfg.cache_dir))


def test_token_files_hold_each_document_followed_by_eot(text_corpus, gpt2):
    files = documents(8)
    cache = build_or_load_token_cache(text_corpus(files), gpt2)
    train = split_into_documents(read_tokens(cache.train_path))
    val = split_into_documents(read_tokens(cache.val_path))
    expected = [gpt2.encode_ordinary(text) + [EOT] for text in files.values()]
    assert sorted(train + val) == sorted(expected)
    assert (cache.train_documents, cache.val_documents) == (len(train), len(val))
    assert (cache.train_tokens, cache.val_tokens) == (sum(map(len, train)), sum(map(len, val)))


def test_split_is_deterministic(text_corpus, gpt2, tmp_path):
    files = documents(12)
    first = build_or_load_token_cache(text_corpus(files), gpt2)
    again = build_or_load_token_cache(text_corpus(files, cache_dir=str(tmp_path / "other")), gpt2)
    assert read_tokens(first.train_path) == read_tokens(again.train_path)
    assert read_tokens(first.val_path) == read_tokens(again.val_path)
    # The rule itself: a document is validation exactly when its text hashes below val_fraction.
    val_texts = [gpt2.decode(doc[:-1]) for doc in split_into_documents(read_tokens(first.val_path))]
    assert sorted(val_texts) == sorted(text for text in files.values() if split_score(text) < 0.3)


def test_validation_gets_a_document_even_when_the_hash_picks_none(text_corpus, gpt2):
    cache = build_or_load_token_cache(text_corpus(documents(3), val_fraction=1e-9), gpt2)
    assert (cache.train_documents, cache.val_documents) == (2, 1)


def test_train_gets_a_document_even_when_the_hash_picks_none(text_corpus, gpt2):
    cache = build_or_load_token_cache(text_corpus(documents(3), val_fraction=0.999999999), gpt2)
    assert (cache.train_documents, cache.val_documents) == (1, 2)


def test_single_document_is_split_by_its_last_tokens(text_corpus, gpt2):
    files = {"book.txt": "It was the best of times, it was the worst of times. " * 40}
    cache = build_or_load_token_cache(text_corpus(files, val_fraction=0.1), gpt2)
    whole = gpt2.encode_ordinary(files["book.txt"]) + [EOT]
    assert read_tokens(cache.train_path) + read_tokens(cache.val_path) == whole
    assert cache.val_tokens == round(0.1 * len(whole))


def test_empty_documents_are_skipped(text_corpus, gpt2):
    cache = build_or_load_token_cache(text_corpus({**documents(2), "blank.txt": "\n\n"}, val_fraction=0.5), gpt2)
    assert cache.train_documents + cache.val_documents == 2
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert meta["skipped_empty_documents"] == 1


def test_cache_is_reused_when_inputs_unchanged(text_corpus, gpt2, caplog):
    cfg = text_corpus(documents(4))
    built = build_or_load_token_cache(cfg, gpt2)
    with caplog.at_level("DEBUG", logger="moe_gpt.data.tokens"):
        reused = build_or_load_token_cache(cfg, gpt2)
    assert (built.reused, reused.reused) == (False, True)
    assert reused.directory == built.directory and reused.train_tokens == built.train_tokens
    # This process already reported the cache when it built it: the reuse is a DEBUG line, not a repeat.
    levels = {record.levelname for record in caplog.records if " reused in " in record.getMessage()}  # not the tmp path
    assert levels == {"DEBUG"}
    assert [name for name in cache_dirs(cfg) if name.startswith("tiny-")] == [built.directory.name]


def test_cache_rebuilds_when_a_file_changes(text_corpus, gpt2, tmp_path):
    cfg = text_corpus(documents(4))
    old = build_or_load_token_cache(cfg, gpt2)
    old_train = read_tokens(old.train_path)
    (tmp_path / "corpus" / "doc00.txt").write_text("A completely different first document.")
    new = build_or_load_token_cache(cfg, gpt2)
    assert not new.reused and new.directory != old.directory
    assert read_tokens(old.train_path) == old_train  # the old cache is left as it was
    assert new.train_tokens + new.val_tokens != old.train_tokens + old.val_tokens


def test_cache_rebuilds_when_val_fraction_changes(text_corpus, gpt2):
    first = build_or_load_token_cache(text_corpus(documents(4), val_fraction=0.3), gpt2)
    second = build_or_load_token_cache(text_corpus(documents(4), val_fraction=0.5), gpt2)
    assert first.directory != second.directory and not second.reused


def test_meta_records_counts_and_key_inputs(text_corpus, gpt2, tmp_path):
    files = {**documents(3), "odd.txt": b"bad \xff byte"}
    cache = build_or_load_token_cache(text_corpus(files, encoding_errors="replace"), gpt2)
    meta = json.loads((cache.directory / "meta.json").read_text())
    assert (meta["train"]["tokens"], meta["train"]["documents"]) == (cache.train_tokens, cache.train_documents)
    assert meta["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot_token": EOT}
    assert meta["replaced_characters"] == 1 and meta["key"] in cache.directory.name
    assert meta["key_inputs"]["encoding_errors"] == "replace"
    assert [entry[0] for entry in meta["key_inputs"]["corpus"]["files"]][0] == str(tmp_path / "corpus" / "doc00.txt")


def test_failed_build_leaves_no_cache_directory(tmp_path, gpt2):
    from moe_gpt.config import DataConfig

    folder = tmp_path / "blank"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "  "}\n{"text": ""}\n')
    cfg = DataConfig(corpus="hub", name="blank", hub_path=str(folder), cache_dir=str(tmp_path / "cache"))
    with pytest.raises(DataError, match="no text"):
        build_or_load_token_cache(cfg, gpt2)
    assert [name for name in cache_dirs(cfg) if name != "hf-datasets"] == []  # no cache, no staging dir


def test_damaged_cache_is_reported_not_overwritten(text_corpus, gpt2):
    cfg = text_corpus(documents(4))
    cache = build_or_load_token_cache(cfg, gpt2)
    os.truncate(cache.train_path, 10)
    with pytest.raises(DataError, match="delete that directory") as error:
        build_or_load_token_cache(cfg, gpt2)
    assert str(cache.directory) in str(error.value)
    assert cache.train_path.stat().st_size == 10


@pytest.mark.parametrize(
    ("files", "val_fraction"),
    [
        (documents(4), 0.3),
        (documents(3), 1e-9),  # a document is moved to val after writing: train.bin is rewritten
        ({"book.txt": "It was the best of times. " * 40}, 0.1),  # one document: its tail is cut off train.bin
    ],
)
def test_meta_records_the_sha256_of_each_finished_token_file(text_corpus, gpt2, files, val_fraction):
    cfg = text_corpus(files, val_fraction=val_fraction)
    cache = build_or_load_token_cache(cfg, gpt2)
    meta = json.loads((cache.directory / "meta.json").read_text())
    for split, path in (("train", cache.train_path), ("val", cache.val_path)):
        assert meta[split]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert build_or_load_token_cache(cfg, gpt2).reused


def test_token_file_overwritten_in_place_is_reported_not_trained_on(text_corpus, gpt2):
    cfg = text_corpus(documents(4))
    cache = build_or_load_token_cache(cfg, gpt2)
    zeros = bytes(cache.train_path.stat().st_size)
    with open(cache.train_path, "r+b") as f:  # in place: same size, same inode, so only the content differs
        f.write(zeros)
    before = cache.train_path.stat().st_mtime_ns
    with pytest.raises(DataError, match="delete that directory") as error:
        build_or_load_token_cache(cfg, gpt2)
    assert str(cache.directory) in str(error.value) and "train.bin" in str(error.value)
    assert "\n" not in str(error.value)
    assert cache.train_path.read_bytes() == zeros and cache.train_path.stat().st_mtime_ns == before
    assert [name for name in cache_dirs(cfg) if name.startswith("tiny-")] == [cache.directory.name]  # no rebuild


def test_one_flipped_byte_is_detected_and_the_restored_cache_loads_again(text_corpus, gpt2):
    cfg = text_corpus(documents(6))
    cache = build_or_load_token_cache(cfg, gpt2)
    original = cache.val_path.read_bytes()
    middle = len(original) // 2
    cache.val_path.write_bytes(original[:middle] + bytes([original[middle] ^ 1]) + original[middle + 1 :])
    with pytest.raises(DataError, match="val.bin"):
        build_or_load_token_cache(cfg, gpt2)
    cache.val_path.write_bytes(original)
    assert build_or_load_token_cache(cfg, gpt2).reused


def test_cache_name_must_be_a_plain_directory_name(text_corpus, gpt2):
    with pytest.raises(DataError, match="data.name='../x'"):
        build_or_load_token_cache(text_corpus(documents(2), name="../x"), gpt2)


def test_streamed_hub_dataset_builds_a_cache_of_max_documents(tmp_path, gpt2):
    import datasets

    from moe_gpt.config import DataConfig

    folder = tmp_path / "hub"
    folder.mkdir()
    stories = [f"Story {i}: once upon a time there was a number {i}." for i in range(20)]
    datasets.Dataset.from_dict({"story": stories}).to_parquet(str(folder / "train.parquet"))
    cfg = DataConfig(
        corpus="hub",
        name="stories",
        hub_path=str(folder),
        text_field="story",
        streaming=True,
        max_documents=5,
        cache_dir=str(tmp_path / "cache"),
    )
    cache = build_or_load_token_cache(cfg, gpt2)
    stored = split_into_documents(read_tokens(cache.train_path)) + split_into_documents(read_tokens(cache.val_path))
    assert sorted(gpt2.decode(doc[:-1]) for doc in stored) == sorted(stories[:5])
    assert build_or_load_token_cache(cfg, gpt2).reused
