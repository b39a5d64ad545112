"""Quantized matmul: weight-only int8 / int4 / FP8 at decode batch sizes, and the FP8
block-scaled GEMM, against bf16 `torch.matmul` and `torch._scaled_mm`.

Table 1 (decode, batch 1-16, memory-bound): y = x @ W^T with W stored as int8 (per channel),
int4 (groups of 128) or FP8 (128x128 blocks), dequantized in registers. Peer: the bf16 matmul
on the unquantized weight (what you would run without quantization). Bytes = weight codes +
scales + x + y; GB/s as a fraction of the measured copy bandwidth. Targets (issue 5, H100):
int8 >= 1.6x bf16, int4 >= 2.5x bf16 at batch 1-16.

Table 2 (prefill, compute-bound): `fp8_block_gemm` (FP8 x FP8 with DeepSeek-V3's 1x128
activation / 128x128 weight scales) against the bf16 matmul and `torch._scaled_mm` (block-wise
scales when this torch supports them, else row-wise scales: the same FP8 tensor-core work).

Run: python benchmarks/bench_quant.py   (needs CUDA)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_graph_ms, bench_ms, gbps, peak_bandwidth_gbps, peak_tflops, print_table, require_cuda, tflops, verdict  # noqa: E402

DEVICE = "cuda"  # every script times GPU kernels; require_cuda() exits cleanly without one

TARGETS = {"int8": 1.6, "int4": 2.5}  # x bf16 matmul at batch 1-16
DECODE_BATCHES = [1, 4, 16]
DECODE_SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008)]  # (N out, K in)
PREFILL = [(4096, 4096, 4096), (4096, 2112, 7168), (16384, 7168, 2048)]  # (M, N, K)
GROUP = 128


def check(ours, reference, name, rel=2e-2):
    err = (ours.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    if not err <= rel * scale:
        raise SystemExit(f"bench_quant.py: {name} disagrees with the reference (max error {err:.3g}, max |ref| {scale:.3g})")


def decode_rows(peak_gbps):
    from deepseek_mini import quant
    from deepseek_mini.kernels import quant_matmul as qm

    rows = []
    for n, k in DECODE_SHAPES:
        w = torch.randn(n, k, device=DEVICE) * 0.02
        w_bf16 = w.to(torch.bfloat16)
        q8, s8, _ = quant.quantize_int8(w)
        q4, s4 = quant.quantize_int4(w, GROUP)
        f8, f8_scale = quant.quantize_fp8_block(w)
        schemes = [
            ("int8", lambda x: qm.int8_matmul(x, q8, s8), n * k + 4 * n,
             lambda: quant.dequantize_int8(q8, s8, None, torch.bfloat16)),
            ("int4", lambda x: qm.int4_matmul(x, q4, s4, GROUP), n * k // 2 + 4 * s4.numel(),
             lambda: quant.dequantize_int4(q4, s4, GROUP, torch.bfloat16)),
            ("fp8 (weight-only)", lambda x: qm.fp8_weight_matmul(x, f8, f8_scale), n * k + 4 * f8_scale.numel(),
             lambda: quant.dequantize_fp8_block(f8, f8_scale, 128, torch.bfloat16)),
        ]
        for m in DECODE_BATCHES:
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            io_bytes = 2 * m * (k + n)
            t_bf16 = bench_ms(lambda: x @ w_bf16.t())
            g_bf16 = bench_graph_ms(lambda: x @ w_bf16.t())
            for name, fn, weight_bytes, dequant in schemes:
                check(fn(x), x.float() @ dequant().float().t(), name)
                t = bench_ms(lambda: fn(x))
                g = bench_graph_ms(lambda: fn(x))
                target = TARGETS.get(name)
                row = [m, f"{n}x{k}", name, t, t_bf16, f"{t_bf16 / t:.2f}x"]
                if g and g_bf16:  # kernel time alone: bandwidth, speedup and verdict from the graph
                    bw = gbps(weight_bytes + io_bytes, g)
                    row += [g, g_bf16, f"{g_bf16 / g:.2f}x", bw, f"{bw / peak_gbps:.0%}"]
                    result = verdict(g_bf16 / g, target) if target else "-"
                else:
                    row += ["n/a"] * 5
                    result = verdict(t_bf16 / t, target) + " (eager)" if target else "-"
                rows.append(row + [f">= {target}x bf16" if target else "-", result])
        del w, w_bf16, q8, q4, f8
        torch.cuda.empty_cache()
    return rows


def scaled_mm_peer(x, w):
    """(label, fn) for torch._scaled_mm on the same problem: block-wise scales if this torch
    accepts DeepSeek's layout, else row-wise (one scale per row of x and of w)."""
    from deepseek_mini import quant

    x_fp8, x_scale = quant.quantize_fp8_activation(x)
    w_fp8, w_scale_inv = quant.quantize_fp8_block(w)
    try:
        def blockwise():
            return torch._scaled_mm(x_fp8, w_fp8.t(), scale_a=x_scale, scale_b=w_scale_inv.t(), out_dtype=torch.bfloat16)
        check(blockwise(), quant.dequantize_fp8_activation(x_fp8, x_scale) @ quant.dequantize_fp8_block(w_fp8, w_scale_inv).t(),
              "_scaled_mm block-wise")
        return "_scaled_mm (block-wise)", blockwise
    except Exception as exc:
        print(f"torch._scaled_mm block-wise: not available here ({type(exc).__name__}); using row-wise scales",
              file=sys.stderr)
    fp8_max = torch.finfo(torch.float8_e4m3fn).max
    sx = x.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / fp8_max
    sw = w.float().abs().amax(1, keepdim=True).clamp_min(1e-12) / fp8_max
    xq, wq = (x.float() / sx).to(torch.float8_e4m3fn), (w.float() / sw).to(torch.float8_e4m3fn)
    sw_t = sw.t().contiguous()

    def rowwise():
        return torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw_t, out_dtype=torch.bfloat16)

    check(rowwise(), x.float() @ w.float().t(), "_scaled_mm row-wise", rel=0.1)
    return "_scaled_mm (row-wise)", rowwise


def prefill_rows(peak_tf):
    from deepseek_mini import quant
    from deepseek_mini.kernels import quant_matmul as qm

    rows = []
    for m, n, k in PREFILL:
        x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
        w = (torch.randn(n, k, device=DEVICE) * 0.02).to(torch.bfloat16)
        x_fp8, x_scale = quant.quantize_fp8_activation(x)
        w_fp8, w_scale_inv = quant.quantize_fp8_block(w)
        check(qm.fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv),
              quant.dequantize_fp8_activation(x_fp8, x_scale) @ quant.dequantize_fp8_block(w_fp8, w_scale_inv).t(),
              "fp8_block_gemm")
        t_ours = bench_ms(lambda: qm.fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv))
        t_bf16 = bench_ms(lambda: x @ w.t())
        try:
            label, peer = scaled_mm_peer(x, w)
            t_peer = bench_ms(peer)
        except Exception as exc:
            label, t_peer = f"_scaled_mm: {type(exc).__name__}", None
        tf = tflops(2 * m * n * k, t_ours)
        rows.append([f"{m}x{n}x{k}", t_ours, t_bf16, f"{t_bf16 / t_ours:.2f}x", label,
                     t_peer if t_peer else "n/a", f"{t_peer / t_ours:.2f}x" if t_peer else "n/a",
                     tf, f"{tf / peak_tf:.0%}"])
        del x, w, x_fp8, w_fp8
        torch.cuda.empty_cache()
    return rows


def main():
    require_cuda("bench_quant.py")
    peak_gb, peak_tf = peak_bandwidth_gbps(), peak_tflops()
    print_table("Weight-only quantized matmul at decode batch sizes (bf16 activations)",
                ["batch", "N x K", "weights", "ours ms", "bf16 matmul ms", "speedup", "ours graph ms",
                 "bf16 graph ms", "graph speedup", "GB/s (graph)", "of peak", "target", "result (graph)"],
                decode_rows(peak_gb), notes=[
                    f"Measured peak: {peak_gb:.0f} GB/s (2 GiB device copy). int8: per-channel scales; "
                    f"int4: symmetric groups of {GROUP}, 2 per byte; fp8: e4m3 with 128x128 block scales. "
                    "Up to 16 rows our kernel is the split-K GEMV (programs over column tiles x slices of K, "
                    "float32 partials summed after).",
                    "'ms': each call launched from Python (do_bench). 'graph ms': the same call replayed from "
                    "a CUDA graph, i.e. GPU time without Python/launch overhead, which is what a decode loop "
                    "captured in a graph pays; GB/s, speedup and result use it. Where 'ms' is much larger "
                    "than 'graph ms', host overhead (argument checks, the autograd Function, launches) is the "
                    "limit of the eager call, not the kernel.",
                    "The ceiling is the byte ratio: int8 reads 1/2 and int4 about 1/4 of bf16's weight bytes. "
                    "Where a target is missed with 'of peak' low, the kernel does not keep enough loads in "
                    "flight (see registers per thread in tests/test_kernels_sm90.py -s) or the in-register "
                    "dequantize is the limit."])
    print_table("FP8 block-scaled GEMM (DeepSeek-V3 layout) at prefill sizes",
                ["M x N x K", "fp8_block_gemm ms", "bf16 matmul ms", "vs bf16", "FP8 peer", "peer ms",
                 "vs peer", "TFLOP/s", "of bf16 peak"],
                prefill_rows(peak_tf), notes=[
                    f"Measured bf16 peak: {peak_tf:.0f} TFLOP/s; FP8 tensor cores peak at about twice that. "
                    "No issue target for this table; it shows where the block-scaled kernel stands."])


if __name__ == "__main__":
    main()
