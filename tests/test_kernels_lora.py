"""Fused LoRA linear (deepseek_mini/kernels/fused_lora.py) against `lora.lora_linear`.

On CPU the kernel runs through the Triton interpreter on ragged shapes (sizes that are not
multiples of any tile, ranks that are not powers of two) in fp32 and fp16, forward and
backward, with output buffers poisoned (NaN). The `gpu` tests repeat it at model sizes in bf16.
"""

import pytest
import torch

pytest.importorskip("triton", reason="Triton is not installed on this platform (Linux x86-64 only)")

from deepseek_mini import backend, lora
from deepseek_mini.kernels import fused_lora as fl
from deepseek_mini.kernels._checks import poison_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _assert_close(actual, expected, rel, name):
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-6)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten, poisoned element?)"
    err = (actual.float() - expected).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def _check(lead, d_in, d_out, rank, dtype, *, bias=True, scaling=2.0, train_base=False, train_x=True, device=DEVICE):
    x = torch.randn(*lead, d_in, device=device).to(dtype)
    w = (torch.randn(d_out, d_in, device=device) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    a = (torch.randn(rank, d_in, device=device) / d_in**0.5).to(dtype)
    bb = (torch.randn(d_out, rank, device=device) / rank**0.5).to(dtype)  # nonzero B: test the adapter path
    dy = torch.randn(*lead, d_out, device=device)

    def leaves(cast):
        out = []
        for t, trains in ((x, train_x), (w, train_base), (b, train_base), (a, True), (bb, True)):
            out.append(None if t is None else cast(t).detach().clone().requires_grad_(trains))
        return out

    ours = leaves(lambda t: t)
    with poison_empty():
        y = fl.fused_lora_linear(*ours, scaling)
        y.backward(dy.to(dtype))
    ref = leaves(lambda t: t.float())  # the reference in float32 on the same rounded inputs
    y_ref = lora.lora_linear(*ref, scaling)
    y_ref.backward(dy)
    assert y.shape == (*lead, d_out) and y.dtype == dtype
    rel = REL_TOL[dtype]
    _assert_close(y, y_ref, rel, "output")
    for name, t, r in zip(("dx", "d_weight", "d_bias", "d_lora_A", "d_lora_B"), ours, ref):
        if t is None or not t.requires_grad:
            assert t is None or t.grad is None, f"{name} should not be computed for a frozen tensor"
            continue
        _assert_close(t.grad, r.grad, 4 * rel, name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
# (150 rows: several row tiles of the update kernel)
@pytest.mark.parametrize("lead, d_in, d_out, rank",
                         [((2, 7), 50, 45, 6), ((37,), 64, 33, 16), ((1,), 40, 72, 3), ((150,), 24, 40, 4)])
def test_fused_lora_matches_reference_forward_and_backward(lead, d_in, d_out, rank, dtype):
    _check(lead, d_in, d_out, rank, dtype)


def test_fused_lora_without_bias_and_with_a_trained_base_weight():
    _check((9,), 48, 40, 8, torch.float32, bias=False, train_base=True, scaling=0.5)
    _check((5,), 32, 24, 4, torch.float32, bias=True, train_base=True)


def test_fused_lora_adapter_grads_when_the_input_needs_none():
    _check((7,), 40, 24, 4, torch.float16, train_x=False)


def test_lora_update_adds_the_scaled_low_rank_product_in_place_everywhere():
    # 70 x 90 is ragged for every tile; a NaN left anywhere in out would survive the update
    out = torch.randn(70, 90)
    t, b = torch.randn(70, 5), torch.randn(90, 5)
    expected = out + 0.25 * t @ b.t()
    result = fl.lora_update_(out, t, b.t(), 0.25)  # B read through its transposed view (no copy)
    assert result is out
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_lora_linear_module_dispatches_to_the_kernel_when_triton_is_forced():
    base = torch.nn.Linear(48, 40).to(DEVICE)
    layer = lora.LoRALinear(base, r=8, alpha=16)
    torch.nn.init.normal_(layer.lora_B)  # B starts at 0; make the adapter path matter
    x = torch.randn(2, 5, 48, device=DEVICE)
    expected = layer(x)
    expected.sum().backward()
    grad_a, grad_b = layer.lora_A.grad.clone(), layer.lora_B.grad.clone()
    layer.zero_grad()
    with backend.forced("triton"), poison_empty():
        y = layer(x)
        # the output of the kernel's autograd Function, seen through the final reshape
        assert "FusedLoRA" in type(y.grad_fn.next_functions[0][0]).__name__
        y.sum().backward()
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.lora_A.grad, grad_a, atol=1e-4, rtol=1e-5)
    torch.testing.assert_close(layer.lora_B.grad, grad_b, atol=1e-4, rtol=1e-5)


def test_fused_lora_under_autocast_matches_reference():
    x, w, b = torch.randn(6, 32, device=DEVICE), torch.randn(24, 32, device=DEVICE), torch.randn(24, device=DEVICE)
    a = torch.randn(4, 32, device=DEVICE, requires_grad=True)
    bb = torch.randn(24, 4, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=torch.float16):
        expected = lora.lora_linear(x, w, b, a, bb, 0.5)
        y = fl.fused_lora_linear(x, w, b, a, bb, 0.5)
    assert y.dtype == expected.dtype == torch.float16
    _assert_close(y, expected, REL_TOL[torch.float16], "output")
    y.float().sum().backward()
    assert a.grad.dtype == torch.float32 and torch.isfinite(bb.grad).all()


def test_fused_lora_rejects_bad_input_with_clear_errors():
    x, w, a, b = torch.randn(3, 16), torch.randn(8, 16), torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match=r"x has shape \(3, 12\), expected \(\.\.\., 16\)"):
        fl.fused_lora_linear(torch.randn(3, 12), w, None, a, b, 1.0)
    with pytest.raises(ValueError, match=r"lora_B has shape \(4, 8\), expected \(8, 4\)"):
        fl.fused_lora_linear(x, w, None, a, b.t(), 1.0)
    with pytest.raises(ValueError, match=r"bias has shape \(4,\), expected \(8\)"):
        fl.fused_lora_linear(x, w, torch.randn(4), a, b, 1.0)
    with pytest.raises(TypeError, match="inputs must share one dtype"):
        fl.fused_lora_linear(x.half(), w, None, a, b, 1.0)
    with pytest.raises(TypeError, match="scaling must be a Python float"):
        fl.fused_lora_linear(x, w, None, a, b, torch.tensor(1.0))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens, d_in, d_out, rank", [(4096, 4096, 4096, 16), (2048, 7168, 1536, 64)])
def test_fused_lora_bf16_at_model_size(tokens, d_in, d_out, rank):
    _check((tokens,), d_in, d_out, rank, torch.bfloat16, device="cuda")
