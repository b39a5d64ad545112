"""Multi-head Latent Attention decode over the absorbed latent cache, in Triton.

With the absorb trick (see `deepseek_mini.attention.MultiHeadLatentAttention`, absorb=True) a
decode step is multi-query attention in which every head shares one "key" [c_kv, k_pe] and one
"value" c_kv per cached token:
    q_latent = W_UK^T q_nope            [B, H, kv_lora_rank]   (done outside, a small matmul)
    s_t      = (q_latent . c_kv[t] + q_rope . k_pe[t]) * scale
    o_latent = softmax(s) @ c_kv         [B, H, kv_lora_rank]  (W_UV applied outside)
One new token per sequence means almost no arithmetic per cached byte: the step is bound by
reading the cache (kv_lora_rank + rope_dim values per token, e.g. 512 + 64) from memory. So the
kernel reads each cached latent once and uses it twice, for the scores and for the weighted
sum, for a whole block of heads at a time.

A single sequence has too few heads to fill a GPU, so the cache is also cut into splits
(flash-decoding): each program handles one (head block, split, sequence) and writes a partial
output with its log-sum-exp; a second small kernel merges the splits exactly:
    o = sum_i exp(lse_i - m) o_i / sum_i exp(lse_i - m),  m = max_i lse_i.
Reference: `deepseek_mini.attention.scaled_dot_product_attention` with q = [q_latent, q_rope],
k = [c_kv, k_pe] (one kv head) and v = c_kv, which is what the absorbed MLA module computes.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.backend import interpreting
from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor, float_tensors
from deepseek_mini.kernels.launch import LOG2E, sm_count

OP = "mla_decode"


@triton.jit
def _mla_decode_split_kernel(q_ptr, qr_ptr, kv_ptr, kr_ptr, lens_ptr, o_part_ptr, lse_part_ptr,
                             sqb, sqh, sqrb, sqrh, skvb, skvt, skrb, skrt,
                             H, T, C, R, chunk, n_splits, scale,
                             HAS_LENS: tl.constexpr, UPCAST: tl.constexpr,
                             BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr):
    pid_h = tl.program_id(0)  # fastest-varying: head blocks of one chunk run together and share it in L2
    split = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    heads = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c = tl.arange(0, BLOCK_C)
    offs_r = tl.arange(0, BLOCK_R)
    offs_n = tl.arange(0, BLOCK_N)
    head_ok = heads < H

    q = tl.load(q_ptr + b * sqb + heads[:, None] * sqh + offs_c[None, :],
                mask=head_ok[:, None] & (offs_c[None, :] < C), other=0.0)
    qr = tl.load(qr_ptr + b * sqrb + heads[:, None] * sqrh + offs_r[None, :],
                 mask=head_ok[:, None] & (offs_r[None, :] < R), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        qr = qr.to(tl.float32)
    length = T
    if HAS_LENS:
        length = tl.load(lens_ptr + b).to(tl.int32)
    start = split * chunk
    end = tl.minimum(start + chunk, length)
    qk_scale = scale * LOG2E

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_C], dtype=tl.float32)
    for start_n in range(start, end, BLOCK_N):
        t = start_n + offs_n
        t_ok = t < end
        kv = tl.load(kv_ptr + b * skvb + t[:, None].to(tl.int64) * skvt + offs_c[None, :],
                     mask=t_ok[:, None] & (offs_c[None, :] < C), other=0.0)
        kr = tl.load(kr_ptr + b * skrb + t[:, None].to(tl.int64) * skrt + offs_r[None, :],
                     mask=t_ok[:, None] & (offs_r[None, :] < R), other=0.0)
        if UPCAST:
            kv = kv.to(tl.float32)
            kr = kr.to(tl.float32)
        s = (tl.dot(q, tl.trans(kv)) + tl.dot(qr, tl.trans(kr))) * qk_scale
        s = tl.where(t_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kv.dtype), kv)  # the same latent is the value
        m_i = m_new

    # a split past the end of a short sequence saw nothing: lse = -inf, output 0
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) / LOG2E)
    row = (b * n_splits + split) * H + heads  # o_part [B, n_splits, H, C], lse_part [B, n_splits, H]
    tl.store(o_part_ptr + row[:, None] * C + offs_c[None, :], acc / l_safe[:, None],
             mask=head_ok[:, None] & (offs_c[None, :] < C))
    tl.store(lse_part_ptr + row, lse, mask=head_ok)


@triton.jit
def _mla_decode_combine_kernel(o_part_ptr, lse_part_ptr, out_ptr, H, C, n_splits,
                               BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    h = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    splits = tl.arange(0, BLOCK_S)
    offs_c = tl.arange(0, BLOCK_C)
    split_ok = splits < n_splits
    rows = (b * n_splits + splits) * H + h
    lse = tl.load(lse_part_ptr + rows, mask=split_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.exp(lse - m)  # empty splits (lse = -inf) weigh 0; each sequence has >= 1 token
    o = tl.load(o_part_ptr + rows[:, None] * C + offs_c[None, :],
                mask=split_ok[:, None] & (offs_c[None, :] < C), other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w, 0)
    tl.store(out_ptr + (b * H + h) * C + offs_c, out.to(out_ptr.dtype.element_ty), mask=offs_c < C)


def _default_splits(batch, head_blocks, T, sms):
    """Enough programs for about 4 per SM (`sms`: the GPU's SM count, None in the interpreter),
    but no split under 256 tokens. One program per SM is resident at a time (registers and the
    double-buffered cache tiles), so several per SM also shrink the last, partly empty wave;
    the first record's 2 per SM left batch 32-64 at 21-40% of HBM bandwidth."""
    if sms is None:
        return min(3, triton.cdiv(T, 16))  # the interpreter: few, but more than one
    want = triton.cdiv(4 * sms, batch * head_blocks)
    return max(1, min(want, triton.cdiv(T, 256)))


def launch_config(H, interpreting):
    """(BLOCK_H, BLOCK_N, num_warps): heads per program, cached tokens per step, warps.
    tl.dot needs >= 16 rows; at 16 heads 8 warps keep the [16, C] accumulator and the [BLOCK_N, C]
    latent tile in registers (4 warps spilled on sm_90, tests/test_kernels_sm90.py); 32 heads x
    C=512 in float32 is the most that fits."""
    if interpreting:
        return 16, 16, 4
    return (16 if H <= 16 else 32), 32, 8


def supports(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor) -> bool:
    """Can the kernel run this decode step? fp16/bf16/fp32 inputs (one query position each; the
    kernel has no backward, so the caller uses it only without gradients)."""
    return float_tensors(q_latent, q_rope, kv_latent, k_rope)


def mla_decode(q_latent: torch.Tensor, q_rope: torch.Tensor, kv_latent: torch.Tensor, k_rope: torch.Tensor,
               *, scale: float, cache_seqlens: torch.Tensor | None = None,
               num_splits: int | None = None) -> torch.Tensor:
    """One decode step of absorbed MLA for a batch of sequences (inference only, no autograd).

    q_latent [B, H, C]: the query with W_UK absorbed (C = kv_lora_rank); q_rope [B, H, R]: the
    RoPE'd query part; kv_latent [B, T, C]: the cached normalised latents; k_rope [B, T, R]: the
    cached RoPE keys; `scale`: the softmax scale (MLA's, incl. YaRN mscale). All four share one
    dtype and device, and need a dense last dimension (other strides are free, so
    `cache[:, 0]` views of a [B, 1, T, C] cache work). `cache_seqlens` [B] int: how many of
    the T cached positions are valid per sequence (1..T; default all T). `num_splits`: how many
    pieces the cache is cut into (default: enough to fill the GPU).
    Returns o_latent [B, H, C] (apply W_UV to get the per-head values).
    """
    check_tensor(OP, "q_latent", q_latent, ndim=3, contiguous="last")
    B, H, C = q_latent.shape
    check_tensor(OP, "q_rope", q_rope, ndim=3, contiguous="last")
    R = q_rope.shape[-1]
    check_tensor(OP, "q_rope", q_rope, shape=(B, H, R), contiguous="last")
    check_tensor(OP, "kv_latent", kv_latent, ndim=3, contiguous="last")
    T = kv_latent.shape[1]
    check_tensor(OP, "kv_latent", kv_latent, shape=(B, T, C), contiguous="last")
    check_tensor(OP, "k_rope", k_rope, shape=(B, T, R), contiguous="last")
    check_same_dtype(OP, q_latent=q_latent, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope)
    device = check_same_device(OP, q_latent=q_latent, q_rope=q_rope, kv_latent=kv_latent, k_rope=k_rope)
    if T < 1:
        raise ValueError(f"{OP}: the cache is empty (kv_latent has T = 0 positions)")
    if max(C, R) > 1024:
        raise ValueError(f"{OP}: kv_lora_rank and rope dim up to 1024 are supported, got {C} and {R}")
    if cache_seqlens is not None:
        check_tensor(OP, "cache_seqlens", cache_seqlens, shape=(B,), dtypes=(torch.int32, torch.int64))
        check_same_device(OP, q_latent=q_latent, cache_seqlens=cache_seqlens)
        lo, hi = int(cache_seqlens.min()), int(cache_seqlens.max())
        if lo < 1 or hi > T:
            raise ValueError(f"{OP}: cache_seqlens must lie in [1, {T}] (the cache length), got min {lo}, max {hi}")

    block_h, block_n, num_warps = launch_config(H, interpreting())
    head_blocks = triton.cdiv(H, block_h)
    n_splits = num_splits or _default_splits(B, head_blocks, T, sm_count(device))
    if n_splits < 1:
        raise ValueError(f"{OP}: num_splits must be >= 1, got {num_splits}")
    chunk = triton.cdiv(triton.cdiv(T, n_splits), block_n) * block_n

    out = torch.empty(B, H, C, dtype=q_latent.dtype, device=device)
    o_part = torch.empty(B, n_splits, H, C, dtype=torch.float32, device=device)
    lse_part = torch.empty(B, n_splits, H, dtype=torch.float32, device=device)
    block_c = max(16, triton.next_power_of_2(C))
    lens = cache_seqlens if cache_seqlens is not None else lse_part  # unused pointer when HAS_LENS=False
    _mla_decode_split_kernel[(head_blocks, n_splits, B)](
        q_latent, q_rope, kv_latent, k_rope, lens, o_part, lse_part,
        q_latent.stride(0), q_latent.stride(1), q_rope.stride(0), q_rope.stride(1),
        kv_latent.stride(0), kv_latent.stride(1), k_rope.stride(0), k_rope.stride(1),
        H, T, C, R, chunk, n_splits, float(scale),
        HAS_LENS=cache_seqlens is not None, UPCAST=interpreting() and q_latent.dtype == torch.bfloat16,
        BLOCK_H=block_h, BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_R=max(16, triton.next_power_of_2(R)),
        num_warps=num_warps, num_stages=2)
    _mla_decode_combine_kernel[(H, B)](o_part, lse_part, out, H, C, n_splits,
                                       BLOCK_S=max(2, triton.next_power_of_2(n_splits)), BLOCK_C=block_c)
    return out
