"""Fused rotary position embedding (RoPE), forward and backward, both pair layouts, in Triton.

Reference: `deepseek_mini.rope.apply_rope(x, cos, sin, interleaved)`, x [batch, heads, seq,
head_dim], cos/sin [seq, head_dim//2]. Each pair (x1, x2) turns by its angle:
    out1 = x1 * cos - x2 * sin,   out2 = x2 * cos + x1 * sin
where the pair is (x[2i], x[2i+1]) when interleaved, (x[i], x[i + d/2]) otherwise. Eager
PyTorch builds the halves, four products and a stack/cat in separate passes; here one program
loads a tile of rows of one (batch, head) once, rotates it and writes it once.

A rotation is orthogonal, so the backward is the rotation by the opposite angle: the same
kernel with sin negated. cos/sin are fixed tables and get no gradient.
x may be a strided view (e.g. [B, S, H, D].transpose(1, 2)) as long as its last dim is dense.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.kernels._checks import check_same_device, check_tensor, float_tensors

OP = "rope"


@triton.jit
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_heads, seq, half,
                 stride_xb, stride_xh, stride_xs, sin_sign,
                 INTERLEAVED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_HALF: tl.constexpr):
    n_blocks = tl.cdiv(seq, BLOCK_S)  # one flat grid: a 2-D grid caps batch * heads at 65535
    pid_s = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = pid_bh // n_heads
    h = pid_bh % n_heads
    rows = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    pairs = tl.arange(0, BLOCK_HALF)
    table = rows[:, None] * half + pairs[None, :]
    table_mask = (rows[:, None] < seq) & (pairs[None, :] < half)
    cos = tl.load(cos_ptr + table, mask=table_mask, other=0.0).to(tl.float32)
    sin = tl.load(sin_ptr + table, mask=table_mask, other=0.0).to(tl.float32) * sin_sign
    x_row = x_ptr + b.to(tl.int64) * stride_xb + h.to(tl.int64) * stride_xh + rows[:, None].to(tl.int64) * stride_xs
    # the output is contiguous [batch, heads, seq, 2 * half]
    out_row = out_ptr + (pid_bh.to(tl.int64) * seq + rows[:, None]) * (2 * half)
    if INTERLEAVED:
        # pairs are neighbours: load each row whole (wide, contiguous loads), split it into the
        # even and odd columns in registers, rotate, interleave back, store whole rows
        cols = tl.arange(0, 2 * BLOCK_HALF)
        mask = (rows[:, None] < seq) & (cols[None, :] < 2 * half)
        x = tl.load(x_row + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        x1, x2 = tl.split(tl.reshape(x, (BLOCK_S, BLOCK_HALF, 2)))
        out = tl.reshape(tl.join(x1 * cos - x2 * sin, x2 * cos + x1 * sin), (BLOCK_S, 2 * BLOCK_HALF))
        tl.store(out_row + cols[None, :], out.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        x1 = tl.load(x_row + pairs[None, :], mask=table_mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + (pairs + half)[None, :], mask=table_mask, other=0.0).to(tl.float32)
        tl.store(out_row + pairs[None, :], (x1 * cos - x2 * sin).to(out_ptr.dtype.element_ty), mask=table_mask)
        tl.store(out_row + (pairs + half)[None, :], (x2 * cos + x1 * sin).to(out_ptr.dtype.element_ty),
                 mask=table_mask)


def rows_per_program(seq, block_half):
    """~1k pairs a program: 8 per thread at 4 warps. The first record's 4k pairs took 244
    registers per thread on sm_90 (tests/test_kernels_sm90.py), two programs per SM, too few
    warps to keep the loads streaming; 1k take 72."""
    return max(1, min(triton.next_power_of_2(seq), 1024 // block_half))


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool,
                inverse: bool = False) -> torch.Tensor:
    """Launch the kernel: x rotated by the angles in cos/sin (by minus them when `inverse`).
    Returns a new contiguous tensor shaped and typed like x."""
    check_tensor(OP, "x", x, ndim=4, contiguous="last")
    batch, heads, seq, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"{OP}: head_dim (last dim of x) must be even, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        check_tensor(OP, name, t, shape=(seq, head_dim // 2))
    check_same_device(OP, x=x, cos=cos, sin=sin)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel() == 0:
        return out
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_s = rows_per_program(seq, block_half)
    grid = (triton.cdiv(seq, block_s) * batch * heads,)
    _rope_kernel[grid](x, cos, sin, out, heads, seq, half, x.stride(0), x.stride(1), x.stride(2),
                       -1.0 if inverse else 1.0, INTERLEAVED=bool(interleaved),
                       BLOCK_S=block_s, BLOCK_HALF=block_half, num_warps=4)
    return out


class RoPEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin, interleaved):
        ctx.save_for_backward(cos, sin)
        ctx.interleaved = interleaved
        return rope_rotate(x, cos, sin, interleaved)

    @staticmethod
    def backward(ctx, grad_out):
        cos, sin = ctx.saved_tensors
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        return rope_rotate(grad_out, cos, sin, ctx.interleaved, inverse=True), None, None, None


def supports(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32 ones."""
    return float_tensors(x, cos, sin)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Fused, differentiable RoPE; same contract as `deepseek_mini.rope.apply_rope`.
    cos/sin [seq, head_dim//2] are made contiguous (they are small tables), and so is x when
    its last dimension is strided (other strides the kernel takes as they are)."""
    for name, t in (("x", x), ("cos", cos), ("sin", sin)):
        check_tensor(OP, name, t, contiguous=False)
    if x.dim() and x.stride(-1) != 1:
        x = x.contiguous()
    return RoPEFunction.apply(x, cos.contiguous(), sin.contiguous(), bool(interleaved))
