"""What a run's checkpoints cost on disk: the summary says it, and ``checkpoint.save_weights_only`` keeps the
weights without AdamW's state."""

import re

import torch

from moe_gpt.weights.safe_load import load_model
from tests.helpers import TINY, train_main


def _summary_megabytes(summary: str, label: str) -> float:
    return float(re.search(label + r"[^\n]*?([\d,]+\.\d) MB", summary).group(1).replace(",", ""))


def test_the_summary_gives_the_size_of_the_checkpoints_and_of_the_run_folder(finished_moe_run, tmp_path):
    summary = (finished_moe_run / "summary.txt").read_text()
    checkpoints = finished_moe_run / "checkpoints"
    written = sum(path.stat().st_size for path in checkpoints.iterdir())
    assert _summary_megabytes(summary, "checkpoints:") == round(written / 1e6, 1)
    assert "checkpoint.save_weights_only=true" in summary  # how to keep less
    folder = sum(path.stat().st_size for path in finished_moe_run.rglob("*") if path.is_file())
    assert abs(_summary_megabytes(summary, "disk:") - folder / 1e6) < 0.05  # summary.txt came after


def test_save_weights_only_writes_a_third_of_the_bytes_and_says_how_to_start_from_them(
    finished_moe_run, tmp_path, corpus_overrides
):
    run_dir = tmp_path / "run"
    # The same run as finished_moe_run's (TINY, 3 steps), keeping the weights only.
    args = TINY + corpus_overrides + ["logger=none", "trainer.max_steps=3", "checkpoint.save_weights_only=true"]
    result = train_main(args + [f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("last.ckpt", "best.ckpt"):
        full, small = finished_moe_run / "checkpoints" / name, run_dir / "checkpoints" / name
        assert small.stat().st_size < 0.4 * full.stat().st_size
        assert "optimizer_states" not in torch.load(small, weights_only=True, map_location="cpu")
    assert load_model(run_dir / "checkpoints" / "best.ckpt").num_parameters() > 0  # generate, analyze, export
    summary = (run_dir / "summary.txt").read_text()
    assert "weights only" in summary and "continue:" not in summary
    assert f"start from it: python train.py init_from={run_dir / 'checkpoints' / 'best.ckpt'}" in summary

    refused = train_main([f"hydra.run.dir={run_dir}", "resume=last", "trainer.max_steps=6"])
    assert refused.returncode == 2 and "holds weights but no training state to continue" in refused.stderr
