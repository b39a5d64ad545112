"""Fused SwiGLU, forward and backward, in Triton.

Reference: `deepseek_mini.layers.swiglu` (silu(gate) * up). Eager PyTorch writes silu(gate) to
memory and reads it back for the multiply; the fused kernel reads gate and up once and writes
the product once (3 tensors of traffic instead of 5). The backward recomputes sigmoid(gate)
instead of saving silu(gate), so only the two inputs are kept for it:
    s = sigmoid(g), silu(g) = g * s, d silu/dg = s * (1 + g * (1 - s))
    d_gate = dy * up * s * (1 + g * (1 - s)),   d_up = dy * silu(g)
The op is elementwise, so tensors of any shape are treated as one flat vector.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor, float_tensors

OP = "swiglu"
BLOCK = 1024


@triton.jit
def _swiglu_fwd_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(dy_ptr, gate_ptr, up_ptr, dgate_ptr, dup_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    s = tl.sigmoid(g)
    silu = g * s
    tl.store(dgate_ptr + offs, (dy * u * s * (1.0 + g * (1.0 - s))).to(dgate_ptr.dtype.element_ty), mask=mask)
    tl.store(dup_ptr + offs, (dy * silu).to(dup_ptr.dtype.element_ty), mask=mask)


def _check(gate, up):
    check_tensor(OP, "gate", gate)
    check_tensor(OP, "up", up, shape=tuple(gate.shape))
    check_same_dtype(OP, gate=gate, up=up)
    check_same_device(OP, gate=gate, up=up)


def swiglu_forward(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Launch the forward kernel: silu(gate) * up. Both contiguous, same shape and dtype."""
    _check(gate, up)
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        _swiglu_fwd_kernel[(triton.cdiv(n, BLOCK),)](gate, up, out, n, BLOCK=BLOCK, num_warps=4)
    return out


def swiglu_backward(dy: torch.Tensor, gate: torch.Tensor, up: torch.Tensor):
    """Launch the backward kernel. Returns (d_gate, d_up)."""
    _check(gate, up)
    check_tensor(OP, "dy", dy, shape=tuple(gate.shape))
    dgate, dup = torch.empty_like(gate), torch.empty_like(up)
    n = gate.numel()
    if n:
        _swiglu_bwd_kernel[(triton.cdiv(n, BLOCK),)](dy, gate, up, dgate, dup, n, BLOCK=BLOCK, num_warps=4)
    return dgate, dup


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate, up):
        ctx.save_for_backward(gate, up)
        return swiglu_forward(gate, up)

    @staticmethod
    def backward(ctx, dy):
        gate, up = ctx.saved_tensors
        return swiglu_backward(dy.to(gate.dtype).contiguous(), gate, up)


def supports(gate: torch.Tensor, up: torch.Tensor) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32, both of one dtype."""
    return float_tensors(gate, up) and gate.dtype == up.dtype


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Fused, differentiable silu(gate) * up; same contract as `deepseek_mini.layers.swiglu`.
    Strided inputs are copied to contiguous first."""
    check_tensor(OP, "gate", gate, contiguous=False)
    check_tensor(OP, "up", up, contiguous=False)
    return SwiGLUFunction.apply(gate.contiguous(), up.contiguous())
