"""RoPE Triton kernel against `deepseek_mini.rope.apply_rope`, both pair layouts.

CPU runs go through the Triton interpreter on small ragged shapes (odd seq, head_dim whose half
is not a power of two), fp32 and fp16, forward and backward, with NaN-poisoned outputs.
"""

import pytest
import torch

from deepseek_mini import backend, rope
from deepseek_mini.kernels import rope as rope_kernel
from deepseek_mini.kernels._checks import poison_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2)}


def _check(shape, dtype, interleaved, scaling=None, transposed=False, start=0):
    b, h, s, d = shape
    cos, sin = rope.precompute_rope(d, start + s, 10000.0, scaling)
    cos, sin = cos[start:].to(DEVICE), sin[start:].to(DEVICE)
    if transposed:  # the layout attention produces: [B, S, H, D] viewed as [B, H, S, D]
        x = torch.randn(b, s, h, d, device=DEVICE).to(dtype).transpose(1, 2)
    else:
        x = torch.randn(shape, device=DEVICE).to(dtype)
    dy = torch.randn(shape, device=DEVICE).to(dtype)
    x_ref = x.detach().clone().requires_grad_(True)
    with backend.forced("torch"):  # the reference, even where CUDA would pick the kernel
        y_ref = rope.apply_rope(x_ref, cos, sin, interleaved)
    y_ref.backward(dy)
    x_k = x.detach().clone().requires_grad_(True)
    with poison_empty():
        y_k = rope_kernel.apply_rope(x_k, cos, sin, interleaved)
        y_k.backward(dy)
    assert y_k.shape == y_ref.shape and y_k.dtype == dtype
    torch.testing.assert_close(y_k, y_ref, **TOL[dtype])
    torch.testing.assert_close(x_k.grad, x_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("shape", [(1, 2, 13, 12), (2, 3, 33, 32), (1, 1, 1, 2)])
def test_rope_matches_reference(shape, dtype, interleaved):
    _check(shape, dtype, interleaved)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_strided_input_and_positions_after_a_cache(interleaved):
    # x as a transposed view, cos/sin rows for positions 5.. (a decode step after a prefix)
    _check((2, 3, 7, 16), torch.float32, interleaved, transposed=True, start=5)


def test_rope_yarn_tables():
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
               "mscale": 1.0, "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}
    _check((1, 2, 40, 16), torch.float32, True, scaling=scaling)


def test_rope_layouts_differ():
    # guards against a kernel that ignores `interleaved`: the two layouts must disagree
    x = torch.randn(1, 1, 4, 8, device=DEVICE)
    cos, sin = (t.to(DEVICE) for t in rope.precompute_rope(8, 4))
    assert not torch.allclose(rope_kernel.apply_rope(x, cos, sin, True), rope_kernel.apply_rope(x, cos, sin, False))


def test_rope_dispatches_to_the_kernel_on_the_triton_backend():
    x = torch.randn(1, 2, 6, 8, requires_grad=True)
    cos, sin = rope.precompute_rope(8, 6)
    with backend.forced("triton"):
        y = rope.apply_rope(x, cos, sin, True)
    assert type(y.grad_fn).__name__ == "RoPEFunctionBackward"
    with backend.forced("torch"):
        torch.testing.assert_close(y, rope.apply_rope(x, cos, sin, True), **TOL[torch.float32])


def test_rope_rejects_bad_input():
    x = torch.randn(1, 2, 5, 8)
    cos, sin = rope.precompute_rope(8, 5)
    with pytest.raises(ValueError, match=r"cos has shape \(4, 4\), expected \(5, 4\)"):
        rope_kernel.rope_rotate(x, cos[:4], sin, True)
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        rope_kernel.rope_rotate(x[0], cos, sin, True)
    with pytest.raises(ValueError, match="head_dim .* must be even"):
        rope_kernel.rope_rotate(torch.randn(1, 2, 5, 7), cos, sin, True)
    with pytest.raises(ValueError, match="unit-stride last dimension"):
        rope_kernel.rope_rotate(torch.randn(1, 2, 8, 5).transpose(2, 3), cos, sin, True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("interleaved", [True, False])
def test_rope_gpu_model_sizes(dtype, interleaved):
    _check((4, 32, 2048, 128), dtype, interleaved)
    _check((8, 128, 1000, 64), dtype, interleaved, transposed=True, start=24)
