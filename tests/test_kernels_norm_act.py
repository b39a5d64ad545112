"""RMSNorm and SwiGLU Triton kernels against the reference in deepseek_mini.layers.

On CPU the kernels run through the Triton interpreter (tests/conftest.py switches it on), on
small ragged shapes that need masking, in fp32 and fp16, forward and backward. Output buffers
are poisoned with NaN so an element the kernel forgets to write fails the comparison.
The `gpu` tests repeat the checks at model sizes and in bf16 when CUDA is present.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_mini import backend, layers
from deepseek_mini.kernels import rmsnorm as rmsnorm_kernel
from deepseek_mini.kernels import swiglu as swiglu_kernel
from deepseek_mini.kernels._checks import poison_empty

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
REPO = Path(__file__).resolve().parents[1]


def _leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def _check_rmsnorm(shape, dtype, weight_dtype=None, eps=1e-6, device=DEVICE):
    """Kernel in `dtype` vs the reference run in fp32 on the same (rounded) inputs."""
    x = torch.randn(shape, device=device).to(dtype)
    w = (1 + 0.3 * torch.randn(shape[-1], device=device)).to(weight_dtype or dtype)
    out_dtype = torch.promote_types(dtype, w.dtype)  # what the reference returns
    dy = torch.randn(shape, device=device).to(out_dtype)
    x_ref, w_ref = _leaves(x.float(), w.float())
    with backend.forced("torch"):  # the reference, even where CUDA would pick the kernel
        y_ref = layers.rms_norm(x_ref, w_ref, eps)
    y_ref.backward(dy.float())
    x_k, w_k = _leaves(x, w)
    with poison_empty():
        y_k = rmsnorm_kernel.rms_norm(x_k, w_k, eps)
        y_k.backward(dy)
    assert y_k.dtype == out_dtype and y_k.shape == x.shape
    assert x_k.grad.dtype == dtype and w_k.grad.dtype == w.dtype
    tol = TOL[dtype]
    torch.testing.assert_close(y_k.float(), y_ref, **tol)
    torch.testing.assert_close(x_k.grad.float(), x_ref.grad, **tol)
    # dweight sums over all rows: its error grows with the row count, hence the scaled atol
    torch.testing.assert_close(w_k.grad.float(), w_ref.grad,
                               atol=tol["atol"] * max(1, x.numel() // shape[-1]) ** 0.5, rtol=tol["rtol"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 5, 37), (7, 64), (1, 1, 100), (13, 3)])
def test_rmsnorm_matches_reference(shape, dtype):
    _check_rmsnorm(shape, dtype)


def test_rmsnorm_fp16_input_fp32_weight_promotes_like_reference():
    # the reference returns weight * x_hat.to(x.dtype): an fp32 weight gives an fp32 output
    _check_rmsnorm((4, 33), torch.float16, weight_dtype=torch.float32)


def test_rmsnorm_rejects_bad_input():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"weight has shape \(7,\), expected \(8\)"):
        rmsnorm_kernel.rmsnorm_forward(x, torch.ones(7))
    with pytest.raises(TypeError, match="x has dtype int64"):
        rmsnorm_kernel.rmsnorm_forward(x.long(), torch.ones(8))
    with pytest.raises(ValueError, match="x must be contiguous"):
        rmsnorm_kernel.rmsnorm_forward(torch.randn(8, 4).t(), torch.ones(8))


def test_rmsnorm_strided_input_through_public_function():
    # a column slice (as MLA slices the latent out of kv_a_proj's output) is not contiguous
    full = torch.randn(6, 40, device=DEVICE)
    x, w = full[:, :32], torch.randn(32, device=DEVICE)
    with backend.forced("torch"):
        expected = layers.rms_norm(x, w)
    torch.testing.assert_close(rmsnorm_kernel.rms_norm(x, w), expected, **TOL[torch.float32])


def _check_swiglu(shape, dtype, device=DEVICE):
    """Kernel in `dtype` vs the reference run in fp32 on the same (rounded) inputs."""
    gate = (2 * torch.randn(shape, device=device)).to(dtype)
    up = torch.randn(shape, device=device).to(dtype)
    dy = torch.randn(shape, device=device).to(dtype)
    g_ref, u_ref = _leaves(gate.float(), up.float())
    with backend.forced("torch"):
        y_ref = layers.swiglu(g_ref, u_ref)
    y_ref.backward(dy.float())
    g_k, u_k = _leaves(gate, up)
    with poison_empty():
        y_k = swiglu_kernel.swiglu(g_k, u_k)
        y_k.backward(dy)
    assert y_k.dtype == dtype and y_k.shape == gate.shape
    torch.testing.assert_close(y_k.float(), y_ref, **TOL[dtype])
    torch.testing.assert_close(g_k.grad.float(), g_ref.grad, **TOL[dtype])
    torch.testing.assert_close(u_k.grad.float(), u_ref.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1000), (2, 7, 149), (5,)])
def test_swiglu_matches_reference(shape, dtype):
    _check_swiglu(shape, dtype)


def test_swiglu_rejects_bad_input():
    g = torch.randn(4, 8)
    with pytest.raises(ValueError, match=r"up has shape \(4, 9\), expected \(4, 8\)"):
        swiglu_kernel.swiglu_forward(g, torch.randn(4, 9))
    with pytest.raises(TypeError, match="gate is float32, up is float16"):
        swiglu_kernel.swiglu_forward(g, g.half())


def test_layers_dispatch_to_the_kernels_on_the_triton_backend():
    # the library's own functions (and so RMSNorm / MLP modules) take the fused path
    mlp, norm = layers.MLP(24, 40), layers.RMSNorm(24)
    x = torch.randn(3, 5, 24, requires_grad=True)
    with backend.forced("torch"):
        expected = mlp(norm(x))
    with backend.forced("triton"):
        h = layers.rms_norm(x, norm.weight)
        a = layers.swiglu(mlp.gate_proj(h), mlp.up_proj(h))
        out = mlp(norm(x))
    assert type(h.grad_fn).__name__ == "RMSNormFunctionBackward"
    assert type(a.grad_fn).__name__ == "SwiGLUFunctionBackward"
    torch.testing.assert_close(out, expected, **TOL[torch.float32])
    # float64 (gradcheck) stays on the reference: the kernels take fp16/bf16/fp32
    with backend.forced("triton"):
        assert "RMSNorm" not in type(layers.rms_norm(x.double(), norm.weight.double()).grad_fn).__name__


def test_benchmark_script_says_it_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this checks the message printed on a machine without CUDA")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_norms.py")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "needs CUDA" in run.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_rmsnorm_gpu_model_sizes(dtype):
    _check_rmsnorm((4, 1024, 7168), dtype)
    _check_rmsnorm((2048, 512), dtype)
    _check_rmsnorm((333, 1536), dtype, weight_dtype=torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_swiglu_gpu_model_sizes(dtype):
    _check_swiglu((4096, 18432 // 8 + 3), dtype)
