"""CPU references for the routed experts: the per-expert loop against the grouped one.

`moe.routed_experts_loop` runs each picked expert on its gathered tokens (a Python loop of small
matmuls); `moe.routed_experts_grouped` sorts the (token, slot) pairs by expert and runs all
experts in one `torch._grouped_mm` per projection. `ops.routed_experts` picks between them by a
rule drawn from this table: grouped with gradients and at <= 64 rows per expert, else the loop.

    python benchmarks/bench_moe_cpu.py            # one thread (the rule was set from it)
    python benchmarks/bench_moe_cpu.py --threads 2

Prints forward (no gradient) and forward + backward times in ms, the ratio loop / grouped (> 1:
grouped is faster), and the largest difference between the two outputs. The machine's load
average is printed with them: on a shared machine the timings are noisy.
"""

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deepseek_mini import moe  # noqa: E402

# (tokens, dim, expert inter dim, experts, top-k): the tiny recipe's sizes, larger ones, and decode
SHAPES = [(256, 64, 32, 8, 2), (1024, 64, 32, 8, 2), (512, 128, 64, 16, 4), (2048, 256, 128, 64, 6), (4, 64, 32, 8, 2)]


def ms_per_call(fn, seconds: float = 1.0) -> float:
    fn()
    start, calls = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        fn()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e3


def bench(n, d, i, e, k, grad: bool) -> str:
    torch.manual_seed(0)
    x = torch.randn(n, d).requires_grad_(grad)
    gate = (torch.randn(e, i, d) * 0.1).requires_grad_(grad)
    up, down = torch.randn(e, i, d) * 0.1, torch.randn(e, d, i) * 0.1
    idx, weight = torch.rand(n, e).topk(k, dim=-1).indices, torch.rand(n, k)
    diff = (moe.routed_experts_loop(x, idx, weight, gate, up, down)
            - moe.routed_experts_grouped(x, idx, weight, gate, up, down)).abs().max().item()
    ms = {}
    for name, f in (("loop", moe.routed_experts_loop), ("grouped", moe.routed_experts_grouped)):
        def run():
            y = f(x, idx, weight, gate, up, down)
            if grad:
                (y * y).sum().backward()
        ms[name] = ms_per_call(run)
    return (f"| {n} | {d} | {i} | {e} | {k} | {n * k / e:.0f} | {'fwd+bwd' if grad else 'fwd'} | {ms['loop']:.2f} "
            f"| {ms['grouped']:.2f} | {ms['loop'] / ms['grouped']:.2f}x | {diff:.1e} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), load average {os.getloadavg()[0]:.2f} at start\n")
    print("| tokens | dim | inter | experts | top-k | rows/expert | pass | loop ms | grouped ms | loop/grouped | max diff |")
    print("|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|")
    for grad in (False, True):
        for shape in SHAPES:
            print(bench(*shape, grad), flush=True)
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
