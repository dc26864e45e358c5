"""Time full training steps of a composed config, with and without huge-page CPU allocations.

Each setting runs in its own process (torch reads THP_MEM_ALLOC_ENABLE once per process), the
two alternate, and the script prints the median step time of each and their ratio, measured in
one run. Any train.py override selects the model:

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

WORKER_FLAG = "--worker"


def time_steps(overrides: list[str], steps: int) -> list[float]:
    """Seconds per optimizer step (forward, backward, AdamW) on random tokens, after one warm-up step."""
    import torch

    from moe_gpt.compose import compose_run_config
    from moe_gpt.model import GPT

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
    return seconds[1:]


def run_worker(overrides: list[str], steps: int, thp: str) -> list[float]:
    env = {**os.environ, "THP_MEM_ALLOC_ENABLE": thp}
    command = [sys.executable, __file__, WORKER_FLAG, "--steps", str(steps), *overrides]
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"benchmark worker failed: {result.stderr.strip().splitlines()[-1]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="processes per setting, alternating")
    parser.add_argument(WORKER_FLAG, action="store_true", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args()
    if args.worker:
        print(json.dumps(time_steps(overrides, args.steps)))
        return
    times: dict[str, list[float]] = {"1": [], "0": []}
    for _ in range(args.rounds):
        for thp in times:
            times[thp] += run_worker(overrides, args.steps, thp)
    on, off = statistics.median(times["1"]), statistics.median(times["0"])
    print(f"overrides: {' '.join(overrides) or '(default run)'}; {args.rounds} x {args.steps} steps per setting")
    print("| huge pages | median s/step |\n|---|---|")
    print(f"| on (default) | {on:.3f} |\n| off | {off:.3f} |")
    print(f"off / on: {off / on:.2f}x")


if __name__ == "__main__":
    main()
