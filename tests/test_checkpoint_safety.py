"""Checkpoints are read as data, never as code, and a damaged file is one line that names it.

The payload test is live: the same file loaded the unsafe way really runs it (it creates a file),
so "the marker file does not exist" proves each entry point refused it.
"""

import shutil
import struct
import zipfile
import zlib
from pathlib import Path

import pytest
import safetensors.torch
import torch

from moe_gpt.weights.safe_load import load_model
from moe_gpt.config import ConfigError, GPTConfig
from moe_gpt.model.gpt import GPT
from tests.helpers import TINY, error_lines, script_main, train_main


class Payload:
    """Unpickling this creates ``marker``: code a checkpoint could run on whoever loads it."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture
def payload_checkpoint(tiny_checkpoint, tmp_path) -> tuple[Path, Path]:
    """A real training checkpoint with a payload added; returns (checkpoint, marker the payload creates)."""
    marker = tmp_path / "payload-ran"
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["callbacks"]["innocent-looking"] = Payload(marker)
    path = tmp_path / "last.ckpt"
    torch.save(checkpoint, path)
    torch.load(path, weights_only=False)  # the unsafe way: the payload runs
    assert marker.exists()
    marker.unlink()
    return path, marker


def test_load_model_refuses_a_checkpoint_that_would_run_code(payload_checkpoint):
    path, marker = payload_checkpoint
    with pytest.raises(ConfigError, match="would run as code when loaded; refused") as error:
        load_model(path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)
    assert not marker.exists()


def test_generate_analyze_and_export_refuse_it_with_one_line(payload_checkpoint, tmp_path):
    path, marker = payload_checkpoint
    commands = [
        ["generate", "--checkpoint", str(path), "--max-new-tokens", "2"],
        ["analyze", "routing", "--checkpoint", str(path), "--text", "x"],
        ["export_hf", "--checkpoint", str(path), "--out", str(tmp_path / "export")],
    ]
    for script, *args in commands:
        result = script_main(script, args)
        assert result.returncode == 2, (script, result.stderr[-2000:])
        refused = (
            "holds Python objects that would run as code when loaded; refused. "
            "Load only checkpoints written by moe-gpt (they hold tensors and plain values)"
        )
        assert result.stderr.strip().splitlines() == [f"error: checkpoint {path} {refused}"]
        assert not marker.exists(), script


@pytest.mark.parametrize("key", ["resume", "init_from"])
def test_training_refuses_it_before_building_any_data(payload_checkpoint, corpus_overrides, tmp_path, key):
    path, marker = payload_checkpoint
    cache = tmp_path / "fresh-token-cache"
    args = TINY + corpus_overrides + [f"data.cache_dir={cache}", f"{key}={path}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = train_main(args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and "would run as code when loaded; refused" in errors[0], result.stderr[-2000:]
    assert not marker.exists() and not cache.exists()


def damaged_files(tiny_checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, what the one-line error says about it)."""
    empty, truncated, foreign, text = (
        folder / name for name in ("empty.ckpt", "truncated.ckpt", "foreign.pt", "notes.ckpt")
    )
    empty.write_bytes(b"")
    data = tiny_checkpoint.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])  # a copy cut off mid-write
    torch.save({"weights": torch.zeros(3)}, foreign)
    text.write_text("not a checkpoint\n")
    return {
        "empty": (empty, "is empty (0 bytes); use another checkpoint of that run, e.g. best.ckpt"),
        "truncated": (truncated, "is damaged or truncated"),
        "foreign": (foreign, "is not a moe-gpt training checkpoint"),
        "text": (text, "is damaged or truncated"),
    }


def test_damaged_or_foreign_files_are_one_line_errors_naming_the_file(tiny_checkpoint, tmp_path):
    for name, (path, message) in damaged_files(tiny_checkpoint, tmp_path).items():
        with pytest.raises(ConfigError) as error:
            load_model(path)
        assert message in str(error.value) and str(path) in str(error.value) and "\n" not in str(error.value), name


def test_resuming_from_a_truncated_checkpoint_fails_before_any_data_is_built(
    tiny_checkpoint, corpus_overrides, tmp_path
):
    path, message = damaged_files(tiny_checkpoint, tmp_path)["truncated"]
    cache = tmp_path / "fresh-token-cache"
    args = TINY + corpus_overrides + [f"data.cache_dir={cache}", f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = train_main(args)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in result.stderr
    assert not cache.exists()


def train_from_hf_folder(folder: Path, corpus_overrides: list[str], tmp_path: Path):
    """``train.py init_from=<folder>`` with TINY, whose model has the sizes of conftest's ``hf_gpt2_dir``."""
    cache = tmp_path / "fresh-token-cache"
    args = TINY + corpus_overrides + [f"data.cache_dir={cache}", f"init_from={folder}", f"hydra.run.dir={tmp_path / 'run'}"]
    result = train_main(args)
    assert not cache.exists()
    return result


def hf_weights(hf_gpt2_dir: Path, tmp_path: Path, name: str, extra: dict | None = None) -> Path:
    """The weights file ``name`` (model.safetensors or pytorch_model.bin, with ``extra`` entries) of a copy of
    conftest's ``hf_gpt2_dir``, the only weights in that copy."""
    folder = Path(shutil.copytree(hf_gpt2_dir, tmp_path / "hf"))
    if name == "pytorch_model.bin":
        state = safetensors.torch.load_file(folder / "model.safetensors")
        (folder / "model.safetensors").unlink()  # transformers then reads pytorch_model.bin
        torch.save({**state, **(extra or {})}, folder / name)
    return folder / name


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_init_from_a_hf_folder_with_truncated_weights_is_one_line_naming_the_file(
    hf_gpt2_dir, corpus_overrides, tmp_path, name
):
    weights = hf_weights(hf_gpt2_dir, tmp_path, name)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # a download or copy cut off
    result = train_from_hf_folder(weights.parent, corpus_overrides, tmp_path)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"{weights} is damaged or truncated" in errors[0], result.stderr[-2000:]
    assert "Traceback" not in result.stderr


def test_init_from_a_hf_folder_whose_pytorch_model_bin_would_run_code_is_refused_with_one_line(
    hf_gpt2_dir, corpus_overrides, tmp_path
):
    marker = tmp_path / "payload-ran"
    weights = hf_weights(hf_gpt2_dir, tmp_path, "pytorch_model.bin", extra={"innocent-looking": Payload(marker)})
    torch.load(weights, weights_only=False)  # the unsafe way: the payload runs
    assert marker.exists()
    marker.unlink()

    result = train_from_hf_folder(weights.parent, corpus_overrides, tmp_path)
    assert result.returncode == 2
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and f"{weights} holds Python objects that would run as code when loaded; refused" in errors[0]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    failure = tmp_path / "run" / "failure.json"
    assert not failure.exists() or "weights_only" not in failure.read_text()
    assert not marker.exists()


def with_flipped_bytes(checkpoint: Path, folder: Path) -> Path:
    """A copy of ``checkpoint`` with 16 bytes inverted in the middle of its largest tensor: the same size and
    still a readable zip file, only the weights changed (what a bad disk or a bad copy does)."""
    data = bytearray(checkpoint.read_bytes())
    with zipfile.ZipFile(checkpoint) as archive:
        record = max(archive.infolist(), key=lambda info: info.file_size)
    name_length, extra_length = struct.unpack("<HH", data[record.header_offset + 26 : record.header_offset + 30])
    middle = record.header_offset + 30 + name_length + extra_length + record.file_size // 2
    data[middle : middle + 16] = bytes(byte ^ 0xFF for byte in data[middle : middle + 16])
    copy = folder / "flipped.ckpt"
    copy.write_bytes(data)
    return copy


def test_torch_stores_a_real_crc_for_every_record_of_a_checkpoint(tiny_moe_checkpoint):
    with zipfile.ZipFile(tiny_moe_checkpoint) as archive:
        records = [info for info in archive.infolist() if info.file_size > 0]
        assert records and all(info.CRC == zlib.crc32(archive.read(info.filename)) != 0 for info in records)


def test_a_checkpoint_with_flipped_bytes_is_refused_by_every_reader_with_one_line(
    tiny_moe_checkpoint, corpus_overrides, tmp_path
):
    path = with_flipped_bytes(tiny_moe_checkpoint, tmp_path)
    assert torch.load(path, weights_only=True)["global_step"] == 2  # torch alone loads it as if nothing happened
    results = {
        "resume": train_main(TINY + corpus_overrides + [f"resume={path}", f"hydra.run.dir={tmp_path / 'run'}"]),
        "generate": script_main("generate", ["--checkpoint", str(path), "--max-new-tokens", "2"]),
        "analyze": script_main("analyze", ["routing", "--checkpoint", str(path), "--text", "x"]),
    }
    for reader, result in results.items():
        assert result.returncode == 2, (reader, result.stderr[-2000:])
        errors = error_lines(result.stderr)
        assert len(errors) == 1 and "Traceback" not in result.stderr, (reader, result.stderr[-2000:])
        assert f"checkpoint {path} is damaged: its record" in errors[0], reader
        assert errors[0].endswith("use another checkpoint of that run, e.g. best.ckpt"), reader


def test_a_compiled_model_keeps_the_plain_models_keys():
    model = GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=16, use_moe=False))
    keys = list(model.state_dict())
    model.compile()  # what compile=true does: in place, no wrapper module
    assert list(model.state_dict()) == keys


def test_checkpoints_of_compiled_models_from_before_load_everywhere(tiny_checkpoint, tmp_path):
    # torch.compile's wrapper put "_orig_mod." in every key: such checkpoints still load.
    checkpoint = torch.load(tiny_checkpoint, weights_only=True)
    checkpoint["state_dict"] = {
        key.replace("model.", "model._orig_mod.", 1): value for key, value in checkpoint["state_dict"].items()
    }
    path = tmp_path / "compiled.ckpt"
    torch.save(checkpoint, path)
    idx = torch.arange(8)[None]
    torch.testing.assert_close(load_model(path)(idx).logits, load_model(tiny_checkpoint)(idx).logits, rtol=0, atol=0)
