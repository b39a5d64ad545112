"""Shared helpers for the benchmark scripts: timing, the measured machine peak, markdown tables.

Every figure is taken on the machine at hand, in the same run: our kernel, the peer on the same
inputs, and the peak the hardware actually reaches (a large device-to-device copy for memory
bandwidth, a large bf16 matmul for TFLOP/s), so "fraction of peak" means "of what this GPU
really does", not of a datasheet number.

Scripts import this as `from common import ...` (they are run as `python benchmarks/x.py`,
which puts benchmarks/ on sys.path) or `from benchmarks.common import ...` from the repo root.
"""

import os
import sys
from datetime import datetime, timezone

import torch

# `python benchmarks/bench_x.py` puts only benchmarks/ on sys.path: make the repository's
# deepseek_mini importable too when it is not installed (a GPU box with its own torch + triton)
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(1, _REPO)

# run_all.py measures the peak once and hands it to each script through these variables
_PEAK_GBPS_ENV = "DEEPSEEK_MINI_PEAK_GBPS"
_PEAK_TFLOPS_ENV = "DEEPSEEK_MINI_PEAK_TFLOPS"


def require_cuda(script: str) -> None:
    """Benchmarks time GPU kernels; on a machine without CUDA say so and exit cleanly (code 0),
    so `run_all.py` on a laptop reports what it skipped instead of failing."""
    if not torch.cuda.is_available():
        print(f"{script}: needs CUDA (no GPU found); skipped. Run it on a machine with an NVIDIA GPU.")
        sys.exit(0)


def bench_ms(fn, warmup: int = 25, rep: int = 100, grad_to_none=None) -> float:
    """Median time of fn() in milliseconds, timed with CUDA events (triton's do_bench, which
    also flushes the L2 cache between runs so a memory-bound kernel is not flattered)."""
    from triton.testing import do_bench

    return do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none, return_mode="median")


def bench_graph_ms(fn, rep: int = 100):
    """Median time in ms of fn() replayed from a CUDA graph: the GPU work alone, without Python
    and launch overhead (what a decode server that captures its step in a graph pays). Decode-
    sized kernels run for microseconds, so `bench_ms` may be timing the host instead; the two
    side by side say which one limits. None (and a note on stderr) if fn cannot be captured."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm up (compile, allocate) outside the capture
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return bench_ms(graph.replay, rep=rep)
    except Exception as exc:  # report, keep the rest of the table
        print(f"CUDA graph capture failed ({type(exc).__name__}: {exc})", file=sys.stderr)
        return None


def bench_fwd_bwd(fn, inputs, grad_out=None):
    """(forward ms, backward ms) of y = fn(*inputs): the backward is timed alone, replaying
    y.backward on a graph built once, with the input grads reset between runs."""
    fwd = bench_ms(lambda: fn(*inputs))
    y = fn(*inputs)
    grad_out = torch.randn_like(y) if grad_out is None else grad_out
    bwd = bench_ms(lambda: y.backward(grad_out, retain_graph=True), grad_to_none=list(inputs))
    return fwd, bwd


def _time_cuda_events(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def peak_bandwidth_gbps() -> float:
    """Achievable HBM bandwidth in GB/s: a 2 GiB device copy reads and writes every byte once."""
    if os.environ.get(_PEAK_GBPS_ENV):
        return float(os.environ[_PEAK_GBPS_ENV])
    n = 2**30  # bytes per buffer: far beyond any L2 cache
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = min(_time_cuda_events(lambda: dst.copy_(src), 20) for _ in range(3))
    del src, dst
    return 2 * n / (ms * 1e-3) / 1e9


def peak_tflops(dtype=torch.bfloat16) -> float:
    """Achievable dense matmul throughput in TFLOP/s: cuBLAS on an 8192^3 problem."""
    if os.environ.get(_PEAK_TFLOPS_ENV) and dtype == torch.bfloat16:
        return float(os.environ[_PEAK_TFLOPS_ENV])
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    ms = min(_time_cuda_events(lambda: a @ b, 10) for _ in range(3))
    return 2 * n**3 / (ms * 1e-3) / 1e12


def export_peaks() -> dict:
    """Measure both peaks once and put them in the environment for child scripts."""
    gbps, tflops = peak_bandwidth_gbps(), peak_tflops()
    os.environ[_PEAK_GBPS_ENV], os.environ[_PEAK_TFLOPS_ENV] = f"{gbps:.1f}", f"{tflops:.1f}"
    return {"bandwidth_gbps": gbps, "bf16_tflops": tflops}


def gbps(nbytes: float, ms: float) -> float:
    return nbytes / (ms * 1e-3) / 1e9


def tflops(flops: float, ms: float) -> float:
    return flops / (ms * 1e-3) / 1e12


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "missed"


def device_name() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def header(title: str) -> str:
    """A heading line that says what ran where, printed above each table."""
    import triton

    return (f"### {title}\n\n{device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC\n")


def markdown_table(headers, rows) -> str:
    """Rows of values -> a GitHub markdown table; floats get 3 significant digits."""

    def cell(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers, rows, notes=()) -> None:
    print(header(title))
    print(markdown_table(headers, rows))
    for note in notes:
        print(f"\n{note}")
    print(flush=True)
