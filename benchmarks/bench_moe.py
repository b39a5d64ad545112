"""Fused MoE (sorted + padded tokens, one grouped GEMM per matmul) against the peers.

Peers, on the same inputs in the same run:
  - loop: `deepseek_mini.moe.routed_experts`, one expert at a time (the reference);
  - HF eager: transformers' `DeepseekV3Experts` with its default (per-expert loop) forward;
  - HF grouped_mm: the same module with experts_implementation="grouped_mm" (torch._grouped_mm),
    the strongest PyTorch-level implementation shipped with transformers.
FLOPs count the useful matmuls only: forward 2 * (N*K) * 3 * D * I; backward twice that
(input and weight gradients). Target (issue 5): fused >= 10x the per-expert loop.

Run: python benchmarks/bench_moe.py   (needs CUDA)
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_fwd_bwd, peak_tflops, print_table, require_cuda, tflops, verdict  # noqa: E402

DEVICE = "cuda"  # every script times GPU kernels; require_cuda() exits cleanly without one

TARGET = 10.0  # x the per-expert loop

# (name, tokens, hidden D, expert width I, experts E, top-k K)
CASES = [
    ("V2-Lite layer", 512, 2048, 1408, 64, 6),
    ("V2-Lite layer", 4096, 2048, 1408, 64, 6),
    ("V2-Lite layer", 16384, 2048, 1408, 64, 6),
    ("V3-shaped, 64 experts", 4096, 7168, 2048, 64, 8),
]


def make_problem(n, d, i, e, k, dtype=torch.bfloat16, device=DEVICE):
    """Inputs of one routed-experts call: balanced-ish random routing like a trained gate."""
    x = torch.randn(n, d, device=device, dtype=dtype)
    scores = torch.rand(n, e, device=device)
    weight, idx = scores.topk(k, dim=-1)
    weight = (weight / weight.sum(-1, keepdim=True)).to(dtype)
    gate = (torch.randn(e, i, d, device=device) / d**0.5).to(dtype)
    up = (torch.randn(e, i, d, device=device) / d**0.5).to(dtype)
    down = (torch.randn(e, d, i, device=device) / i**0.5).to(dtype)
    return x, idx, weight, gate, up, down


def hf_experts(gate, up, down, implementation):
    """transformers' DeepseekV3Experts holding the same weights ([gate; up] fused on dim 1)."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Experts

    e, i, d = gate.shape
    config = DeepseekV3Config(hidden_size=d, moe_intermediate_size=i, n_routed_experts=e, hidden_act="silu")
    config._experts_implementation = implementation
    module = DeepseekV3Experts(config).to(device=gate.device, dtype=gate.dtype)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.cat([gate, up], dim=1))
        module.down_proj.copy_(down)
    return module


def check(ours, reference, name):
    """Refuse to time an implementation whose output disagrees with the reference."""
    err = (ours.float() - reference.float()).abs().max().item()
    scale = reference.float().abs().max().item()
    if not err <= 2e-2 * scale:
        raise SystemExit(f"bench_moe.py: {name} disagrees with the reference (max error {err:.3g}, max |ref| {scale:.3g})")


def main():
    require_cuda("bench_moe.py")
    from deepseek_mini.kernels.fused_moe import fused_moe
    from deepseek_mini.moe import routed_experts

    peak = peak_tflops()
    headers = ["case", "tokens", "pass", "fused ms", "loop ms", "HF eager ms", "HF grouped_mm ms",
               "vs loop", "vs HF grouped_mm", "fused TFLOP/s", "of peak", "target", "result"]
    rows = []
    for name, n, d, i, e, k in CASES:
        x, idx, w, gate, up, down = make_problem(n, d, i, e, k)
        leaves = [t.requires_grad_(True) for t in (x, w, gate, up, down)]
        y_ref = routed_experts(x, idx, w, gate, up, down)
        check(fused_moe(x, idx, w, gate, up, down), y_ref, "fused_moe")

        def ours(x_, w_, g_, u_, d_):
            return fused_moe(x_, idx, w_, g_, u_, d_)

        def loop(x_, w_, g_, u_, d_):
            return routed_experts(x_, idx, w_, g_, u_, d_)

        t_ours = bench_fwd_bwd(ours, leaves)
        t_loop = bench_fwd_bwd(loop, leaves)
        t_hf = {}
        for impl in ("eager", "grouped_mm"):
            try:
                module = hf_experts(gate.detach(), up.detach(), down.detach(), impl)
                check(module(x, idx, w), y_ref, f"HF {impl}")
                t_hf[impl] = bench_fwd_bwd(lambda x_, w_, gu_, dn_, m=module: m(x_, idx, w_),
                                           [x, w, module.gate_up_proj, module.down_proj])
                del module
            except Exception as exc:  # an implementation this torch/transformers cannot run
                print(f"HF {impl}: not timed ({type(exc).__name__}: {str(exc)[:120]})", file=sys.stderr)
        fwd_flops = 2 * n * k * 3 * d * i
        for p, (pass_name, flops) in enumerate([("fwd", fwd_flops), ("bwd", 2 * fwd_flops)]):
            tf = tflops(flops, t_ours[p])
            hf_e, hf_g = (t_hf[impl][p] if impl in t_hf else None for impl in ("eager", "grouped_mm"))
            rows.append([name, n, pass_name, t_ours[p], t_loop[p], hf_e or "n/a", hf_g or "n/a",
                         f"{t_loop[p] / t_ours[p]:.1f}x", f"{hf_g / t_ours[p]:.2f}x" if hf_g else "n/a",
                         tf, f"{tf / peak:.0%}", f">= {TARGET:.0f}x loop", verdict(t_loop[p] / t_ours[p], TARGET)])
        del x, w, gate, up, down, leaves, y_ref
        torch.cuda.empty_cache()
    print_table("Fused MoE (bf16): fused grouped GEMM vs per-expert loop and transformers", headers, rows, notes=[
        f"Measured peak: {peak:.0f} TFLOP/s (cuBLAS bf16, 8192^3). FLOPs: fwd 2*N*K*3*D*I, bwd twice that.",
        "Routing: top-k of uniform random scores (about N*K/E rows per expert). Times include the sort/pad "
        "step (moe_align) and the final K-way sum; the backward recomputes silu(gate)*up from the saved "
        "gate and up instead of storing h.",
        "Where the ratio to the loop is small, the loop itself is efficient: few experts with many rows "
        "each are large cuBLAS GEMMs; the fused kernel's gain is the launch count (6E+ launches per "
        "layer in the loop) and padding-free expert batches."])


if __name__ == "__main__":
    main()
