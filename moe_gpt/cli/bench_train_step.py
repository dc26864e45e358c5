"""Time full training steps of a composed config against the memory settings that speed them up.

Settings: the defaults; freed CPU memory returned to the system as glibc does by default
(MOE_GPT_KEEP_FREED_MEMORY=0, see moe_gpt/training/cpu_memory.py); PyTorch's huge-page allocations instead
(THP_MEM_ALLOC_ENABLE=1, the previous default); the loss from full logits instead of the chunked
output layer + cross-entropy (model.loss_chunk_size=0). Each runs in its own process (allocator
settings are per process), the settings alternate, and the script prints each one's median step
time and its ratio to the defaults, measured in one run.
Any train.py override selects the model:

    python scripts/bench_train_step.py                        # the default MoE run's model and batch
    python scripts/bench_train_step.py model=dense --steps 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from moe_gpt.cli.common import ArgumentParser, entry_point
from moe_gpt.compose import compose_run_config
from moe_gpt.errors import CommandFailed

WORKER_FLAG = "--worker"


def time_steps(overrides: list[str], steps: int) -> dict:
    """Seconds per optimizer step (forward, backward, AdamW) on random tokens after one warm-up
    step, and the process's peak resident memory."""
    import torch

    from moe_gpt.model.gpt import GPT
    from moe_gpt.training.run import peak_memory_mb

    cfg = compose_run_config(overrides)
    torch.manual_seed(cfg.seed)
    model = GPT(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr)
    shape = (cfg.data.batch_size, cfg.model.block_size)
    seconds = []
    for _ in range(steps + 1):
        idx = torch.randint(cfg.model.vocab_size, shape)
        start = time.perf_counter()
        model(idx, targets=torch.roll(idx, -1, dims=1)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
    return {"seconds": seconds[1:], "peak_mb": peak_memory_mb()}


KEEP_FREED = "MOE_GPT_KEEP_FREED_MEMORY"
# name -> (environment, extra overrides)
SETTINGS = {
    "defaults": ({}, []),
    "freed memory returned": ({KEEP_FREED: "0"}, []),
    "huge pages instead": ({KEEP_FREED: "0", "THP_MEM_ALLOC_ENABLE": "1"}, []),
    "full logits": ({}, ["model.loss_chunk_size=0"]),
}


def run_worker(overrides: list[str], steps: int, setting: str) -> dict:
    env_changes, extra_overrides = SETTINGS[setting]
    env = {**os.environ, **env_changes}
    command = [sys.executable, "-m", "moe_gpt.cli.bench_train_step", WORKER_FLAG, "--steps", str(steps), *overrides, *extra_overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise CommandFailed(f"benchmark worker failed: {(result.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# Each worker keeps freed memory as train.py does, unless its setting turned that off.
@entry_point(runs_model=True)
def main(argv: list[str]) -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.worker:
        print(json.dumps(time_steps(overrides, args.steps)))
        return
    compose_run_config(overrides)  # bad overrides: one line here, before any worker starts
    times: dict[str, list[float]] = {setting: [] for setting in SETTINGS}
    peak_mb = {setting: 0.0 for setting in SETTINGS}
    for _ in range(args.rounds):
        for setting in SETTINGS:
            result = run_worker(overrides, args.steps, setting)
            times[setting] += result["seconds"]
            peak_mb[setting] = max(peak_mb[setting], result["peak_mb"])
    medians = {setting: statistics.median(values) for setting, values in times.items()}
    print(f"overrides: {' '.join(overrides) or '(default run)'}; {args.rounds} x {args.steps} steps per setting")
    print("| setting | median s/step | time / defaults | peak RSS MiB | memory / defaults |\n|---|---|---|---|---|")
    for setting, seconds in medians.items():
        print(
            f"| {setting} | {seconds:.3f} | {seconds / medians['defaults']:.2f}x "
            f"| {peak_mb[setting]:.0f} | {peak_mb[setting] / peak_mb['defaults']:.2f}x |"
        )


if __name__ == "__main__":
    raise SystemExit(main())
