"""Fused RMSNorm, forward and backward, in Triton.

Reference: `deepseek_mini.layers.rms_norm` (y = x / sqrt(mean(x^2) + eps) * weight, computed in
float32 and cast back before the weight multiply). Eager PyTorch reads x several times (square,
mean, rsqrt, multiply, cast, weight); here each program owns one row, reads it once, keeps it in
registers and writes y plus one float32 `rstd` per row for the backward.

Backward, with x_hat = x * rstd and g = dy * weight:
    dx = rstd * (g - x_hat * mean(g * x_hat))
    dweight = sum over rows of dy * x_hat
dweight is a reduction over all rows, so a fixed number of programs each sum a slice of rows
into their own partial row, and PyTorch adds the few partials (no atomics, deterministic). Each
program walks its rows a [BLOCK_R, BLOCK] tile at a time, so short rows still make big loads.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.kernels._checks import check_same_device, check_tensor, float_tensors
from deepseek_mini.kernels.launch import sm_count

OP = "rmsnorm"


@triton.jit
def _rmsnorm_fwd_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)
    # round x_hat to the input dtype before the weight multiply, exactly like the reference
    x_hat = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
    tl.store(y_ptr + row * n_cols + cols, (x_hat * w).to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(rstd_ptr + row, rstd)


@triton.jit
def _rmsnorm_bwd_kernel(dy_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr,
                        n_rows, n_cols, rows_per_program, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr):
    """Program `pid` owns rows [pid * rows_per_program, ...) and walks them BLOCK_R rows at a time
    (a [BLOCK_R, BLOCK] tile per step, so short rows still move many bytes per load); it writes
    dx for its rows and one float32 partial dweight row, the sum of dy * x_hat over its rows."""
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    col_ok = cols < n_cols
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, n_rows)
    for r0 in range(first, last, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        row_ok = rows < last
        offs = rows[:, None].to(tl.int64) * n_cols + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)[:, None]
        x_hat = x * rstd
        g = dy * w[None, :]
        dx = rstd * (g - x_hat * (tl.sum(g * x_hat, axis=1) / n_cols)[:, None])
        tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw += dy * x_hat
    tl.store(dw_partial_ptr + pid.to(tl.int64) * n_cols + cols, tl.sum(dw, axis=0), mask=col_ok)


def _launch_config(n_cols):
    block = triton.next_power_of_2(n_cols)
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, num_warps


def _backward_launch(n_rows, block, sms):
    """(BLOCK_R, num_warps, programs) of the backward, from what compiles on sm_90 without
    spilling (tests/test_kernels_sm90.py; the first record's one-row-at-a-time loop reached 9-11%
    of HBM bandwidth). Rows from 2k wide: [BLOCK_R, BLOCK] tiles of 8k elements, 32 warps, ~64
    registers a thread, one program filling an SM's warp slots. Shorter rows: tiles of 4k
    elements, 8 warps, two programs an SM (16 rows of 512 at 32 warps spilled). Either way about
    32 KB of loads in flight per SM. 2 programs per SM keep the dweight partials (programs x
    n_cols float32, summed by PyTorch after) to a few percent of the bytes the kernel moves.
    `sms`: the GPU's SM count, None in the interpreter."""
    if block >= 2048:
        block_r, num_warps = max(1, 8192 // block), 32
    else:
        block_r, num_warps = 4096 // block, 8
    if sms:
        n_programs = 2 * sms
    else:
        n_programs, block_r, num_warps = 4, min(block_r, 2), 4  # the interpreter: small, but 2-row tiles
    return block_r, num_warps, max(1, min(n_programs, triton.cdiv(n_rows, block_r)))


def _check(x, weight):
    check_tensor(OP, "x", x)
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"{OP}: x must have a non-empty last dimension to normalise, got shape {tuple(x.shape)}")
    check_tensor(OP, "weight", weight, shape=(x.shape[-1],))
    check_same_device(OP, x=x, weight=weight)


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6):
    """Launch the forward kernel. x [..., D] contiguous, weight [D]. Returns (y, rstd) with y
    in the dtype the reference gives (promote(x, weight)) and rstd float32 [rows]."""
    _check(x, weight)
    n_cols = x.shape[-1]
    x2 = x.reshape(-1, n_cols)
    y = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rstd = torch.empty(x2.shape[0], dtype=torch.float32, device=x.device)
    block, num_warps = _launch_config(n_cols)
    if x2.shape[0] > 0:
        _rmsnorm_fwd_kernel[(x2.shape[0],)](x2, weight, y, rstd, n_cols, eps, BLOCK=block, num_warps=num_warps)
    return y, rstd


def rmsnorm_backward(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, rstd: torch.Tensor):
    """Launch the backward kernel. Returns (dx like x, dweight like weight)."""
    _check(x, weight)
    check_tensor(OP, "dy", dy, shape=tuple(x.shape))
    n_cols = x.shape[-1]
    n_rows = x.numel() // n_cols if n_cols else 0
    check_tensor(OP, "rstd", rstd, shape=(n_rows,), dtypes=(torch.float32,))
    block, _ = _launch_config(n_cols)
    block_r, num_warps, n_programs = _backward_launch(n_rows, block, sm_count(x.device))
    rows_per_program = triton.cdiv(triton.cdiv(n_rows, n_programs), block_r) * block_r
    n_programs = triton.cdiv(n_rows, rows_per_program) if n_rows else 1
    dx = torch.empty_like(x)
    dw_partial = torch.empty(n_programs, n_cols, dtype=torch.float32, device=x.device)
    if n_rows > 0:
        _rmsnorm_bwd_kernel[(n_programs,)](dy, x, weight, rstd, dx, dw_partial, n_rows, n_cols,
                                           rows_per_program, BLOCK_R=block_r, BLOCK=block, num_warps=num_warps)
        dw = dw_partial.sum(0).to(weight.dtype)
    else:
        dw = torch.zeros_like(weight)
    return dx, dw


class RMSNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx, dw = rmsnorm_backward(dy.to(x.dtype).contiguous(), x, weight, rstd)
        return dx, dw, None


def supports(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32 ones."""
    return float_tensors(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Fused, differentiable RMSNorm over the last dimension; same contract as
    `deepseek_mini.layers.rms_norm`. A strided x is copied to contiguous first."""
    check_tensor(OP, "x", x, contiguous=False)
    return RMSNormFunction.apply(x.contiguous(), weight, eps)
