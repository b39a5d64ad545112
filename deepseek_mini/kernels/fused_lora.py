"""Fused LoRA linear: y = x W^T + b + scaling * (x A^T) B^T with a cuBLAS base GEMM and one
Triton kernel for the whole low-rank part.

Reference: `deepseek_mini.lora.lora_linear`. peft computes base(x), then lora_B(lora_A(x)) into
a second [M, out] tensor, scales it (another pass) and adds the two (another): after the base
GEMM the [M, out] output is written, read and written again twice. Here:
1. t = x A^T ([M, r], r ~ 8-64): a thin cuBLAS matmul, rounded to x's dtype like the reference;
2. y = x W^T + b: the base GEMM, by cuBLAS (F.linear), as fast as any GEMM on the machine;
3. `lora_update_`: y += scaling * t B^T in place, one Triton kernel that reads each output tile
   once, adds the rank-r product (t and B are small and stay in cache) and writes it back.
So the low-rank part costs one read and one write of y, instead of peft's five passes. The first
GPU record had the base GEMM in Triton, fused with the update (0.42-0.78x peft): the fusion saved
those passes but the Triton GEMM lost more than that to cuBLAS.

The backward has the same shape, so it takes the same path:
    dx = dy W + scaling * (dy B) A       (cuBLAS dy W, then lora_update_ with t = dy B, R = A)
    dA = scaling * (dy B)^T x,   dB = scaling * dy^T t,   dW = dy^T x (only if W trains)
where dy B, dA and dB are thin cuBLAS matmuls.

In the Triton interpreter (CPU) loads are upcast to float32 (its bfloat16 arithmetic is wrong).
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor, float_tensors
from deepseek_mini.backend import interpreting

OP = "fused_lora"


@triton.jit
def _lora_update_kernel(out_ptr, t_ptr, r_ptr, M, N, R, scaling,
                        stride_om, stride_tm, stride_tr, stride_rr, stride_rn,
                        UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_R: tl.constexpr):
    """out[M, N] += scaling * T[M, R] @ Rm[R, N], in place; out has a unit-stride last dim, T
    and Rm are read through strides (Rm is a transposed view of a stored weight)."""
    pid_m = tl.program_id(0)  # row tiles on the first grid axis: it takes up to 2^31 - 1 programs
    pid_n = tl.program_id(1)
    # 64-bit offsets once per program, 32-bit ones inside the tile (fewer registers per element)
    first_row = pid_m.to(tl.int64) * BLOCK_M
    out_ptr += first_row * stride_om + pid_n * BLOCK_N
    t_ptr += first_row * stride_tm
    r_ptr += pid_n.to(tl.int64) * BLOCK_N * stride_rn
    rows = tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    row_ok = rows < M - first_row
    col_ok = cols < N - pid_n * BLOCK_N
    rank_ok = ranks < R
    t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    r = tl.load(r_ptr + ranks[:, None] * stride_rr + cols[None, :] * stride_rn,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
        r = r.to(tl.float32)
    mask = row_ok[:, None] & col_ok[None, :]
    out_tile = out_ptr + rows[:, None] * stride_om + cols[None, :]
    y = tl.load(out_tile, mask=mask, other=0.0).to(tl.float32) + scaling * tl.dot(t, r)
    tl.store(out_tile, y.to(out_ptr.dtype.element_ty), mask=mask)


def update_tiles(interpreter: bool):
    """(BLOCK_M, BLOCK_N, num_warps) of lora_update_: tiles that compile for sm_90 without
    spilling (tests/test_kernels_sm90.py); small ones in the interpreter."""
    return (16, 32, 4) if interpreter else (32, 128, 4)


def lora_update_(out, t, r, scaling):
    """out += scaling * t @ r in place and return out: out [M, N] (unit-stride rows), t [M, rank],
    r [rank, N] (any strides: transposed views of the stored weights)."""
    check_tensor(OP, "out", out, ndim=2, contiguous="last")
    m, n = out.shape
    check_tensor(OP, "t", t, ndim=2, contiguous=False)
    rank = t.shape[1]
    check_tensor(OP, "t", t, shape=(m, rank), contiguous=False)
    check_tensor(OP, "r", r, shape=(rank, n), contiguous=False)
    check_same_dtype(OP, out=out, t=t, r=r)
    check_same_device(OP, out=out, t=t, r=r)
    block_m, block_n, warps = update_tiles(interpreting())
    if m and n:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _lora_update_kernel[grid](out, t, r, m, n, rank, float(scaling), out.stride(0), t.stride(0), t.stride(1),
                                  r.stride(0), r.stride(1), UPCAST=interpreting(), BLOCK_M=block_m, BLOCK_N=block_n,
                                  BLOCK_R=max(16, triton.next_power_of_2(rank)),  # tl.dot needs >= 16
                                  num_warps=warps)
    return out


class FusedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()  # the thin product [M, r], rounded to x's dtype like the reference
        y = lora_update_(F.linear(x, weight, bias), xa, lora_B.t(), scaling)
        ctx.save_for_backward(x, weight, lora_A, lora_B, xa)
        ctx.scaling = scaling
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, lora_A, lora_B, xa = ctx.saved_tensors
        need_x, need_w, need_b, need_a, need_bb, _ = ctx.needs_input_grad
        dy = dy.to(x.dtype).contiguous()
        s = ctx.scaling
        dyb = dy @ lora_B  # [M, r]
        dx = lora_update_(dy @ weight, dyb, lora_A, s) if need_x else None  # dy W + s (dy B) A
        d_a = (dyb.t() @ x) * s if need_a else None
        d_b = (dy.t() @ xa) * s if need_bb else None
        d_w = dy.t() @ x if need_w else None
        d_bias = dy.sum(0) if ctx.has_bias and need_b else None
        return dx, d_w, d_bias, d_a, d_b, None


def supports(x, weight, bias, lora_A, lora_B) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32 activations outside autocast (the
    kernel wants one dtype throughout; under autocast the reference lets torch cast)."""
    return float_tensors(x) and not torch.is_autocast_enabled(x.device.type)


def fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling):
    """Fused, differentiable LoRA linear; same contract as `deepseek_mini.lora.lora_linear`.

    x [..., in]; weight [out, in]; bias [out] or None; lora_A [r, in]; lora_B [out, r];
    scaling a Python float (alpha / r, or alpha / sqrt(r) for rsLoRA). All in one float dtype,
    except under torch.autocast, where all run in its dtype (as the reference's F.linear calls do).
    Returns x W^T + b + scaling * (x A^T) B^T, shape [..., out].
    """
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        x, weight, bias, lora_A, lora_B = (None if t is None else t.to(dtype) for t in (x, weight, bias, lora_A, lora_B))
    check_tensor(OP, "weight", weight, ndim=2, contiguous=False)
    n, k = weight.shape
    check_tensor(OP, "x", x, contiguous=False)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{OP}: x has shape {tuple(x.shape)}, expected (..., {k}) to match weight {tuple(weight.shape)}")
    check_tensor(OP, "lora_A", lora_A, ndim=2, contiguous=False)
    rank = lora_A.shape[0]
    check_tensor(OP, "lora_A", lora_A, shape=(rank, k), contiguous=False)
    check_tensor(OP, "lora_B", lora_B, shape=(n, rank), contiguous=False)
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(n,), contiguous=False)
    if isinstance(scaling, torch.Tensor) or not isinstance(scaling, (int, float)):
        raise TypeError(f"{OP}: scaling must be a Python float, got {type(scaling).__name__}")
    check_same_dtype(OP, x=x, weight=weight, bias=bias, lora_A=lora_A, lora_B=lora_B)
    x2 = x.reshape(-1, k).contiguous()
    y = FusedLoRAFunction.apply(x2, weight, bias, lora_A, lora_B, float(scaling))
    return y.reshape(*x.shape[:-1], n)
