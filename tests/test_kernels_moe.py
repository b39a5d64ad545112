"""Fused MoE (deepseek_mini/kernels/fused_moe.py) against the per-expert loop `moe.routed_experts`.

On CPU the kernels run through the Triton interpreter, on small ragged shapes (sizes that are
not multiples of any block, experts that receive no token, a single token) in fp32 and fp16,
forward and backward. Outputs are allocated poisoned (NaN) so an element no program writes
fails. The `gpu` tests repeat the check at DeepSeek-V2-Lite sizes in bf16.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed on this platform (Linux x86-64 only)")

from deepseek_mini import backend, moe
from deepseek_mini.kernels import fused_moe as fm
from deepseek_mini.kernels._checks import poison_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# relative to the largest magnitude of the reference (fp16 inputs, fp32 accumulation in both)
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _routing(num_tokens, num_experts, top_k, device=DEVICE, skip_experts=()):
    """Distinct experts per token (like a real top-k), optionally never picking some experts."""
    allowed = torch.tensor([e for e in range(num_experts) if e not in skip_experts])
    idx = torch.stack([allowed[torch.randperm(len(allowed))[:top_k]] for _ in range(num_tokens)])
    weight = torch.rand(num_tokens, top_k) + 0.1
    return idx.to(device), weight.to(device)


def _problem(n, d, i, e, k, dtype, device=DEVICE, skip_experts=()):
    x = torch.randn(n, d, device=device).to(dtype)
    idx, w = _routing(n, e, k, device, skip_experts)
    gate = (torch.randn(e, i, d, device=device) / d**0.5).to(dtype)
    up = (torch.randn(e, i, d, device=device) / d**0.5).to(dtype)
    down = (torch.randn(e, d, i, device=device) / i**0.5).to(dtype)
    return x, idx, w, gate, up, down


def _assert_close(actual, expected, rel, name):
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-6)
    err = (actual.float() - expected).abs().max()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten, poisoned element?)"
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def _check_against_reference(n, d, i, e, k, dtype, device=DEVICE, skip_experts=(), weight_dtype=None):
    x, idx, w, gate, up, down = _problem(n, d, i, e, k, dtype, device, skip_experts)
    if weight_dtype is not None:
        w = w.to(weight_dtype)
    dy = torch.randn(n, d, device=device)
    ours = [t.clone().requires_grad_(True) for t in (x, w, gate, up, down)]
    with poison_empty():
        y = fm.fused_moe(ours[0], idx, ours[1], *ours[2:])
        y.backward(dy.to(dtype))
    # the reference runs in float32 on the same (rounded) inputs
    ref = [t.detach().float().requires_grad_(True) for t in (x, w, gate, up, down)]
    y_ref = moe.routed_experts(ref[0], idx, ref[1], *ref[2:])
    y_ref.backward(dy)
    assert y.shape == (n, d) and y.dtype == dtype
    rel = REL_TOL[dtype]
    _assert_close(y, y_ref, rel, "output")
    for name, a, b in zip(("dx", "d_topk_weight", "d_gate_proj", "d_up_proj", "d_down_proj"), ours, ref):
        assert a.grad.dtype == a.dtype, f"{name} has dtype {a.grad.dtype}, expected {a.dtype}"
        _assert_close(a.grad, b.grad, 4 * rel, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, d, i, e, k", [(37, 48, 40, 5, 2), (11, 24, 20, 8, 3), (1, 16, 16, 4, 1)])
def test_fused_moe_matches_loop_forward_and_backward(n, d, i, e, k, dtype):
    _check_against_reference(n, d, i, e, k, dtype)


def test_fused_moe_experts_without_tokens_get_zero_weight_grad():
    # experts 1 and 4 are never picked: their weight gradients must be written as exact zeros
    _check_against_reference(13, 32, 24, 6, 2, torch.float32, skip_experts=(1, 4))


def test_fused_moe_fp32_gate_weights_with_fp16_activations():
    # the gate computes its weights in float32 while activations are fp16 (as in a real model)
    _check_against_reference(10, 32, 24, 4, 2, torch.float16, weight_dtype=torch.float32)


def test_fused_moe_accepts_int32_expert_ids():
    x, idx, w, gate, up, down = _problem(9, 32, 24, 4, 2, torch.float32)
    expected = moe.routed_experts(x, idx, w, gate, up, down)
    torch.testing.assert_close(fm.fused_moe(x, idx.int(), w, gate, up, down), expected, atol=1e-5, rtol=1e-5)


def test_fused_moe_under_autocast_runs_in_the_autocast_dtype():
    # float32 master weights, fp16 autocast (bf16 arithmetic is wrong in the interpreter)
    x, idx, w, gate, up, down = _problem(9, 32, 24, 4, 2, torch.float32)
    weights = [t.clone().requires_grad_(True) for t in (gate, up, down)]
    with torch.autocast(DEVICE, dtype=torch.float16):
        y = fm.fused_moe(x, idx, w, *weights)
        y_ref = moe.routed_experts(x, idx, w, *[t.detach() for t in weights])
    assert y.dtype == y_ref.dtype == torch.float32  # the reference returns x's dtype
    _assert_close(y, y_ref, 1e-2, "output")
    # and the matmuls really ran in fp16: the result differs from a float32 run by fp16 rounding
    assert (y - moe.routed_experts(x, idx, w, gate, up, down)).abs().max() > 1e-5
    y.float().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.float32 for t in weights)


def test_moe_align_groups_pairs_by_expert_and_pads():
    idx = torch.tensor([[2, 0], [2, 3], [0, 2], [3, 2], [2, 0]])
    num_pairs, block_m, num_experts = idx.numel(), 4, 5
    sorted_ids, block_expert, offsets = fm.moe_align(idx, num_experts, block_m)
    # expert counts: e0 3 -> 4 rows, e1 0, e2 5 -> 8 rows, e3 2 -> 4 rows, e4 0
    assert offsets.tolist() == [0, 4, 4, 12, 16, 16]
    flat = idx.reshape(-1)  # pair p = 2 * token + slot: [2, 0, 2, 3, 0, 2, 3, 2, 2, 0]
    assert sorted_ids[:4].tolist() == [1, 4, 9, num_pairs]       # expert 0's pairs in token order
    assert sorted_ids[4:12].tolist() == [0, 2, 5, 7, 8, num_pairs, num_pairs, num_pairs]
    assert sorted_ids[12:16].tolist() == [3, 6, num_pairs, num_pairs]
    assert (sorted_ids[16:] == num_pairs).all()
    assert block_expert[:4].tolist() == [0, 2, 2, 3] and (block_expert[4:] == -1).all()
    # worst-case capacity: every pair once plus at most block_m - 1 pad rows per expert
    assert sorted_ids.numel() == -(-(num_pairs + num_experts * (block_m - 1)) // block_m) * block_m
    # every real pair appears exactly once, in a block of its own expert
    real = sorted_ids[sorted_ids < num_pairs].long()
    assert sorted(real.tolist()) == list(range(num_pairs))
    positions = torch.nonzero(sorted_ids < num_pairs).squeeze(1)
    assert (block_expert[positions // block_m].long() == flat[real]).all()


def test_grouped_gemm_writes_every_pair_row_of_a_poisoned_buffer():
    x, idx, w, gate, up, down = _problem(21, 40, 24, 3, 2, torch.float32)
    align = fm.moe_align(idx, 3, 16)
    out = torch.full((idx.numel(), 24), float("nan"))
    fm.grouped_gemm(x, gate, align, a_row_div=2, scale=w.reshape(-1), out=out)
    token, slot = torch.arange(21).repeat_interleave(2), torch.arange(2).repeat(21)
    expected = torch.einsum("pd,pid->pi", x[token], gate[idx[token, slot]]) * w.reshape(-1, 1)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_gate_up_swiglu_fills_h_gate_and_up():
    x, idx, _, gate, up, _ = _problem(9, 24, 40, 4, 2, torch.float32)
    align = fm.moe_align(idx, 4, 16)
    bufs = [torch.full((18, 40), float("nan")) for _ in range(3)]
    h, g, u = fm.gate_up_swiglu(x, gate, up, align, 2, out=bufs[0], gate_out=bufs[1], up_out=bufs[2])
    e = idx.reshape(-1)
    xt = x.repeat_interleave(2, 0)
    g_ref = torch.einsum("pd,pid->pi", xt, gate[e])
    u_ref = torch.einsum("pd,pid->pi", xt, up[e])
    torch.testing.assert_close(g, g_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(u, u_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h, torch.nn.functional.silu(g_ref) * u_ref, atol=1e-5, rtol=1e-5)


def test_experts_module_dispatches_to_the_kernel_when_triton_is_forced():
    experts = moe.Experts(6, 32, 24).to(DEVICE)
    x = torch.randn(7, 32, device=DEVICE)
    idx, w = _routing(7, 6, 2)
    expected = moe.routed_experts(x, idx, w, experts.gate_proj, experts.up_proj, experts.down_proj)
    with backend.forced("triton"), poison_empty():
        y = experts(x, idx, w)
        y.sum().backward()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert experts.down_proj.grad is not None and torch.isfinite(experts.down_proj.grad).all()


def test_fused_moe_rejects_bad_input_with_clear_errors():
    x, idx, w, gate, up, down = _problem(4, 16, 24, 3, 2, torch.float32)
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[0, 3\)"):
        fm.fused_moe(x, idx + 1, w, gate, up, down)
    with pytest.raises(ValueError, match="down_proj has shape"):
        fm.fused_moe(x, idx, w, gate, up, down.transpose(1, 2).contiguous())
    with pytest.raises(ValueError, match="topk_weight has shape"):
        fm.fused_moe(x, idx, w[:, :1], gate, up, down)
    with pytest.raises(TypeError, match="inputs must share one dtype"):
        fm.fused_moe(x.half(), idx, w, gate, up, down)
    with pytest.raises(TypeError, match="topk_idx has dtype float32"):
        fm.fused_moe(x, idx.float(), w, gate, up, down)
    with pytest.raises(ValueError, match="up_proj must be contiguous"):
        fm.fused_moe(x, idx, w, gate, up.transpose(1, 2).contiguous().transpose(1, 2), down)


def test_fused_moe_takes_strided_activations():
    x, idx, w, gate, up, down = _problem(6, 24, 16, 3, 2, torch.float32)
    wide = torch.randn(6, 48)
    wide[:, ::2] = x  # x as a strided view: every other column of a wider tensor
    expected = moe.routed_experts(x, idx, w, gate, up, down)
    torch.testing.assert_close(fm.fused_moe(wide[:, ::2], idx, w, gate, up, down), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n", [512, 4096])
def test_fused_moe_bf16_at_deepseek_v2_lite_size(n):
    # DeepSeek-V2-Lite's MoE layer: hidden 2048, expert width 1408, 64 experts, top-6
    _check_against_reference(n, 2048, 1408, 64, 6, torch.bfloat16, device="cuda")


@pytest.mark.gpu
def test_fused_moe_fp32_on_gpu_uses_tf32_within_tolerance():
    x, idx, w, gate, up, down = _problem(300, 512, 384, 16, 4, torch.float32, device="cuda")
    y = fm.fused_moe(x, idx, w, gate, up, down)
    _assert_close(y, moe.routed_experts(x, idx, w, gate, up, down), 5e-3, "output")
