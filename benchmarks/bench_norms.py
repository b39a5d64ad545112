"""Memory-bound elementwise kernels: RMSNorm, SwiGLU, RoPE, forward and backward.

Peers on the same inputs in the same run: eager PyTorch (the library's reference functions)
and Liger-Kernel when it is installed. These ops do almost no arithmetic, so the figure of
merit is bandwidth: bytes that must move (inputs read once, outputs written once) divided by
time, as a fraction of the measured copy bandwidth. Target (issue 5): >= 80% of HBM bandwidth.

Run: python benchmarks/bench_norms.py   (needs CUDA)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_fwd_bwd, gbps, peak_bandwidth_gbps, print_table, require_cuda, verdict  # noqa: E402

TARGET = 0.80  # fraction of measured HBM bandwidth


def _liger():
    """Liger-Kernel's functional ops, or None when it is not installed (it is optional)."""
    try:
        from liger_kernel.transformers.functional import liger_rms_norm, liger_swiglu
    except Exception:
        return None
    return {"rms_norm": lambda x, w: liger_rms_norm(x, w, 1e-6),
            "swiglu": lambda g, u: liger_swiglu(g, u)}


def _eager(fn):
    """The library's reference function forced onto its PyTorch path: on CUDA the library
    dispatches to our own kernels, so without this the 'eager' peer would time them again
    (it did in the first GPU record: RMSNorm and RoPE 'eager' equalled ours)."""
    from deepseek_mini import backend

    def run(*args):
        with backend.forced("torch"):
            return fn(*args)

    return run


def cases():
    """(name, shape, ours, eager, liger-or-None, make_inputs, fwd bytes, bwd bytes)"""
    from deepseek_mini import layers
    from deepseek_mini.kernels import rmsnorm, swiglu

    liger = _liger() or {}
    dt = torch.bfloat16
    el = torch.finfo(dt).bits // 8
    out = []
    for rows, dim in [(4096, 4096), (16384, 7168), (32768, 512)]:
        def make(rows=rows, dim=dim):
            return (torch.randn(rows, dim, device="cuda", dtype=dt, requires_grad=True),
                    torch.ones(dim, device="cuda", dtype=dt, requires_grad=True))
        n = rows * dim * el
        out.append(("rmsnorm", f"{rows}x{dim}", rmsnorm.rms_norm, _eager(layers.rms_norm), liger.get("rms_norm"),
                    make, 2 * n, 3 * n))
    for rows, dim in [(4096, 11008), (16384, 2048)]:
        def make(rows=rows, dim=dim):
            return tuple(torch.randn(rows, dim, device="cuda", dtype=dt, requires_grad=True) for _ in range(2))
        n = rows * dim * el
        out.append(("swiglu", f"{rows}x{dim}", swiglu.swiglu, _eager(layers.swiglu), liger.get("swiglu"),
                    make, 3 * n, 5 * n))
    out += rope_cases(dt)
    return out


def rope_cases(dt):
    from deepseek_mini import rope
    from deepseek_mini.kernels import rope as rope_kernel

    el = torch.finfo(dt).bits // 8
    out = []
    for (b, h, s, d), interleaved in [((8, 32, 2048, 128), False), ((8, 128, 1024, 64), True)]:
        cos, sin = rope.precompute_rope(d, s, 10000.0, None)
        cos, sin = cos.cuda(), sin.cuda()

        def make(b=b, h=h, s=s, d=d):
            return (torch.randn(b, h, s, d, device="cuda", dtype=dt, requires_grad=True),)

        n = b * h * s * d * el
        layout = "pairs" if interleaved else "halves"
        out.append((f"rope ({layout})", f"{b}x{h}x{s}x{d}",
                    lambda x, c=cos, s_=sin, i=interleaved: rope_kernel.apply_rope(x, c, s_, i),
                    _eager(lambda x, c=cos, s_=sin, i=interleaved: rope.apply_rope(x, c, s_, i)),
                    None, make, 2 * n, 2 * n))
    return out


def main():
    require_cuda("bench_norms.py")
    peak = peak_bandwidth_gbps()
    headers = ["op", "shape (bf16)", "pass", "ours ms", "eager ms", "Liger ms", "speedup vs eager",
               "ours GB/s", "of peak", "target", "result"]
    rows = []
    for name, shape, ours, eager, liger, make, fwd_bytes, bwd_bytes in cases():
        inputs = make()
        t_ours = bench_fwd_bwd(ours, inputs)
        t_eager = bench_fwd_bwd(eager, inputs)
        t_liger = bench_fwd_bwd(liger, inputs) if liger else None
        for i, (pass_name, nbytes) in enumerate([("fwd", fwd_bytes), ("bwd", bwd_bytes)]):
            bw = gbps(nbytes, t_ours[i])
            rows.append([name, shape, pass_name, t_ours[i], t_eager[i],
                         t_liger[i] if t_liger else "n/a", t_eager[i] / t_ours[i], bw, f"{bw / peak:.0%}",
                         f">= {TARGET:.0%}", verdict(bw / peak, TARGET)])
        del inputs
        torch.cuda.empty_cache()
    print_table("Norms and elementwise kernels (RMSNorm, SwiGLU, RoPE)", headers, rows, notes=[
        f"Measured peak: {peak:.0f} GB/s (2 GiB device copy). Bytes counted: inputs read once + "
        "outputs written once (RMSNorm fwd 2, bwd 3 tensors; SwiGLU fwd 3, bwd 5; RoPE 2 each); "
        "the weight, the per-row rstd and the dweight partial sums are left out (< 1%).",
        "Liger-Kernel: 'n/a' when it is not installed (pip install liger-kernel); it has no "
        "separate single-tensor RoPE, so RoPE is compared with eager only.",
        "A missed target on small shapes is launch/tail bound: too few bytes to fill the GPU."])


if __name__ == "__main__":
    main()
