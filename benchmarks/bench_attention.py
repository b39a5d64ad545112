"""Flash attention forward and backward against PyTorch SDPA with the flash backend.

Same inputs, same run. Figure of merit: matmul TFLOP/s over the visible (query, key) pairs
(forward 2 matmuls, backward 5), as a fraction of the measured bf16 matmul peak.
Targets (issue 5, H100): forward >= 1.0x SDPA, backward >= 0.8x SDPA.

Run: python benchmarks/bench_attention.py   (needs CUDA)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import bench_fwd_bwd, peak_tflops, print_table, require_cuda, tflops, verdict  # noqa: E402

TARGETS = {"fwd": 1.0, "bwd": 0.8}  # our speed / SDPA speed

# name, (B, Hq, Hkv, S, D, DV, causal, window)
CASES = [
    ("causal", (4, 32, 32, 4096, 128, 128, True, None)),
    ("full", (4, 32, 32, 4096, 128, 128, False, None)),
    ("causal d64", (8, 32, 32, 4096, 64, 64, True, None)),
    ("causal long", (1, 32, 32, 16384, 128, 128, True, None)),
    ("GQA 32/8", (4, 32, 8, 4096, 128, 128, True, None)),
    ("MLA prefill 192/128", (4, 16, 16, 4096, 192, 128, True, None)),
    ("window 1024", (2, 32, 32, 16384, 128, 128, True, 1024)),
]


def sdpa(causal, enable_gqa, flash_only=True):
    """PyTorch SDPA restricted to its flash backend (or, flash_only=False, whichever backend
    PyTorch picks). It has no sliding window: for a window case it runs full causal attention
    (more work; the note under the table says so)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def run(q, k, v):
        if not flash_only:
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=enable_gqa)

    return run


def time_sdpa(inputs, causal, group, notes, name):
    """SDPA flash timings. GQA goes through enable_gqa when the flash backend takes it, else
    through K/V repeated per query head. Where the flash backend refuses the case (e.g. q/k and
    v head dims differ, as in MLA) the peer is SDPA's own choice of backend, and a note says so."""
    q, k, v = inputs
    attempts = [(sdpa(causal, group > 1), inputs)]
    if group > 1:
        expanded = [t.detach().repeat_interleave(group, 1).requires_grad_(True) for t in (k, v)]
        attempts.append((sdpa(causal, False), (q, *expanded)))
    error = None
    for fn, args in attempts:
        try:
            return bench_fwd_bwd(fn, args)
        except RuntimeError as e:
            error = e
    notes.append(f"{name}: SDPA flash backend refused it ({str(error).splitlines()[0][:100]}); "
                 "the peer is SDPA with its default backend choice")
    try:
        return bench_fwd_bwd(sdpa(causal, group > 1, flash_only=False), inputs)
    except RuntimeError as e:
        notes.append(f"{name}: SDPA failed too ({str(e).splitlines()[0][:100]})")
        return None


def main():
    require_cuda("bench_attention.py")
    from deepseek_mini.kernels.flash_attention import flash_attention, flops

    peak = peak_tflops()
    headers = ["case", "B x Hq/Hkv x S x D/Dv (bf16)", "pass", "ours ms", "SDPA flash ms", "ours / SDPA speed",
               "ours TFLOP/s", "of peak", "target", "result"]
    rows, notes = [], []
    for name, (B, Hq, Hkv, S, D, DV, causal, window) in CASES:
        def make():
            mk = lambda h, d: torch.randn(B, h, S, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)  # noqa: E731
            return mk(Hq, D), mk(Hkv, D), mk(Hkv, DV)

        inputs = make()
        ours = bench_fwd_bwd(lambda q, k, v: flash_attention(q, k, v, causal=causal, window=window), inputs)
        peer = time_sdpa(inputs, causal, Hq // Hkv, notes, name)
        fwd_flops = flops(B, Hq, S, S, D, DV, causal, window)
        for i, pass_name in enumerate(("fwd", "bwd")):
            work = fwd_flops * (1 if pass_name == "fwd" else 2.5)
            tf = tflops(work, ours[i])
            ratio = peer[i] / ours[i] if peer else None
            rows.append([name, f"{B}x{Hq}/{Hkv}x{S}x{D}/{DV}", pass_name, ours[i], peer[i] if peer else "n/a",
                         ratio if ratio else "n/a", tf, f"{tf / peak:.0%}", f">= {TARGETS[pass_name]}x",
                         verdict(ratio, TARGETS[pass_name]) if ratio else "no peer"])
        del inputs
        torch.cuda.empty_cache()
    notes += [
        f"Measured bf16 matmul peak: {peak:.0f} TFLOP/s (cuBLAS 8192^3). FLOPs count only the "
        "visible (query, key) pairs: causal about half of full.",
        "window: SDPA has no sliding window, so the peer runs full causal attention over the "
        "same sequence; the ratio then shows what the window saves, not kernel quality.",
        "What limits us where a target is missed: a plain-pointer Triton kernel without warp "
        "specialisation or TMA (it must also run on triton 3.6 and in the interpreter); the "
        "backward recomputes scores twice (separate dK/dV and dQ kernels, no atomics).",
        "MLA 192/128: the q/k head dim runs as 128 + 64 slices (flash_attention.head_blocks), not "
        "padded to 256 as in the first record, so it gets the head-dim-128 tiles; its backward "
        "accumulators (dK 192 + dV 128 wide) still fill the registers: only the 64x32, 8-warp "
        "tile compiles without spills on sm_90 (pytest -s tests/test_kernels_sm90.py).",
    ]
    print_table("Flash attention vs PyTorch SDPA (flash backend)", headers, rows, notes)


if __name__ == "__main__":
    main()
