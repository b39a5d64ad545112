"""Quantized matmul in Triton: weight-only int8 / int4 / FP8, and the FP8 block-scaled GEMM.

Weight-only (`int8_matmul`, `int4_matmul`, `fp8_weight_matmul`): y = x @ dequant(W)^T (+ bias)
with the weight dequantized in registers, tile by tile, instead of being written out as a
float tensor first. At small batch (decoding, 1-16 rows) a linear layer is bound by reading
its weight, so reading 1 byte (int8) or half a byte (int4) per weight instead of 2 (bf16) is
where the speed comes from. The math is the reference's: `QuantLinear.forward` in
`deepseek_mini.quant` is F.linear(x, dequantize(...).to(x.dtype)), and the GEMM kernel rounds
each dequantized weight to x's dtype before the dot, too (the GEMV: see below).

Up to 16 rows the work is a GEMV: the first GPU record showed one program per output tile
leaving most SMs idle (3-23% of HBM bandwidth), so those batches take a split-K kernel instead:
programs over (column tile, slice of K), each reading its weight slab once along K and writing
a float32 partial, then one sum over the few splits. Where a K tile lies inside one
quantization group (per-channel int8, int4 groups and FP8 blocks of 128 at the GPU's tiles), it
dots x with the raw codes and scales the small result instead: the same sum up to float
rounding (each weight is not rounded to x's dtype first), and no float weight tile in registers.
Larger batches use autotuned GEMM tiles.

All three formats share one kernel: a weight code per element (int8, fp8, or a 4-bit nibble),
and a scale (and int8 zero point) looked up at [n // GROUP_N, k // GROUP_K]:
    int8 per channel   scale [N]                          GROUP_N = 1,   no k dependence
    int8 per tensor    scale []                           no n or k dependence
    int4 group-wise    scales [N, K // group_size]        GROUP_N = 1,   GROUP_K = group_size
    fp8 block          scale_inv [N / 128, K / 128]       GROUP_N = GROUP_K = 128
int4 packing follows `quant.pack_int4`: byte [n, k // 2] holds column k in its low nibble when k
is even and in its high nibble when k is odd, as 4-bit two's complement.

FP8 block-scaled GEMM (`fp8_block_gemm`): both operands in float8_e4m3fn, as in DeepSeek-V3's
FP8 inference and training: activations with one scale per 1 x 128 tile, weights with one per
128 x 128 block (`weight_scale_inv`). Each 128-wide step of K is one FP8 tensor-core dot whose
float32 result is multiplied by the row's activation scale and the column's weight scale.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.backend import interpreting
from deepseek_mini.kernels._checks import check_same_device, check_tensor, float_tensors
from deepseek_mini.kernels.launch import autotune, config, grid_2d, sm_count
from deepseek_mini.quant_formats import (FP8_DTYPE, dequantize_fp8_block, dequantize_int4, dequantize_int8,
                                         quantize_fp8_activation)

OP = "quant_matmul"

# Batches above GEMV_MAX_M rows get ordinary autotuned GEMM tiles.
_LARGE_M = [config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, w, st) for bm, bn, bk, w, st in
            [(64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 64, 64, 4, 4)]]
_FP8_GEMM = [config({"BLOCK_M": bm, "BLOCK_N": bn}, w, st) for bm, bn, w, st in
             [(16, 64, 4, 4), (16, 128, 4, 4), (32, 128, 4, 4), (64, 128, 4, 3), (128, 128, 8, 3),
              (128, 64, 4, 4), (64, 64, 4, 4)]]
GEMV_MAX_M = 16  # up to this many rows: the split-K GEMV (the weight read is the whole cost)
_WEIGHT_ONLY_KEY = ["M_BUCKET", "N", "K", "GROUP_N", "GROUP_K", "INT4", "HAS_ZP"]


@triton.jit
def _weight_only_matmul_kernel(
    x_ptr, w_ptr, scale_ptr, zp_ptr, bias_ptr, out_ptr, M, N, K,
    M_BUCKET,  # next power of two of M: the autotuning key, so each batch size is not retuned
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_om, stride_on,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    INT4: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + ks
        k_ok = k < K
        x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & col_ok[None, :]
        # the weight tile is read transposed, [BLOCK_K, BLOCK_N], so that tl.dot(x, w) = x @ W^T
        if INT4:
            byte = tl.load(w_ptr + cols[None, :] * stride_wn + (k // 2)[:, None] * stride_wk,
                           mask=w_mask, other=0).to(tl.int32)
            nibble = (byte >> ((k % 2) * 4)[:, None]) & 0xF
            w = (nibble - ((nibble >> 3) << 4)).to(tl.float32)  # 8..15 -> -8..-1
        else:
            w = tl.load(w_ptr + cols[None, :] * stride_wn + k[:, None] * stride_wk,
                        mask=w_mask, other=0.0).to(tl.float32)
        if GROUP_K % BLOCK_K == 0:  # the whole tile shares one scale per column
            s_off = (cols // GROUP_N) * stride_sn + (k0 // GROUP_K) * stride_sk
            s = tl.load(scale_ptr + s_off, mask=col_ok, other=0.0).to(tl.float32)[None, :]
            if HAS_ZP:
                w -= tl.load(zp_ptr + s_off, mask=col_ok, other=0).to(tl.float32)[None, :]
        else:
            s_off = (cols // GROUP_N)[None, :] * stride_sn + (k // GROUP_K)[:, None] * stride_sk
            s = tl.load(scale_ptr + s_off, mask=w_mask, other=0.0).to(tl.float32)
            if HAS_ZP:
                w -= tl.load(zp_ptr + s_off, mask=w_mask, other=0).to(tl.float32)
        w = (w * s).to(x_ptr.dtype.element_ty)  # round like dequantize(..., dtype=x.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, w)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


_weight_only_large_m = autotune(_LARGE_M, {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32},
                                key=_WEIGHT_ONLY_KEY)(_weight_only_matmul_kernel)


@triton.jit
def _gemv_step(acc, x, code, cols, k, k0, col_ok, k_ok, scale_ptr, zp_ptr, stride_sn, stride_sk,
               GROUP_N: tl.constexpr, GROUP_K: tl.constexpr, BLOCK_K: tl.constexpr,
               HAS_ZP: tl.constexpr, UPCAST: tl.constexpr):
    """acc [BLOCK_M, BLOCK_N] += x @ dequantize(code)^T for the K tile starting at k0: x
    [BLOCK_M, columns k] in its own dtype, code [BLOCK_N, columns k] the raw weight codes."""
    if GROUP_K % BLOCK_K == 0:
        # the tile lies in one quantization group: one scale (and zero point) per output column,
        # so the codes (exact in x's dtype: at most 8 bits) go into the dot as they are and the
        # [BLOCK_M, BLOCK_N] result is scaled; no float weight tile, fewer registers
        s_off = (cols // GROUP_N) * stride_sn + (k0 // GROUP_K) * stride_sk
        s = tl.load(scale_ptr + s_off, mask=col_ok, other=0.0).to(tl.float32)
        w = code.to(x.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        part = tl.dot(x, tl.trans(w))
        if HAS_ZP:  # sum_k x (q - zp) = sum_k x q - zp sum_k x
            zp = tl.load(zp_ptr + s_off, mask=col_ok, other=0).to(tl.float32)
            part -= tl.sum(x.to(tl.float32), axis=1)[:, None] * zp[None, :]
        acc += part * s[None, :]
    else:
        # a group boundary inside the tile: dequantize each weight, rounded to x's dtype like
        # dequantize(..., dtype=x.dtype), then one dot
        s_off = (cols // GROUP_N)[:, None] * stride_sn + (k // GROUP_K)[None, :] * stride_sk
        mask = col_ok[:, None] & k_ok[None, :]
        w = code.to(tl.float32)
        if HAS_ZP:
            w -= tl.load(zp_ptr + s_off, mask=mask, other=0).to(tl.float32)
        w = (w * tl.load(scale_ptr + s_off, mask=mask, other=0.0).to(tl.float32)).to(x.dtype)
        if UPCAST:
            x = x.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(x, tl.trans(w))
    return acc


@triton.jit
def _weight_only_gemv_kernel(
    x_ptr, w_ptr, scale_ptr, zp_ptr, bias_ptr, part_ptr, M, N, K, k_per_split,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
    GROUP_N: tl.constexpr, GROUP_K: tl.constexpr,
    INT4: tl.constexpr, HAS_ZP: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Split-K matmul for M <= BLOCK_M rows (decoding): program (column tile, split) reads the
    weight rows `cols` over its own K range once, along K (where the weight is contiguous), and
    writes a float32 partial part[split, :M, cols]; many splits keep every SM streaming even when
    the output has only a few column tiles. int4: byte j of a row holds columns 2j (low nibble)
    and 2j + 1 (high nibble); they are dotted with x's even and odd columns, so the nibbles are
    never interleaved back in registers."""
    pid_n = tl.program_id(0)
    split = tl.program_id(1)
    rows = tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if INT4:
        j = tl.arange(0, BLOCK_K // 2)
        for k0 in range(k_start, k_end, BLOCK_K):
            k_even = k0 + 2 * j
            k_ok = k_even < K  # K is even: the odd column beside a valid even one is valid too
            byte = tl.load(w_ptr + cols[:, None] * stride_wn + (k0 // 2 + j)[None, :] * stride_wk,
                           mask=col_ok[:, None] & k_ok[None, :], other=0).to(tl.int32)
            lo = byte & 0xF
            hi = (byte >> 4) & 0xF
            x_mask = row_ok[:, None] & k_ok[None, :]
            x_even = tl.load(x_ptr + rows[:, None] * stride_xm + k_even[None, :] * stride_xk, mask=x_mask, other=0.0)
            x_odd = tl.load(x_ptr + rows[:, None] * stride_xm + (k_even + 1)[None, :] * stride_xk, mask=x_mask, other=0.0)
            acc = _gemv_step(acc, x_even, lo - ((lo >> 3) << 4), cols, k_even, k0, col_ok, k_ok,  # 8..15 -> -8..-1
                             scale_ptr, zp_ptr, stride_sn, stride_sk, GROUP_N, GROUP_K, BLOCK_K, HAS_ZP, UPCAST)
            acc = _gemv_step(acc, x_odd, hi - ((hi >> 3) << 4), cols, k_even + 1, k0, col_ok, k_ok,
                             scale_ptr, zp_ptr, stride_sn, stride_sk, GROUP_N, GROUP_K, BLOCK_K, HAS_ZP, UPCAST)
    else:
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(k_start, k_end, BLOCK_K):
            k = k0 + ks
            k_ok = k < K
            code = tl.load(w_ptr + cols[:, None] * stride_wn + k[None, :] * stride_wk,
                           mask=col_ok[:, None] & k_ok[None, :], other=0.0)
            x = tl.load(x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            acc = _gemv_step(acc, x, code, cols, k, k0, col_ok, k_ok, scale_ptr, zp_ptr, stride_sn, stride_sk,
                             GROUP_N, GROUP_K, BLOCK_K, HAS_ZP, UPCAST)
    if HAS_BIAS:  # added once, by the first split
        bias = tl.load(bias_ptr + cols, mask=col_ok & (split == 0), other=0.0).to(tl.float32)
        acc += bias[None, :]
    tl.store(part_ptr + (split * M + rows)[:, None].to(tl.int64) * N + cols[None, :],
             acc.to(part_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


@autotune(_FP8_GEMM, {"BLOCK_M": 16, "BLOCK_N": 32}, key=["M_BUCKET", "N", "K", "BLOCK_K"])
@triton.jit
def _fp8_block_gemm_kernel(
    a_ptr, a_scale_ptr, b_ptr, b_scale_ptr, c_ptr, M, N, K, M_BUCKET,
    stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
    stride_asm, stride_ask, stride_bsn, stride_bsk,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """C = (A * a_scale) @ (B * b_scale)^T with BLOCK_K = the quantization block (128)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k = kb * BLOCK_K + ks
        k_ok = k < K
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptr + cols[None, :] * stride_bn + k[:, None] * stride_bk,
                    mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        a_s = tl.load(a_scale_ptr + rows * stride_asm + kb * stride_ask, mask=row_ok, other=0.0)
        b_s = tl.load(b_scale_ptr + (cols // BLOCK_K) * stride_bsn + kb * stride_bsk, mask=col_ok, other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc += tl.dot(a, b) * a_s[:, None] * b_s[None, :]
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn,
             acc.to(c_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

def _gemv_launch(n, k, int4, group_k, sms):
    """(BLOCK_N, BLOCK_K, k_per_split, splits, num_warps) for the split-K GEMV. On a GPU: enough
    (column tile, split) programs for ~4 per SM, each split at least two K tiles long; K tiles
    of 128 for int4 and FP8 (one scale per row per tile for groups/blocks of 128). The tiles are
    the largest that compile for sm_90 without spilling registers (tests/test_kernels_sm90.py
    prints registers per thread); they are not yet tuned on a GPU. `sms`: the GPU's SM count,
    None in the interpreter."""
    if sms is None:  # the interpreter: small tiles, and more than one split when K allows
        block_n, block_k, target = 16, 32, 2 * triton.cdiv(n, 16)
    else:
        block_k = 128 if int4 or group_k % 256 else 256
        block_n = 64 if block_k == 128 else 32
        target = 4 * sms
    splits = max(1, min(triton.cdiv(target, triton.cdiv(n, block_n)), triton.cdiv(k, 2 * block_k)))
    k_per_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    return block_n, block_k, k_per_split, triton.cdiv(k, k_per_split), 4 if sms is None else 8


def _weight_only(x, w, scale, zero_point, bias, *, group_n, group_k, int4, k):
    """Shared launcher: x [..., K] -> [..., N]; the split-K GEMV up to GEMV_MAX_M rows, else
    autotuned GEMM tiles."""
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m, n = x2.shape[0], w.shape[0]
    # a 0-d scale (per tensor) is read with strides 0: every (n, k) sees the same value
    stride_sn = scale.stride(0) if scale.dim() >= 1 else 0
    stride_sk = scale.stride(1) if scale.dim() == 2 else 0
    if group_k is None:  # no k dependence: a multiple of every BLOCK_K keeps the one-scale-per-tile path
        group_k = 1024
    zp = zero_point if zero_point is not None else scale
    b = bias if bias is not None else x2
    common = dict(GROUP_N=group_n, GROUP_K=group_k, INT4=int4, HAS_ZP=zero_point is not None,
                  HAS_BIAS=bias is not None, UPCAST=interpreting())
    if 0 < m <= GEMV_MAX_M:
        block_n, block_k, k_per_split, splits, warps = _gemv_launch(
            n, k, int4, group_k, sm_count(x.device))
        # one split writes the output directly; several write float32 partials that one sum adds
        part = torch.empty(splits, m, n, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
        _weight_only_gemv_kernel[(triton.cdiv(n, block_n), splits)](
            x2, w, scale, zp, b, part, m, n, k, k_per_split, x2.stride(0), x2.stride(1),
            w.stride(0), w.stride(1), stride_sn, stride_sk, **common,
            BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=3)
        out = part[0] if splits == 1 else part.sum(0).to(x.dtype)
        return out.reshape(*lead, n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m:
        _weight_only_large_m[grid_2d(m, n)](
            x2, w, scale, zp, b, out, m, n, k, triton.next_power_of_2(m),
            x2.stride(0), x2.stride(1), w.stride(0), w.stride(1),
            stride_sn, stride_sk, out.stride(0), out.stride(1), **common)
    return out.reshape(*lead, n)


def _autocast(x, bias):
    """Under torch.autocast, run in its dtype as F.linear (the reference) would."""
    if isinstance(x, torch.Tensor) and torch.is_autocast_enabled(x.device.type):
        dtype = torch.get_autocast_dtype(x.device.type)
        return x.to(dtype), None if bias is None else bias.to(dtype)
    return x, bias


def _check_x_bias(op, x, k, n, bias):
    check_tensor(op, "x", x)
    if x.dim() < 1 or x.shape[-1] != k:
        raise ValueError(f"{op}: x has shape {tuple(x.shape)}, expected (..., {k}) to match the weight's K={k}")
    if bias is not None:
        check_tensor(op, "bias", bias, shape=(n,), dtypes=(x.dtype,))


class _WeightOnlyMatmul(torch.autograd.Function):
    """Differentiable in x and bias (QLoRA trains through a frozen quantized layer): the
    backward is dx = dy @ dequant(W) with the library's own dequantize function."""

    @staticmethod
    def forward(ctx, x, bias, dequantize, launch):
        ctx.dequantize = dequantize
        ctx.has_bias = bias is not None
        return launch(x, bias)

    @staticmethod
    def backward(ctx, dy):
        w = ctx.dequantize(dy.dtype)
        dx = dy @ w
        db = dy.reshape(-1, dy.shape[-1]).sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return dx, db, None, None


def _run(x, bias, dequantize, launch):
    """Through the autograd Function only when a gradient can flow: at decode (no_grad, or
    inputs that need none) the launch is called directly, sparing the Function's overhead on
    calls that take microseconds on the GPU."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _WeightOnlyMatmul.apply(x, bias, dequantize, launch)
    return launch(x, bias)


def int8_matmul(x, q, scale, zero_point=None, bias=None):
    """y = x @ dequantize_int8(q, scale, zero_point)^T (+ bias), the int8 weight read as int8.

    x [..., K] float16/bfloat16/float32; q int8 [N, K]; scale float [N] (per channel) or []
    (per tensor); zero_point int [N]/[] like scale, or None (symmetric); bias [N] or None.
    """
    op = "int8_matmul"
    x, bias = _autocast(x, bias)
    check_tensor(op, "q", q, ndim=2, dtypes=(torch.int8,))
    n, k = q.shape
    _check_x_bias(op, x, k, n, bias)
    if scale.shape not in ((), (n,)):
        raise ValueError(f"{op}: scale must have shape () or ({n},) (one per row of q {tuple(q.shape)}), "
                         f"got {tuple(scale.shape)}")
    check_tensor(op, "scale", scale, dtypes=None)
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"{op}: zero_point must have the shape of scale {tuple(scale.shape)}, got {tuple(zero_point.shape)}")
    check_same_device(op, x=x, q=q, scale=scale, zero_point=zero_point, bias=bias)

    def launch(x_, b_):
        return _weight_only(x_, q, scale, zero_point, b_, group_n=1, group_k=None, int4=False, k=k)

    return _run(x, bias, lambda dt: dequantize_int8(q, scale, zero_point, dt), launch)


def int4_matmul(x, packed, scales, group_size=128, bias=None):
    """y = x @ dequantize_int4(packed, scales, group_size)^T (+ bias), reading half a byte per weight.

    x [..., K]; packed uint8 [N, K // 2] (`quant.pack_int4` layout); scales float [N, K // group_size].
    """
    op = "int4_matmul"
    x, bias = _autocast(x, bias)
    check_tensor(op, "packed", packed, ndim=2, dtypes=(torch.uint8,))
    n, k = packed.shape[0], packed.shape[1] * 2
    _check_x_bias(op, x, k, n, bias)
    if not isinstance(group_size, int) or group_size < 2 or k % group_size:
        raise ValueError(f"{op}: group_size must be a positive integer dividing K={k}, got {group_size!r}")
    check_tensor(op, "scales", scales, shape=(n, k // group_size), dtypes=None, contiguous=False)
    check_same_device(op, x=x, packed=packed, scales=scales, bias=bias)

    def launch(x_, b_):
        return _weight_only(x_, packed, scales, None, b_, group_n=1, group_k=group_size, int4=True, k=k)

    return _run(x, bias, lambda dt: dequantize_int4(packed, scales, group_size, dt), launch)


def fp8_weight_matmul(x, w_fp8, scale_inv, block_size=128, bias=None):
    """y = x @ dequantize_fp8_block(w_fp8, scale_inv)^T (+ bias): FP8 weights, x in its own dtype
    (what `QuantLinear(scheme="fp8")` computes). For FP8 activations too, see `fp8_block_gemm`."""
    op = "fp8_weight_matmul"
    x, bias = _autocast(x, bias)
    check_tensor(op, "w_fp8", w_fp8, ndim=2, dtypes=(FP8_DTYPE,))
    n, k = w_fp8.shape
    _check_x_bias(op, x, k, n, bias)
    # any block size works here: the scale is looked up per element, not per tile
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"{op}: block_size must be a positive integer, got {block_size!r}")
    check_tensor(op, "scale_inv", scale_inv, shape=(triton.cdiv(n, block_size), triton.cdiv(k, block_size)),
                 dtypes=(torch.float32,), contiguous=False)
    check_same_device(op, x=x, w_fp8=w_fp8, scale_inv=scale_inv, bias=bias)

    def launch(x_, b_):
        return _weight_only(x_, w_fp8, scale_inv, None, b_, group_n=block_size, group_k=block_size, int4=False, k=k)

    return _run(x, bias, lambda dt: dequantize_fp8_block(w_fp8, scale_inv, block_size, dt), launch)


def _check_fp8_scale(op, name, scale, expected, block_size):
    if not isinstance(block_size, int) or block_size < 16 or block_size & (block_size - 1):
        raise ValueError(f"{op}: block_size must be a power of two >= 16, got {block_size!r}")
    check_tensor(op, name, scale, shape=expected, dtypes=(torch.float32,), contiguous=False)


def fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv, block_size=128, out_dtype=torch.bfloat16):
    """FP8 x FP8 GEMM with DeepSeek-V3 block scales: (x_fp8 * x_scale) @ (w_fp8 * w_scale_inv)^T.

    x_fp8 float8_e4m3fn [M, K] with x_scale float32 [M, ceil(K/bs)] (`quant.quantize_fp8_activation`);
    w_fp8 float8_e4m3fn [N, K] with w_scale_inv float32 [ceil(N/bs), ceil(K/bs)]
    (`quant.quantize_fp8_block`). Returns [M, N] in out_dtype.
    """
    op = "fp8_block_gemm"
    check_tensor(op, "x_fp8", x_fp8, ndim=2, dtypes=(FP8_DTYPE,))
    check_tensor(op, "w_fp8", w_fp8, ndim=2, dtypes=(FP8_DTYPE,))
    (m, k), n = x_fp8.shape, w_fp8.shape[0]
    if w_fp8.shape[1] != k:
        raise ValueError(f"{op}: w_fp8 has shape {tuple(w_fp8.shape)}, expected ({n}, {k}) to match x_fp8's K={k}")
    kb = triton.cdiv(k, block_size) if isinstance(block_size, int) and block_size > 0 else 0
    _check_fp8_scale(op, "x_scale", x_scale, (m, kb), block_size)
    _check_fp8_scale(op, "w_scale_inv", w_scale_inv, (triton.cdiv(n, block_size), kb), block_size)
    if out_dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"{op}: out_dtype must be float16, bfloat16 or float32, got {out_dtype}")
    check_same_device(op, x_fp8=x_fp8, x_scale=x_scale, w_fp8=w_fp8, w_scale_inv=w_scale_inv)
    out = torch.empty(m, n, dtype=out_dtype, device=x_fp8.device)
    if m:
        _fp8_block_gemm_kernel[grid_2d(m, n)](
            x_fp8, x_scale, w_fp8, w_scale_inv, out, m, n, k, triton.next_power_of_2(m),
            x_fp8.stride(0), x_fp8.stride(1), w_fp8.stride(0), w_fp8.stride(1), out.stride(0), out.stride(1),
            x_scale.stride(0), x_scale.stride(1), w_scale_inv.stride(0), w_scale_inv.stride(1),
            UPCAST=interpreting(), BLOCK_K=block_size)
    return out


def fp8_block_linear(x, w_fp8, w_scale_inv, block_size=128, bias=None):
    """x [..., K] float -> FP8 activations in 1 x block_size tiles (`quant.quantize_fp8_activation`),
    then `fp8_block_gemm` against the FP8 weight; result in x's dtype (+ bias)."""

    check_tensor("fp8_block_linear", "x", x)
    x_fp8, x_scale = quantize_fp8_activation(x.reshape(-1, x.shape[-1]), block_size)
    y = fp8_block_gemm(x_fp8, x_scale, w_fp8, w_scale_inv, block_size, out_dtype=x.dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*x.shape[:-1], w_fp8.shape[0])


# ---------------------------------------------------------------------------------------------
# What ops.quant_linear calls
# ---------------------------------------------------------------------------------------------

def supports(x: torch.Tensor, *, fp8_activations: bool = False, wants_grad: bool = False) -> bool:
    """Can a kernel run a QuantLinear on this (checked) input? fp16/bf16/fp32 activations; with
    FP8 activations only without gradients (the FP8 x FP8 GEMM has no backward)."""
    return float_tensors(x) and not (fp8_activations and wants_grad)


def quant_linear(layer, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What a QuantLinear `layer` computes, by the kernel of its scheme. `layer` is read for its
    buffers (weight, scales) and settings only."""
    if layer.fp8_activations:
        return fp8_block_linear(x, layer.weight, layer.weight_scale_inv, layer.block_size, bias)
    if layer.scheme == "int4":
        return int4_matmul(x, layer.weight, layer.weight_scale, layer.group_size, bias)
    if layer.scheme == "fp8":
        return fp8_weight_matmul(x, layer.weight, layer.weight_scale_inv, layer.block_size, bias)
    return int8_matmul(x, layer.weight, layer.weight_scale, getattr(layer, "weight_zero_point", None), bias)
