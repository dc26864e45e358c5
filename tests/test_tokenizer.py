"""The GPT-2 tokenizer: offline ranks file, pinned hash, clear errors, and the fetch script's guards."""

import functools
import importlib.util

import pytest
import tiktoken
from conftest import REPO_ROOT, TOKENIZER_DIR

from moe_gpt.data import DataError, load_gpt2_tokenizer
from moe_gpt.data import tokenizer as tokenizer_module
from moe_gpt.data.tokenizer import ENDOFTEXT_ID, GPT2_N_VOCAB, OFFLINE_ENV


def load_fetch_script():
    spec = importlib.util.spec_from_file_location("fetch_tokenizer", REPO_ROOT / "scripts" / "fetch_tokenizer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_offline_tokenizer_matches_known_gpt2_ids(gpt2):
    assert gpt2.encode_ordinary("Hello world") == [15496, 995]
    assert gpt2.encode_ordinary(" the") == [262]
    assert gpt2.n_vocab == GPT2_N_VOCAB and gpt2.eot_token == ENDOFTEXT_ID


def test_offline_tokenizer_round_trips_unicode(gpt2):
    text = "def f(x):\n    return x ** 2  # naïve — ok ✓"
    assert gpt2.decode(gpt2.encode_ordinary(text)) == text


def test_tokenizer_is_built_once_per_process(gpt2):
    assert load_gpt2_tokenizer(TOKENIZER_DIR, offline=True) is gpt2


def test_missing_ranks_file_says_to_run_fetch_script(tmp_path):
    with pytest.raises(DataError, match=r"scripts/fetch_tokenizer\.py") as error:
        load_gpt2_tokenizer(tmp_path, offline=True)
    assert str(tmp_path / "gpt2.tiktoken") in str(error.value) and "\n" not in str(error.value)


def test_env_var_skips_tiktoken_download(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    with pytest.raises(DataError, match="offline mode is on"):
        load_gpt2_tokenizer(tmp_path / "empty")


def test_local_ranks_file_is_used_before_tiktoken_download(gpt2, monkeypatch):
    asked = []

    def no_network(name):
        asked.append(name)
        raise AssertionError("tiktoken.get_encoding must not be called while the ranks file exists")

    monkeypatch.setattr(tiktoken, "get_encoding", no_network)
    # A fresh cache, so this call really loads; monkeypatch puts the process-wide one back afterwards.
    monkeypatch.setattr(tokenizer_module, "_load_cached", functools.cache(tokenizer_module._load_cached.__wrapped__))
    encoding = load_gpt2_tokenizer(TOKENIZER_DIR, offline=False)
    assert asked == [] and encoding is not gpt2
    text = "Hello world, naïve café ✓ <|endoftext|>"
    assert encoding.encode_ordinary(text) == gpt2.encode_ordinary(text)
    assert encoding.encode(text, allowed_special="all") == gpt2.encode(text, allowed_special="all")


def test_corrupted_ranks_file_is_refused(tmp_path):
    (tmp_path / "gpt2.tiktoken").write_bytes(b"aGVsbG8= 0\n")
    with pytest.raises(DataError, match="is not GPT-2's BPE ranks") as error:
        load_gpt2_tokenizer(tmp_path, offline=True)
    assert "\n" not in str(error.value)


def test_fetch_script_keeps_a_verified_file(capsys):
    before = (TOKENIZER_DIR / "gpt2.tiktoken").stat().st_mtime_ns
    load_fetch_script().main(["--dir", str(TOKENIZER_DIR)])
    assert "nothing to do" in capsys.readouterr().out
    assert (TOKENIZER_DIR / "gpt2.tiktoken").stat().st_mtime_ns == before


def test_fetch_script_never_overwrites_a_foreign_file(tmp_path, capsys):
    foreign = tmp_path / "gpt2.tiktoken"
    foreign.write_text("not the ranks\n")
    assert load_fetch_script().main(["--dir", str(tmp_path)]) == 2  # bad input, as in every script
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {foreign} exists but is not GPT-2's ranks (sha256 mismatch); move it away and rerun"
    ]
    assert foreign.read_text() == "not the ranks\n"
