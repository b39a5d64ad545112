"""Fused MoE: every routed expert in one grouped-GEMM launch per matmul, forward and backward.

Reference: `deepseek_mini.moe.routed_experts`, a Python loop over experts (gather the expert's
tokens, SwiGLU MLP, scale by the gate weight, scatter-add). With E experts that loop launches
~6E small kernels per layer and most of them run on a handful of rows.

The fused version (the idea behind vLLM's fused_moe and MegaBlocks):
1. `moe_align` sorts the N*K (token, slot) pairs by expert and pads each expert's run to a
   multiple of BLOCK_M rows, so that every BLOCK_M-row block belongs to exactly one expert.
   Padding rows carry the index N*K (a pair that does not exist) and are masked out.
2. One launch computes gate and up for all experts (grid = blocks x output tiles; each program
   reads its block's expert id and multiplies the gathered token rows by that expert's weights)
   and writes h = silu(gate) * up.
3. One launch computes h @ down^T for all experts and multiplies each row by its gate weight
   in the epilogue; PyTorch then sums the K rows of each token.

Backward, per pair p = (token n, slot k) of expert e, with o_p = h_p @ down_e^T, y_n = sum_k w_p o_p:
    dh'_p = dy_n @ down_e            (unscaled; one grouped GEMM)
    d w_p = <dh'_p, h_p>              (= <dy_n, o_p>, so o_p never has to be stored)
    dh_p = w_p dh'_p;  dgate, dup from the SwiGLU derivative (the fused kernels in swiglu.py,
                       with h = silu(gate) * up recomputed from the saved gate and up)
    dx_n = sum_k dgate_p @ gate_e + dup_p @ up_e              (two grouped GEMMs)
    d down_e = sum_p (w_p dy_n)^T h_p,  d gate_e = sum_p dgate_p^T x_n,  d up_e = sum_p dup_p^T x_n
The weight gradients reduce over each expert's rows: a second kernel gives every program one
(expert, output tile) and loops over that expert's padded run of rows.

On a GPU the tile sizes are autotuned; in the Triton interpreter (CPU) one small config runs
and loads are upcast to float32 (the interpreter's bfloat16 arithmetic is wrong).
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.backend import interpreting
from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor, float_tensors
from deepseek_mini.kernels.launch import autotune, config
from deepseek_mini.kernels.swiglu import swiglu_backward, swiglu_forward

OP = "fused_moe"


# BLOCK_M is not tuned: it is the padding unit of moe_align, chosen from the rows per expert
_GEMM_CONFIGS = [config({"BLOCK_N": bn, "BLOCK_K": bk}, w, st) for bn, bk, w, st in
                 [(64, 64, 4, 4), (128, 64, 4, 3), (128, 64, 8, 3), (64, 128, 4, 3), (128, 128, 8, 3), (256, 64, 8, 3)]]
_WGRAD_CONFIGS = [config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_R": br}, w, st) for bm, bn, br, w, st in
                  [(64, 64, 32, 4, 3), (128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3),
                   (128, 128, 64, 8, 3)]]


# ---------------------------------------------------------------------------------------------
# Sort and pad (pure PyTorch: readable, and used as-is by notebook 12)
# ---------------------------------------------------------------------------------------------

def moe_align(topk_idx: torch.Tensor, num_experts: int, block_m: int):
    """Group the (token, slot) pairs by expert, padding each expert's run to a multiple of block_m.

    topk_idx: [N, K] integer expert ids. Pair p = n * K + k is token n's k-th choice.
    Returns (sorted_ids, block_expert, expert_offsets):
      sorted_ids     int32 [P]: pair indices, expert 0's pairs first (in token order), then
                     expert 1's, ...; each run padded with N*K up to a multiple of block_m.
      block_expert   int32 [P // block_m]: the expert of each block of block_m rows, -1 for the
                     unused blocks at the end.
      expert_offsets int32 [E + 1]: expert e's padded run is sorted_ids[offsets[e]:offsets[e+1]].
    P is the worst case N*K + E*(block_m - 1) rounded up to block_m, so no value has to be read
    back to the host (the real padded length is expert_offsets[-1]).
    """
    flat = topk_idx.reshape(-1).long()
    num_pairs, device = flat.numel(), flat.device
    # rows per expert (index_add rather than bincount: bincount reads its max back to the host)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).index_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    expert_offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    expert_offsets[1:] = torch.cumsum(padded_counts, 0)

    order = torch.argsort(flat, stable=True)  # pair indices grouped by expert, token order kept
    sorted_experts = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts  # start of each expert's run, unpadded
    rank = torch.arange(num_pairs, device=device) - first_of_expert[sorted_experts]
    capacity = triton.cdiv(num_pairs + num_experts * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((capacity,), num_pairs, dtype=torch.int32, device=device)
    sorted_ids[expert_offsets[sorted_experts] + rank] = order.to(torch.int32)

    block_starts = torch.arange(0, capacity, block_m, device=device)
    block_expert = torch.searchsorted(expert_offsets[1:], block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1)
    return sorted_ids, block_expert.to(torch.int32), expert_offsets.to(torch.int32)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------

@autotune(_GEMM_CONFIGS, {"BLOCK_N": 32, "BLOCK_K": 32}, key=["N", "K", "BLOCK_M", "A_ROW_DIV", "HAS_SCALE", "SWIGLU", "SAVE"])
@triton.jit
def _grouped_gemm_kernel(
    a_ptr, b_ptr, b2_ptr, c_ptr, c2_ptr, h_ptr, scale_ptr, sorted_ids_ptr, block_expert_ptr,
    num_pairs, N, K,
    stride_am, stride_ak, stride_be, stride_bk, stride_bn, stride_cm, stride_cn,
    A_ROW_DIV: tl.constexpr,   # a row = pair // A_ROW_DIV (top_k: gather token rows; 1: pair rows)
    HAS_SCALE: tl.constexpr,   # multiply each output row by scale[pair] (the gate weight)
    SWIGLU: tl.constexpr,      # also multiply by b2; write silu(c) * c2 to h (and c, c2 if SAVE)
    SAVE: tl.constexpr,
    UPCAST: tl.constexpr,      # interpreter: compute in float32 (its bf16 math is wrong)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C[pair] = A[pair // A_ROW_DIV] @ B[expert] for the BLOCK_M rows of one sorted block."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:  # a spare block past the last expert's run
        return
    pair = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pair < num_pairs
    a_row = (pair // A_ROW_DIV).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)

    a_ptrs = a_ptr + a_row[:, None] * stride_am + ks[None, :] * stride_ak
    b_off = expert.to(tl.int64) * stride_be + ks[:, None] * stride_bk + cols[None, :] * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = k0 + ks < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + b_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b)
        if SWIGLU:
            b2 = tl.load(b2_ptr + b_off, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                b2 = b2.to(tl.float32)
            acc2 += tl.dot(a, b2)
        a_ptrs += BLOCK_K * stride_ak
        b_off += BLOCK_K * stride_bk

    out_mask = valid[:, None] & col_ok[None, :]
    c_off = pair.to(tl.int64)[:, None] * stride_cm + cols[None, :] * stride_cn
    if SWIGLU:
        gate = acc.to(c_ptr.dtype.element_ty).to(tl.float32)  # round like the reference does
        up = acc2.to(c_ptr.dtype.element_ty).to(tl.float32)
        h = gate * tl.sigmoid(gate) * up
        tl.store(h_ptr + c_off, h.to(h_ptr.dtype.element_ty), mask=out_mask)
        if SAVE:
            tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)
            tl.store(c2_ptr + c_off, acc2.to(c2_ptr.dtype.element_ty), mask=out_mask)
    else:
        if HAS_SCALE:
            acc = acc * tl.load(scale_ptr + pair, mask=valid, other=0.0).to(tl.float32)[:, None]
        tl.store(c_ptr + c_off, acc.to(c_ptr.dtype.element_ty), mask=out_mask)


@autotune(_WGRAD_CONFIGS, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_R": 16}, key=["M", "N", "X_ROW_DIV", "Y_ROW_DIV", "HAS_SCALE"])
@triton.jit
def _grouped_weight_grad_kernel(
    x_ptr, y_ptr, out_ptr, scale_ptr, sorted_ids_ptr, expert_offsets_ptr,
    num_pairs, M, N,
    stride_xr, stride_xm, stride_yr, stride_yn, stride_oe, stride_om, stride_on,
    X_ROW_DIV: tl.constexpr, Y_ROW_DIV: tl.constexpr, HAS_SCALE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """out[e] = sum over expert e's pairs p of (scale[p] X[p // X_ROW_DIV])^T Y[p // Y_ROW_DIV]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    expert = tl.program_id(2)
    start = tl.load(expert_offsets_ptr + expert)
    end = tl.load(expert_offsets_ptr + expert + 1)
    ms = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = ms < M
    n_ok = ns < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        pair = tl.load(sorted_ids_ptr + rows, mask=rows < end, other=num_pairs)
        valid = pair < num_pairs
        x_row = (pair // X_ROW_DIV).to(tl.int64)
        y_row = (pair // Y_ROW_DIV).to(tl.int64)
        # X^T tile [BLOCK_M, BLOCK_R]: read X's rows as columns
        xt = tl.load(x_ptr + x_row[None, :] * stride_xr + ms[:, None] * stride_xm,
                     mask=valid[None, :] & m_ok[:, None], other=0.0)
        y = tl.load(y_ptr + y_row[:, None] * stride_yr + ns[None, :] * stride_yn,
                    mask=valid[:, None] & n_ok[None, :], other=0.0)
        if UPCAST:
            y = y.to(tl.float32)
        if HAS_SCALE:
            s = tl.load(scale_ptr + pair, mask=valid, other=0.0).to(tl.float32)
            xt = (xt.to(tl.float32) * s[None, :]).to(y.dtype)
        elif UPCAST:
            xt = xt.to(tl.float32)
        acc += tl.dot(xt, y)
    out_off = expert.to(tl.int64) * stride_oe + ms[:, None] * stride_om + ns[None, :] * stride_on
    tl.store(out_ptr + out_off, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _block_m(num_pairs: int, num_experts: int) -> int:
    """Rows per block: small when each expert gets few rows (less padding), else 64."""
    if interpreting():
        return 16
    per_expert = num_pairs / max(num_experts, 1)
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def grouped_gemm(a, weight, align, *, transpose_weight=True, a_row_div=1, scale=None,
                 out=None, out_dtype=None):
    """One launch for all experts: out[p] = a[p // a_row_div] @ W[e(p)]^T (or @ W[e(p)]).

    a: [R, K]; weight: stacked [E, N, K] (transpose_weight=True, y = x W^T like nn.Linear) or
    [E, K, N] (transpose_weight=False); align: the tuple from `moe_align`; scale: optional [P]
    multiplied into each output row; out: optional [P, N] buffer (rows of padding pairs are
    never touched), P = number of pairs. Returns out.
    """
    sorted_ids, block_expert, _ = align
    check_tensor(OP, "a", a, ndim=2)
    check_tensor(OP, "weight", weight, ndim=3, contiguous=False)
    check_same_dtype(OP, a=a, weight=weight)
    k = a.shape[1]
    num_experts, n, k_w = weight.shape if transpose_weight else (weight.shape[0], weight.shape[2], weight.shape[1])
    if k_w != k:
        raise ValueError(f"{OP}: weight {tuple(weight.shape)} does not match a's inner size {k} "
                         f"(transpose_weight={transpose_weight})")
    num_pairs = a.shape[0] * a_row_div
    if out is None:
        out = torch.empty(num_pairs, n, dtype=out_dtype or a.dtype, device=a.device)
    check_tensor(OP, "out", out, shape=(num_pairs, n), dtypes=None)
    if scale is not None:
        check_tensor(OP, "scale", scale, shape=(num_pairs,), dtypes=None)
    check_same_device(OP, a=a, weight=weight, out=out, sorted_ids=sorted_ids)
    stride_bk, stride_bn = (weight.stride(2), weight.stride(1)) if transpose_weight else (weight.stride(1), weight.stride(2))
    block_m = sorted_ids.numel() // block_expert.numel()
    _grouped_gemm_kernel[_grid(block_expert.numel(), n)](
        a, weight, weight, out, out, out, scale if scale is not None else out, sorted_ids, block_expert,
        num_pairs, n, k, a.stride(0), a.stride(1), weight.stride(0), stride_bk, stride_bn,
        out.stride(0), out.stride(1),
        A_ROW_DIV=a_row_div, HAS_SCALE=scale is not None, SWIGLU=False, SAVE=False,
        UPCAST=interpreting(), BLOCK_M=block_m)
    return out


def _grid(num_blocks, n):
    """One program per (sorted block of BLOCK_M rows, BLOCK_N output columns)."""
    return lambda meta: (num_blocks, triton.cdiv(n, meta["BLOCK_N"]))


def gate_up_swiglu(x, gate_proj, up_proj, align, top_k, *, save=True, out=None, gate_out=None, up_out=None):
    """One launch: for every pair p, gate = x[p // top_k] @ gate_proj[e]^T, up likewise, and
    h = silu(gate) * up. Returns (h, gate, up) [P, I]; gate and up are None when save=False."""
    sorted_ids, block_expert, _ = align
    check_tensor(OP, "x", x, ndim=2)
    check_tensor(OP, "gate_proj", gate_proj, ndim=3)
    num_pairs, (num_experts, inter, dim) = x.shape[0] * top_k, gate_proj.shape
    # one set of strides addresses both weights: both contiguous with the same shape
    check_tensor(OP, "gate_proj", gate_proj, shape=(num_experts, inter, x.shape[1]))
    check_tensor(OP, "up_proj", up_proj, shape=(num_experts, inter, dim))
    check_same_dtype(OP, x=x, gate_proj=gate_proj, up_proj=up_proj)
    check_same_device(OP, x=x, gate_proj=gate_proj, up_proj=up_proj, sorted_ids=sorted_ids)
    alloc = lambda: torch.empty(num_pairs, inter, dtype=x.dtype, device=x.device)  # noqa: E731
    h = alloc() if out is None else out
    gate = (alloc() if gate_out is None else gate_out) if save else None
    up = (alloc() if up_out is None else up_out) if save else None
    for name, t in (("out", h), ("gate_out", gate), ("up_out", up)):
        if t is not None:
            check_tensor(OP, name, t, shape=(num_pairs, inter), dtypes=(x.dtype,))
    block_m = sorted_ids.numel() // block_expert.numel()
    _grouped_gemm_kernel[_grid(block_expert.numel(), inter)](
        x, gate_proj, up_proj, gate if save else h, up if save else h, h, h, sorted_ids, block_expert,
        num_pairs, inter, dim, x.stride(0), x.stride(1), gate_proj.stride(0), gate_proj.stride(2),
        gate_proj.stride(1), h.stride(0), h.stride(1),
        A_ROW_DIV=top_k, HAS_SCALE=False, SWIGLU=True, SAVE=save,
        UPCAST=interpreting(), BLOCK_M=block_m)
    return h, gate, up


def grouped_weight_grad(x, y, align, num_experts, *, x_row_div=1, y_row_div=1, scale=None, out=None):
    """out[e] = sum over expert e's pairs p of (scale[p] x[p // x_row_div])^T y[p // y_row_div],
    shape [E, M, N] for x [*, M] and y [*, N]: the gradient of every expert's weight at once."""
    sorted_ids, _, expert_offsets = align
    check_tensor(OP, "x", x, ndim=2)
    check_tensor(OP, "y", y, ndim=2)
    check_same_dtype(OP, x=x, y=y)
    m, n = x.shape[1], y.shape[1]
    num_pairs = x.shape[0] * x_row_div
    if y.shape[0] * y_row_div != num_pairs:
        raise ValueError(f"{OP}: x {tuple(x.shape)} (rows x {x_row_div}) and y {tuple(y.shape)} "
                         f"(rows x {y_row_div}) must cover the same number of pairs")
    if scale is not None:
        check_tensor(OP, "scale", scale, shape=(num_pairs,), dtypes=None)
    if out is None:
        out = torch.empty(num_experts, m, n, dtype=y.dtype, device=y.device)
    check_tensor(OP, "out", out, shape=(num_experts, m, n), dtypes=None)
    check_same_device(OP, x=x, y=y, out=out, sorted_ids=sorted_ids)

    def grid(meta):
        return triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]), num_experts

    _grouped_weight_grad_kernel[grid](
        x, y, out, scale if scale is not None else x, sorted_ids, expert_offsets, num_pairs, m, n,
        x.stride(0), x.stride(1), y.stride(0), y.stride(1), out.stride(0), out.stride(1), out.stride(2),
        X_ROW_DIV=x_row_div, Y_ROW_DIV=y_row_div, HAS_SCALE=scale is not None, UPCAST=interpreting())
    return out


# ---------------------------------------------------------------------------------------------
# Autograd
# ---------------------------------------------------------------------------------------------

def _moe_forward(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj, save):
    """The forward pass: two launches (gate/up + SwiGLU, then down with the gate weights) around
    moe_align and the K-way sum. Returns (y, (gate, up, *align)) for the backward."""
    num_tokens, top_k = topk_idx.shape
    num_experts = gate_proj.shape[0]
    align = moe_align(topk_idx, num_experts, _block_m(num_tokens * top_k, num_experts))
    h, gate, up = gate_up_swiglu(x, gate_proj, up_proj, align, top_k, save=save)
    y_pairs = grouped_gemm(h, down_proj, align, scale=topk_weight.reshape(-1))
    # torch sums half-precision values in float32 and rounds once (the reference's index_add
    # rounds after every add)
    return y_pairs.view(num_tokens, top_k, -1).sum(1), (gate, up, *align)


class FusedMoEFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, topk_idx, topk_weight, gate_proj, up_proj, down_proj):
        y, saved = _moe_forward(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj, save=True)
        ctx.save_for_backward(x, topk_weight, gate_proj, up_proj, down_proj, *saved)
        ctx.top_k = topk_idx.shape[1]
        return y

    @staticmethod
    def backward(ctx, dy):
        x, topk_weight, gate_proj, up_proj, down_proj, gate, up, *align = ctx.saved_tensors
        top_k, num_experts = ctx.top_k, gate_proj.shape[0]
        need_x, _, need_w, need_gate, need_up, need_down = ctx.needs_input_grad
        dy = dy.to(x.dtype).contiguous()
        weights = topk_weight.reshape(-1)

        h = swiglu_forward(gate, up)  # recomputed: cheaper than keeping [N*K, I] more activations
        dh_unscaled = grouped_gemm(dy, down_proj, align, transpose_weight=False, a_row_div=top_k)
        d_weight = (dh_unscaled.float() * h.float()).sum(-1).view_as(topk_weight).to(topk_weight.dtype)
        dh = (dh_unscaled.float() * weights.float()[:, None]).to(x.dtype)
        d_gate, d_up = swiglu_backward(dh, gate, up)

        dx = d_gate_proj = d_up_proj = d_down_proj = None
        if need_x:
            dx_pairs = grouped_gemm(d_gate, gate_proj, align, transpose_weight=False, out_dtype=torch.float32)
            dx_pairs += grouped_gemm(d_up, up_proj, align, transpose_weight=False, out_dtype=torch.float32)
            dx = dx_pairs.view(x.shape[0], top_k, -1).sum(1).to(x.dtype)
        if need_down:  # [E, D, I] = sum (w dy)^T h
            d_down_proj = grouped_weight_grad(dy, h, align, num_experts, x_row_div=top_k, scale=weights)
        if need_gate:  # [E, I, D] = sum d_gate^T x
            d_gate_proj = grouped_weight_grad(d_gate, x, align, num_experts, y_row_div=top_k)
        if need_up:
            d_up_proj = grouped_weight_grad(d_up, x, align, num_experts, y_row_div=top_k)
        return dx, None, d_weight if need_w else None, d_gate_proj, d_up_proj, d_down_proj


def supports(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32 activations (weights of another
    float dtype are refused by fused_moe with a clear error)."""
    return float_tensors(x)


def fused_moe(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj):
    """Routed experts, fused; same contract as `deepseek_mini.moe.routed_experts`.

    x [N, D]; topk_idx [N, K] integer expert ids in [0, E); topk_weight [N, K] (float, any
    float dtype); gate_proj, up_proj [E, I, D] and down_proj [E, D, I] stacked expert weights
    in x's dtype. Returns [N, D] = sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x[n]).
    Differentiable in x, topk_weight and the three weights.
    """
    check_tensor(OP, "x", x, ndim=2, contiguous=False)  # activations: copied if strided (weights are not)
    if torch.is_autocast_enabled(x.device.type):
        # what autocast does to the reference's F.linear calls: matmuls in the autocast dtype, the
        # result back in x's dtype like the reference's scatter-add (the casts are differentiable,
        # so float32 master weights still get their gradients)
        dtype = torch.get_autocast_dtype(x.device.type)
        with torch.autocast(x.device.type, enabled=False):
            y = fused_moe(x.to(dtype), topk_idx, topk_weight, gate_proj.to(dtype), up_proj.to(dtype),
                          down_proj.to(dtype))
        return y.to(x.dtype)
    num_tokens, dim = x.shape
    check_tensor(OP, "gate_proj", gate_proj, ndim=3)
    num_experts, inter = gate_proj.shape[:2]
    check_tensor(OP, "gate_proj", gate_proj, shape=(num_experts, inter, dim))
    check_tensor(OP, "up_proj", up_proj, shape=(num_experts, inter, dim))
    check_tensor(OP, "down_proj", down_proj, shape=(num_experts, dim, inter))
    check_tensor(OP, "topk_idx", topk_idx, ndim=2, dtypes=(torch.int64, torch.int32), contiguous=False)
    top_k = topk_idx.shape[1]
    check_tensor(OP, "topk_idx", topk_idx, shape=(num_tokens, top_k), dtypes=None, contiguous=False)
    check_tensor(OP, "topk_weight", topk_weight, shape=(num_tokens, top_k), contiguous=False)
    check_same_dtype(OP, x=x, gate_proj=gate_proj, up_proj=up_proj, down_proj=down_proj)
    check_same_device(OP, x=x, topk_idx=topk_idx, topk_weight=topk_weight, gate_proj=gate_proj,
                      up_proj=up_proj, down_proj=down_proj)
    if topk_idx.numel():  # an id out of range would read another tensor's memory: one host sync
        lo, hi = torch.stack(torch.aminmax(topk_idx)).tolist()
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"{OP}: topk_idx values must lie in [0, {num_experts}) (gate_proj has "
                             f"{num_experts} experts), got [{lo}, {hi}]")
    if top_k == 0:
        raise ValueError(f"{OP}: topk_idx must choose at least one expert per token, got shape {tuple(topk_idx.shape)}")
    if num_tokens == 0:
        return x.new_zeros(0, dim)
    x, topk_idx, topk_weight = x.contiguous(), topk_idx.contiguous(), topk_weight.contiguous()
    inputs = (x, topk_weight, gate_proj, up_proj, down_proj)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return FusedMoEFunction.apply(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj)
    # inference: nothing to save for a backward
    return _moe_forward(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj, save=False)[0]
