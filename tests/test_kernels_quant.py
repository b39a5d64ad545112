"""Quantized matmul kernels (deepseek_mini/kernels/quant_matmul.py) against the reference: the
library's own dequantize_* functions followed by a float matmul, i.e. what `QuantLinear` does.

CPU runs go through the Triton interpreter on ragged shapes in fp32 and fp16 with poisoned
(NaN) output buffers. Loading float8_e4m3fn works in the interpreter on triton 3.8 (these tests
pass FP8 tensors straight to the kernels); the kernels then upcast to float32 there, as they do
for every narrow float, because the interpreter's narrow-float arithmetic is not trustworthy
(bf16 is wrong). So on CPU the FP8 tests check the loads, the layout, the block-scale indexing
and the masking; the `gpu` tests check the real FP8 tensor-core dot.
"""

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton", reason="Triton is not installed on this platform (Linux x86-64 only)")

from deepseek_mini import backend, quant
from deepseek_mini.kernels import quant_matmul as qm
from deepseek_mini.kernels._checks import poison_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _assert_close(actual, expected, rel, name="output"):
    expected = expected.float()
    scale = expected.abs().max().clamp_min(1e-6)
    assert torch.isfinite(actual).all(), f"{name}: non-finite values (an unwritten, poisoned element?)"
    err = (actual.float() - expected).abs().max()
    assert err <= rel * scale, f"{name}: max error {err:.3g} > {rel:g} x max |ref| {scale:.3g}"


def _reference(x, w_dequant, bias):
    """What QuantLinear computes: F.linear in float32 on x and the weight rounded to x's dtype."""
    return F.linear(x.float(), w_dequant.float(), None if bias is None else bias.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("per_channel, symmetric", [(True, True), (True, False), (False, True), (False, False)])
def test_int8_matmul_matches_dequantized_reference(per_channel, symmetric, dtype):
    w = torch.randn(70, 96, device=DEVICE)
    q, scale, zp = quant.quantize_int8(w, per_channel=per_channel, symmetric=symmetric)
    x = torch.randn(2, 5, 96, device=DEVICE).to(dtype)
    bias = torch.randn(70, device=DEVICE).to(dtype)
    with poison_empty():
        y = qm.int8_matmul(x, q, scale, zp, bias=bias)
    assert y.shape == (2, 5, 70) and y.dtype == dtype
    _assert_close(y, _reference(x, quant.dequantize_int8(q, scale, zp, dtype), bias), REL_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("k, group_size", [(96, 32), (96, 48), (64, 16), (200, 100)])
def test_int4_matmul_matches_dequantized_reference(k, group_size, dtype):
    # group sizes that are and are not multiples of the kernel's K tile (two scale paths)
    w = torch.randn(45, k, device=DEVICE)
    packed, scales = quant.quantize_int4(w, group_size)
    x = torch.randn(3, k, device=DEVICE).to(dtype)
    with poison_empty():
        y = qm.int4_matmul(x, packed, scales, group_size)
    _assert_close(y, _reference(x, quant.dequantize_int4(packed, scales, group_size, dtype), None), REL_TOL[dtype])


def test_int4_nibble_order_and_sign():
    # one row with every code -8..7 at known columns: the kernel must read the low nibble as
    # the even column and treat 8..15 as negative, exactly like quant.unpack_int4
    codes = torch.arange(-8, 8, dtype=torch.int8).repeat(2).reshape(1, 32)
    packed = quant.pack_int4(codes).to(DEVICE)
    scales = torch.ones(1, 1, device=DEVICE)
    x = torch.eye(32, device=DEVICE)  # row j of x picks column j of the weight
    y = qm.int4_matmul(x, packed, scales, 32)
    assert y[:, 0].tolist() == codes[0].float().tolist()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n, k, block", [(70, 96, 32), (150, 130, 128), (40, 60, 24)])
def test_fp8_weight_matmul_matches_dequantized_reference(n, k, block, dtype):
    w = torch.randn(n, k, device=DEVICE)
    w_fp8, scale_inv = quant.quantize_fp8_block(w, block)
    x = torch.randn(4, k, device=DEVICE).to(dtype)
    with poison_empty():
        y = qm.fp8_weight_matmul(x, w_fp8, scale_inv, block)
    _assert_close(y, _reference(x, quant.dequantize_fp8_block(w_fp8, scale_inv, block, dtype), None), REL_TOL[dtype])


@pytest.mark.parametrize("m, n, k, block", [(5, 70, 96, 32), (17, 150, 130, 128), (1, 64, 256, 128)])
def test_fp8_block_gemm_matches_dequantized_operands(m, n, k, block):
    # DeepSeek-V3 layout: activations scaled per 1 x block tile, weights per block x block
    x = torch.randn(m, k, device=DEVICE) * torch.logspace(-2, 1, k, device=DEVICE)  # tiles with different scales
    w = torch.randn(n, k, device=DEVICE)
    x_fp8, x_scale = quant.quantize_fp8_activation(x, block)
    w_fp8, w_scale_inv = quant.quantize_fp8_block(w, block)
    with poison_empty():
        y = qm.fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv, block, out_dtype=torch.float32)
    expected = quant.dequantize_fp8_activation(x_fp8, x_scale, block) @ quant.dequantize_fp8_block(w_fp8, w_scale_inv, block).T
    _assert_close(y, expected, 1e-5)
    # and the whole FP8 pipeline stays close to the float matmul it replaces
    _assert_close(qm.fp8_block_linear(x, w_fp8, w_scale_inv, block), x @ quant.dequantize_fp8_block(w_fp8, w_scale_inv, block).T, 0.1)


@pytest.mark.parametrize("m", [1, 16, 17])  # the split-K GEMV up to 16 rows, GEMM tiles above
@pytest.mark.parametrize("scheme", ["int8-asym", "int4", "fp8"])
def test_weight_only_gemv_splits_k_and_adds_the_bias_once(m, scheme):
    # K = 200 cuts into several splits of the interpreter's 32-wide K tiles, the last one ragged
    n, k = 37, 200
    w = torch.randn(n, k, device=DEVICE)
    x = torch.randn(m, k, device=DEVICE)
    bias = torch.randn(n, device=DEVICE)
    if scheme == "int8-asym":
        q, scale, zp = quant.quantize_int8(w, per_channel=True, symmetric=False)
        run, w_ref = (lambda: qm.int8_matmul(x, q, scale, zp, bias=bias)), quant.dequantize_int8(q, scale, zp)
    elif scheme == "int4":
        packed, scales = quant.quantize_int4(w, 40)
        run, w_ref = (lambda: qm.int4_matmul(x, packed, scales, 40, bias=bias)), quant.dequantize_int4(packed, scales, 40)
    else:
        w_fp8, s = quant.quantize_fp8_block(w, 64)
        run, w_ref = (lambda: qm.fp8_weight_matmul(x, w_fp8, s, 64, bias=bias)), quant.dequantize_fp8_block(w_fp8, s, 64)
    if m <= qm.GEMV_MAX_M:
        assert qm._gemv_launch(n, k, scheme == "int4", 40, None)[3] > 1, "the test must cover several splits"
    with poison_empty():
        y = run()
    _assert_close(y, _reference(x, w_ref, bias), 1e-5)


def test_weight_only_matmul_backward_gives_input_and_bias_grads():
    w = torch.randn(40, 64, device=DEVICE)
    q, scale, _ = quant.quantize_int8(w)
    x = torch.randn(6, 64, device=DEVICE, requires_grad=True)
    bias = torch.randn(40, device=DEVICE, requires_grad=True)
    dy = torch.randn(6, 40, device=DEVICE)
    qm.int8_matmul(x, q, scale, bias=bias).backward(dy)
    x_ref, b_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    F.linear(x_ref, quant.dequantize_int8(q, scale), b_ref).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad)
    torch.testing.assert_close(bias.grad, b_ref.grad)


@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int4", "fp8"])
def test_quant_linear_dispatches_to_the_kernel_when_triton_is_forced(scheme):
    linear = torch.nn.Linear(96, 72).to(DEVICE)
    layer = quant.QuantLinear.from_linear(linear, scheme, group_size=32, block_size=32)
    x = torch.randn(3, 96, device=DEVICE)
    expected = layer(x)
    with backend.forced("triton"), poison_empty():
        y = layer(x)
    _assert_close(y, expected, 1e-5)


def test_weight_only_matmul_under_autocast_matches_quant_linear():
    layer = quant.QuantLinear.from_linear(torch.nn.Linear(64, 40).to(DEVICE), "int8")
    x = torch.randn(5, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.float16):
        expected = layer(x)  # the reference: F.linear under autocast
        y = qm.int8_matmul(x, layer.weight, layer.weight_scale, bias=layer.bias)
    assert y.dtype == expected.dtype == torch.float16
    _assert_close(y, expected, REL_TOL[torch.float16])


def test_quant_matmul_rejects_bad_input_with_clear_errors():
    q, scale, _ = quant.quantize_int8(torch.randn(8, 32))
    with pytest.raises(ValueError, match=r"x has shape \(4, 16\), expected \(\.\.\., 32\)"):
        qm.int8_matmul(torch.randn(4, 16), q, scale)
    with pytest.raises(ValueError, match="scale must have shape"):
        qm.int8_matmul(torch.randn(4, 32), q, scale[:4])
    with pytest.raises(TypeError, match="q has dtype float32"):
        qm.int8_matmul(torch.randn(4, 32), q.float(), scale)
    packed, scales = quant.quantize_int4(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match=r"scales has shape \(8, 2\), expected \(8, 4\)"):
        qm.int4_matmul(torch.randn(2, 64), packed, scales, 16)
    w_fp8, s = quant.quantize_fp8_block(torch.randn(8, 64), 32)
    with pytest.raises(ValueError, match=r"scale_inv has shape \(1, 2\), expected \(1, 3\)"):
        qm.fp8_weight_matmul(torch.randn(2, 64), w_fp8, s, 24)
    x_fp8, xs = quant.quantize_fp8_activation(torch.randn(2, 64), 32)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        qm.fp8_block_gemm(x_fp8, xs, w_fp8, s, 24)
    with pytest.raises(ValueError, match="x_scale has shape"):
        qm.fp8_block_gemm(x_fp8, xs[:, :1], w_fp8, s, 32)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_weight_only_kernels_bf16_at_model_size(m):
    w = torch.randn(4096, 4096, device="cuda") * 0.02
    x = torch.randn(m, 4096, device="cuda", dtype=torch.bfloat16)
    q, scale, _ = quant.quantize_int8(w)
    _assert_close(qm.int8_matmul(x, q, scale), _reference(x, quant.dequantize_int8(q, scale, None, torch.bfloat16), None), 1e-2)
    packed, scales = quant.quantize_int4(w, 128)
    _assert_close(qm.int4_matmul(x, packed, scales, 128),
                  _reference(x, quant.dequantize_int4(packed, scales, 128, torch.bfloat16), None), 1e-2)
    w_fp8, s = quant.quantize_fp8_block(w)
    _assert_close(qm.fp8_weight_matmul(x, w_fp8, s), _reference(x, quant.dequantize_fp8_block(w_fp8, s, 128, torch.bfloat16), None), 1e-2)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [16, 1000])
def test_fp8_block_gemm_tensor_cores_at_model_size(m):
    x = torch.randn(m, 7168, device="cuda")
    w = torch.randn(2112, 7168, device="cuda") * 0.02  # DeepSeek-V3's fused q_a/kv_a projection
    x_fp8, x_scale = quant.quantize_fp8_activation(x)
    w_fp8, w_scale_inv = quant.quantize_fp8_block(w)
    y = qm.fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv, out_dtype=torch.float32)
    expected = quant.dequantize_fp8_activation(x_fp8, x_scale) @ quant.dequantize_fp8_block(w_fp8, w_scale_inv).T
    _assert_close(y, expected, 1e-3)
