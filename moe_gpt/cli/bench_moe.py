"""Time the MoE layer's forward + backward against a dense FFN of equal active FLOPs, in one run.

Each expert is 4 * n_embd / top_k wide, so the top_k experts a token uses cost what GPT-2's dense
FFN (4 * n_embd wide) costs. Candidates alternate within every repeat on the same input (these
machines are noisy, so only ratios measured side by side mean anything); all MoE candidates are
the same layer with a different model.moe.experts_impl:
  auto        as trained (the default): blocked on the CPU, grouped_mm on a CUDA GPU in bfloat16
  grouped_mm  torch.nn.functional.grouped_mm over all rows at once
  loop        one autograd matmul pair per expert (the test reference; reads counts on the host)
  dense       GPT-2's dense FFN, 4 * n_embd wide: the same active FLOPs
The goals (CPU float32, 4,096 tokens, width 256): auto / dense at most 1.10 at
E=8, k=2 and at most 1.25 at E=16, k=2 and E=64, k=8. Exit status 1 when a goal is missed.

    python scripts/bench_moe.py                                   # the goals' setting
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --n-embd 768 --tokens 16384
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.errors import EXIT_FAILED
from moe_gpt.cli.common import ArgumentParser, entry_point

if TYPE_CHECKING:  # torch is imported once the command line is parsed: --help answers at once
    import torch

IMPLS = ("auto", "grouped_mm", "loop")
GOALS = {(8, 2): 1.10, (16, 2): 1.25, (64, 8): 1.25}  # (experts, top_k) -> most grouped / dense


def time_step(forward, x: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
    import torch

    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    forward(x).float().pow(2).mean().backward()
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def compare(candidates: dict, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median seconds per candidate, alternating candidates within each repeat."""
    for forward in candidates.values():  # warm-up: allocator, kernels, lazy init
        time_step(forward, x)
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, forward in candidates.items():
            times[name].append(time_step(forward, x))
    return {name: statistics.median(values) for name, values in times.items()}


def moe_layer(n_embd: int, experts: int, top_k: int, impl: str, device: str, dtype: torch.dtype):
    import torch

    from moe_gpt.model.moe import MoELayer

    moe = MoEConfig(experts, top_k, hidden_size=4 * n_embd // top_k, experts_impl=impl)
    torch.manual_seed(0)  # both layers get the same weights, so they route alike
    layer = MoELayer(GPTConfig(n_embd=n_embd, n_head=1, use_moe=True, moe=moe)).to(device, dtype)
    return lambda x: layer(x)[0]


def parse_setting(spec: str) -> tuple[int, int]:
    experts, top_k = spec.split(":")
    return int(experts), int(top_k)


@entry_point(runs_model=True)  # as training runs
def main(argv: list[str]) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=4096, help="batch x sequence length")
    parser.add_argument("--settings", nargs="+", default=["8:2", "16:2", "64:8"], help="E:K pairs")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    import torch

    from moe_gpt.model.experts import FeedForward

    dtype = getattr(torch, args.dtype)
    print(
        f"device={args.device} dtype={args.dtype} tokens={args.tokens} n_embd={args.n_embd} threads={torch.get_num_threads()}"
    )
    print("| E | k | dense ms | auto / dense | grouped_mm / dense | loop / dense | goal for auto |")
    print("|---|---|---|---|---|---|---|")
    missed = []
    for experts, top_k in map(parse_setting, args.settings):
        x = torch.randn(1, args.tokens, args.n_embd, device=args.device, dtype=dtype, requires_grad=True)
        dense = FeedForward(args.n_embd, 4 * args.n_embd, "gelu", 0.0, True).to(args.device, dtype)
        t = compare(
            {
                **{impl: moe_layer(args.n_embd, experts, top_k, impl, args.device, dtype) for impl in IMPLS},
                "dense": dense,
            },
            x,
            args.repeats,
        )
        ratio, goal = t["auto"] / t["dense"], GOALS.get((experts, top_k))
        verdict = "" if goal is None else f"<= {goal:.2f}: {'met' if ratio <= goal else 'MISSED'}"
        if goal is not None and ratio > goal:
            missed.append(f"E={experts} k={top_k}")
        ratios = " | ".join(f"{t[impl] / t['dense']:.2f}x" for impl in IMPLS)
        print(f"| {experts} | {top_k} | {1000 * t['dense']:.1f} | {ratios} | {verdict} |")
    if missed and args.device == "cpu" and args.dtype == "float32":
        print(f"goal missed at {', '.join(missed)}", file=sys.stderr)
        return EXIT_FAILED
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
