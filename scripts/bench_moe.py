"""Time the MoE layer's forward + backward against its references, in one run.

Three ratios, each from interleaved repeats on the same input (machines are noisy, so
only ratios measured side by side mean anything):
  1. sorted dispatch vs the per-expert mask loop (same math; tests check equal outputs),
  2. the MoE layer vs a dense FFN with the same active compute (hidden = top_k x expert hidden),
  3. the MoE layer vs GPT-2's dense FFN (hidden = 4 x n_embd), the model=dense baseline.

    python scripts/bench_moe.py                         # CPU, mini-model width
    python scripts/bench_moe.py --device cuda --dtype bfloat16 --n-embd 768 --tokens 16384
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moe_gpt.config import GPTConfig, MoEConfig
from moe_gpt.moe import MoELayer, reference_moe_forward


def dense_ffn(n_embd: int, hidden: int, device: str, dtype: torch.dtype):
    fc = torch.nn.Linear(n_embd, hidden, device=device, dtype=dtype)
    proj = torch.nn.Linear(hidden, n_embd, device=device, dtype=dtype)
    return lambda x: proj(F.gelu(fc(x), approximate="tanh"))


def time_step(forward, x: torch.Tensor) -> float:
    """Seconds for one forward + backward."""
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--tokens", type=int, default=2048, help="batch x sequence length")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    hidden = 4 * args.n_embd
    print(f"device={args.device} dtype={args.dtype} tokens={args.tokens} n_embd={args.n_embd} top_k={args.top_k}")
    print("| experts | sorted ms | mask loop ms | loop / sorted | dense same-active ms | MoE / same-active | GPT-2 FFN ms | MoE / GPT-2 FFN |")
    print("|---|---|---|---|---|---|---|---|")
    for num_experts in args.experts:
        config = GPTConfig(n_embd=args.n_embd, n_head=1, use_moe=True, moe=MoEConfig(num_experts, args.top_k))
        layer = MoELayer(config).to(args.device, dtype)
        x = torch.randn(1, args.tokens, args.n_embd, device=args.device, dtype=dtype, requires_grad=True)
        t = compare(
            {
                "sorted": lambda x: layer(x)[0],
                "loop": lambda x: reference_moe_forward(layer, x),
                "same_active": dense_ffn(args.n_embd, args.top_k * hidden, args.device, dtype),
                "gpt2_ffn": dense_ffn(args.n_embd, hidden, args.device, dtype),
            },
            x,
            args.repeats,
        )
        ms = {k: 1000 * v for k, v in t.items()}
        print(
            f"| {num_experts} | {ms['sorted']:.2f} | {ms['loop']:.2f} | {t['loop'] / t['sorted']:.2f}x "
            f"| {ms['same_active']:.2f} | {t['sorted'] / t['same_active']:.2f}x "
            f"| {ms['gpt2_ffn']:.2f} | {t['sorted'] / t['gpt2_ffn']:.2f}x |"
        )


if __name__ == "__main__":
    main()
