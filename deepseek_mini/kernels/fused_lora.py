"""Fused LoRA linear in Triton: y = x W^T + b + scaling * (x A^T) B^T, the output in one pass.

Reference: `deepseek_mini.lora.lora_linear`. peft computes the same thing as three matmuls and
two elementwise passes (base(x); lora_B(lora_A(x)); * scaling; +), so the [M, out] output is
written, read and written again, twice. Here the thin product t = x A^T ([M, r], r ~ 8-64)
comes first (one small cuBLAS matmul, exactly the reference's rounding), and then one kernel
computes the base GEMM x W^T and, in its epilogue, adds scaling * t B^T for its columns and the
bias before the single store of each output tile.

Why t is not computed inside the GEMM's K loop (which would save that extra read of x): every
column tile of the output would recompute it, r / BLOCK_N more tensor-core work (12% for
r = 16, 50% for r = 64 at BLOCK_N = 128), more than one extra read of x costs.

The backward has the same shape, so the same kernel serves it with other operands:
    dx = dy W + scaling * (dy B) A          (P = dy, Q = W, T = dy B, R = A)
    dA = scaling * (dy B)^T x,   dB = scaling * dy^T t,   dW = dy^T x (only if W trains)
where dy B, dA and dB are thin cuBLAS matmuls.

On a GPU the tile sizes are autotuned; in the Triton interpreter (CPU) one small config runs
and loads are upcast to float32 (the interpreter's bfloat16 arithmetic is wrong).
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor
from deepseek_mini.backend import interpreting
from deepseek_mini.kernels.fused_moe import autotune_configs

OP = "fused_lora"


_CONFIGS = autotune_configs([({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, st) for bm, bn, bk, w, st in
                             [(128, 128, 64, 8, 3), (128, 128, 32, 4, 4), (128, 64, 64, 4, 4),
                              (64, 128, 64, 4, 4), (64, 64, 64, 4, 4), (128, 256, 64, 8, 3)]],
                            {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32})


@triton.autotune(configs=_CONFIGS, key=["M_BUCKET", "N", "K", "BLOCK_R", "HAS_BIAS"])
@triton.jit
def _lora_matmul_kernel(
    p_ptr, q_ptr, t_ptr, r_ptr, bias_ptr, out_ptr, M, N, K, R, scaling,
    M_BUCKET,  # next power of two of M: the autotuning key
    stride_pm, stride_pk, stride_qk, stride_qn, stride_tm, stride_tr, stride_rr, stride_rn,
    stride_om, stride_on,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """out = P @ Q + scaling * T @ Rm (+ bias) for P [M, K], Q [K, N], T [M, R], Rm [R, N],
    all addressed through strides (the weights are read through transposed views)."""
    # program order: GROUP_M row tiles share each column tile in turn, so the weight tile they
    # all read is still in L2 (a 1-D launch walked column by column within groups of rows)
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ranks = tl.arange(0, BLOCK_R)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    rank_ok = ranks < R
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        p = tl.load(p_ptr + rows[:, None] * stride_pm + k[None, :] * stride_pk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_ptr + k[:, None] * stride_qk + cols[None, :] * stride_qn,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            p = p.to(tl.float32)
            q = q.to(tl.float32)
        acc += tl.dot(p, q)
    # epilogue: the low-rank update and the bias join the accumulator before the one store
    t = tl.load(t_ptr + rows[:, None] * stride_tm + ranks[None, :] * stride_tr,
                mask=row_ok[:, None] & rank_ok[None, :], other=0.0)
    r = tl.load(r_ptr + ranks[:, None] * stride_rr + cols[None, :] * stride_rn,
                mask=rank_ok[:, None] & col_ok[None, :], other=0.0)
    if UPCAST:
        t = t.to(tl.float32)
        r = r.to(tl.float32)
    acc += scaling * tl.dot(t, r)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def lora_matmul(p, q, t, r, scaling, bias=None, *, out=None):
    """Launch the fused kernel on matrix views: out = p @ q + scaling * t @ r (+ bias), [M, N].

    p [M, K] and t [M, rank] contiguous; q [K, N] and r [rank, N] any strides (transposed
    views of the stored weights); bias [N] or None; out: optional preallocated [M, N] output.
    """
    check_tensor(OP, "p", p, ndim=2)
    m, k = p.shape
    check_tensor(OP, "q", q, ndim=2, contiguous=False)
    n = q.shape[1]
    check_tensor(OP, "q", q, shape=(k, n), contiguous=False)
    check_tensor(OP, "t", t, ndim=2)
    rank = t.shape[1]
    check_tensor(OP, "t", t, shape=(m, rank))
    check_tensor(OP, "r", r, shape=(rank, n), contiguous=False)
    if bias is not None:
        check_tensor(OP, "bias", bias, shape=(n,))
    check_same_dtype(OP, p=p, q=q, t=t, r=r, bias=bias)
    check_same_device(OP, p=p, q=q, t=t, r=r, bias=bias)
    if out is None:
        out = torch.empty(m, n, dtype=p.dtype, device=p.device)
    check_tensor(OP, "out", out, shape=(m, n), dtypes=(p.dtype,))
    block_r = max(16, triton.next_power_of_2(rank))  # tl.dot needs >= 16 along each dimension
    if m and n:
        def grid(meta):
            return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"]),)

        _lora_matmul_kernel[grid](
            p, q, t, r, bias if bias is not None else p, out, m, n, k, rank, float(scaling),
            triton.next_power_of_2(m),
            p.stride(0), p.stride(1), q.stride(0), q.stride(1), t.stride(0), t.stride(1),
            r.stride(0), r.stride(1), out.stride(0), out.stride(1),
            HAS_BIAS=bias is not None, UPCAST=interpreting(), BLOCK_R=block_r, GROUP_M=8)
    return out


class FusedLoRAFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, lora_A, lora_B, scaling):
        xa = x @ lora_A.t()  # the thin product [M, r], rounded to x's dtype like the reference
        y = lora_matmul(x, weight.t(), xa, lora_B.t(), scaling, bias)  # P = x, Q = W^T, T = xa, R = B^T
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
        dx = lora_matmul(dy, weight, dyb, lora_A, s) if need_x else None  # dy W + s (dy B) A
        d_a = (dyb.t() @ x) * s if need_a else None
        d_b = (dy.t() @ xa) * s if need_bb else None
        d_w = dy.t() @ x if need_w else None
        d_bias = dy.sum(0) if ctx.has_bias and need_b else None
        return dx, d_w, d_bias, d_a, d_b, None


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
