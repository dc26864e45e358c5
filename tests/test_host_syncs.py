"""A training step that does not log never waits on the host: no value read back, no collective, in
one process and in two (tests/host_syncs.py counts them)."""

import json
import os
import subprocess
import sys

import pytest

from moe_gpt.compose import compose_run_config
from moe_gpt.training.run import RunRecord, train
from tests.host_syncs import HostSyncCounter
from tests.helpers import REPO, TINY

# Eight steps that log, save and validate only at steps 4 and 8; the experts run the GPU's operator
# (grouped_mm; CPU runs default to the blocked one, which reads the expert offsets by design).
QUIET = [
    "trainer.max_steps=8",
    "trainer.log_every_n_steps=4",
    "logger.expert_stats_every_n_steps=4",
    "logger.heatmap_every_n_steps=8",
    "trainer.val_check_interval=8",
    "checkpoint.every_n_steps=8",
    "model.moe.experts_impl=grouped_mm",
    "logger=csv",
]
LOGGING_STEPS = {4, 8}


def assert_only_logging_steps_read(events: dict[int, list[str]]) -> None:
    quiet = {step: what for step, what in events.items() if step not in LOGGING_STEPS}
    print("host syncs per step:", {step: len(events.get(step, [])) for step in range(1, 9)})
    assert all(events.get(step) for step in LOGGING_STEPS), "the counter saw nothing where the run logs"
    assert not any(quiet.values()), "steps that do not log waited on the host:\n" + "\n".join(
        f"step {step}: {what}" for step, reads in sorted(quiet.items()) for what in reads
    )


@pytest.mark.parametrize("distilled", [False, True], ids=["plain", "with a teacher"])
def test_a_step_that_does_not_log_reads_nothing_on_the_host(tmp_path, corpus_overrides, distilled, request):
    counter = HostSyncCounter()
    teacher = [f"distill.teacher={request.getfixturevalue('tiny_moe_checkpoint')}"] if distilled else []
    cfg = compose_run_config(TINY + corpus_overrides + QUIET + teacher, run_dir=str(tmp_path / "run"))
    train(cfg, RunRecord(callbacks=[counter]))
    assert_only_logging_steps_read({int(step): what for step, what in counter.events.items()})


@pytest.mark.slow
def test_with_two_processes_a_step_that_does_not_log_reads_nothing_and_runs_no_collective(tmp_path, corpus_overrides):
    # A process of its own: Lightning starts the second DDP process by re-running the command line.
    two = ["trainer.devices=2", "trainer.strategy=ddp", "data.batch_size=2"]
    command = [sys.executable, "-m", "tests.host_syncs", str(tmp_path), *TINY, *corpus_overrides, *QUIET, *two]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    for rank in (0, 1):
        events = json.loads((tmp_path / f"host_syncs_rank{rank}.json").read_text())
        assert_only_logging_steps_read({int(step): what for step, what in events.items()})


@pytest.mark.slow
def test_with_expert_parallelism_a_quiet_step_reads_only_the_all_to_all_split_sizes(tmp_path, corpus_overrides):
    # The one exception (docs/gpu.md): all-to-all takes its split sizes on the host, read once per MoE layer.
    two = ["trainer.devices=2", "trainer.strategy=fsdp", "trainer.expert_parallel=2", "data.batch_size=2"]
    command = [sys.executable, "-m", "tests.host_syncs", str(tmp_path), *TINY, *corpus_overrides, *QUIET, *two]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    split_sizes = "Tensor.tolist() @ moe_gpt/model/expert_parallel.py"
    for rank in (0, 1):
        events = json.loads((tmp_path / f"host_syncs_rank{rank}.json").read_text())
        quiet = [events.get(str(step), []) for step in range(1, 9) if step not in LOGGING_STEPS]
        assert all(len(reads) == 2 and all(read.startswith(split_sizes) for read in reads) for reads in quiet), quiet
