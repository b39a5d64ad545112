"""Flash attention, forward and backward, in Triton: causal, sliding window, GQA/MQA.

Reference: `deepseek_mini.attention.scaled_dot_product_attention(q, k, v, causal, window,
scale)`, q [B, Hq, S, D], k [B, Hkv, T, D], v [B, Hkv, T, Dv], T >= S with the queries at the
last S positions, query head h reading key/value head h // (Hq // Hkv).

The reference materialises the [S, T] score matrix. Here (FlashAttention, Dao et al. 2022) a
program owns a block of queries and walks over blocks of keys, keeping only a running row
maximum m, a running softmax denominator l and the output accumulator (the "online softmax"):
    m_new = max(m, rowmax(s));  acc = acc * exp(m - m_new) + exp(s - m_new) @ v;  l likewise
so memory stays O(S) instead of O(S*T). Blocks entirely outside the causal/window band are
never visited. The forward saves only the log-sum-exp per query row, lse = m + log(l).

Backward (FlashAttention-2): with p = exp(s * scale - lse) recomputed from q, k and lse,
    delta = rowsum(dO * O),  dV = p^T dO,  dP = dO V^T,  dS = p * (dP - delta),
    dQ = scale * dS K,  dK = scale * dS^T Q.
Two kernels avoid atomics: one per key block accumulates dK, dV over all query blocks (and
over the Hq/Hkv query heads sharing that key head, so GQA needs no reduction afterwards); one
per query block accumulates dQ over the key blocks.

Inputs may be strided views (e.g. [B, S, H, D].transpose(1, 2)) with a dense last dimension.
On a GPU block sizes are autotuned (the kernels' `size_bucket` argument is never read inside:
it is the autotuner's key); the interpreter (CPU) uses one small configuration.
"""

import torch
import triton
import triton.language as tl

from deepseek_mini.backend import interpreting
from deepseek_mini.kernels._checks import check_same_device, check_same_dtype, check_tensor, float_tensors
from deepseek_mini.kernels.launch import LOG2E, autotune, config

OP = "flash_attention"


@triton.jit
def _band_mask(q_pos, k_pos, T, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """True where the query at absolute position q_pos may see the key at k_pos (two index
    tensors that broadcast: [M, 1] and [1, N], or [1, M] and [N, 1] for the transposed tile)."""
    mask = k_pos < T
    if CAUSAL:
        mask = mask & (k_pos <= q_pos)
    if HAS_WINDOW:
        mask = mask & (k_pos > q_pos - window)
    return mask


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqs, skb, skh, skt, svb, svh, svt,
                     n_q_heads, group, S, T, D, DV, scale, window, size_bucket,
                     CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr):
    # one flat grid (a 2-D grid caps batch * heads at 65535); the query blocks of one head are
    # neighbours, so programs running together share that head's keys and values in L2
    n_blocks = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    hk = h // group
    q_offset = T - S  # absolute position of query row 0

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=(offs_m[:, None] < S) & (offs_d[None, :] < D), other=0.0)
    if UPCAST:  # bf16 is wrong in the interpreter: compute in fp32 there
        q = q.to(tl.float32)
    if BLOCK_D2 > 0:  # the head dim's tail, e.g. MLA's 64 RoPE dims after 128 (see head_blocks)
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d2[None, :],
                     mask=(offs_m[:, None] < S) & (offs_d2[None, :] < D), other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    qk_scale = scale * LOG2E  # exp(x) = exp2(x * log2 e); exp2 is the fast path

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    # visit only key blocks that intersect the band of this query block
    first_q = pid_m * BLOCK_M + q_offset
    last_q = first_q + BLOCK_M - 1
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, last_q + 1)
    if HAS_WINDOW:
        lo = tl.maximum(0, first_q - window + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n
        k_t = tl.load(k_base + kn[None, :] * skt + offs_d[:, None],
                      mask=(kn[None, :] < T) & (offs_d[:, None] < D), other=0.0)
        v = tl.load(v_base + kn[:, None] * svt + offs_dv[None, :],
                    mask=(kn[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            k_t = k_t.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, k_t)
        if BLOCK_D2 > 0:
            k2_t = tl.load(k_base + kn[None, :] * skt + offs_d2[:, None],
                           mask=(kn[None, :] < T) & (offs_d2[:, None] < D), other=0.0)
            if UPCAST:
                k2_t = k2_t.to(tl.float32)
            s += tl.dot(q2, k2_t)
        s = s * qk_scale  # log2 units
        # masking costs time: only blocks that straddle an edge of the band need it
        straddles = start_n + BLOCK_N > T
        if CAUSAL:
            straddles = straddles | (start_n + BLOCK_N - 1 > first_q)
        if HAS_WINDOW:
            straddles = straddles | (start_n <= last_q - window)
        if straddles:
            s = tl.where(_band_mask(offs_m[:, None] + q_offset, kn[None, :], T, window, CAUSAL, HAS_WINDOW),
                         s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # a row with nothing visible yet keeps m = -inf; shift by 0 there to avoid inf - inf
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    # every real query row sees at least its own key, so l_i > 0 there; padded rows are not stored
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    o_rows = o_ptr + (pid_bh.to(tl.int64) * S + offs_m[:, None]) * DV
    tl.store(o_rows + offs_dv[None, :], out.to(o_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < S) & (offs_dv[None, :] < DV))
    lse = (m_i + tl.log2(l_safe)) / LOG2E  # natural-log log-sum-exp
    tl.store(lse_ptr + pid_bh.to(tl.int64) * S + offs_m, lse, mask=offs_m < S)


@triton.jit
def _attn_bwd_delta_kernel(o_ptr, do_ptr, delta_ptr, sdb, sdh, sds, n_q_heads, S, DV,
                           BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    """delta = rowsum(dO * O) per query row (O is contiguous, dO may be strided)."""
    n_blocks = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = tl.arange(0, BLOCK_DV)
    mask = (offs_m[:, None] < S) & (offs_dv[None, :] < DV)
    o = tl.load(o_ptr + (pid_bh.to(tl.int64) * S + offs_m[:, None]) * DV + offs_dv[None, :], mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sds + offs_dv[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + pid_bh.to(tl.int64) * S + offs_m, delta, mask=offs_m < S)


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqs, skb, skh, skt, svb, svh, svt, sdb, sdh, sds,
                          n_q_heads, n_kv_heads, group, S, T, D, DV, scale, window, size_bucket,
                          CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr):
    n_blocks = tl.cdiv(T, BLOCK_N)
    pid_n = tl.program_id(0) % n_blocks
    pid_bhk = tl.program_id(0) // n_blocks
    b = (pid_bhk // n_kv_heads).to(tl.int64)
    hk = (pid_bhk % n_kv_heads).to(tl.int64)
    q_offset = T - S

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d[None, :],
                mask=(offs_n[:, None] < T) & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + offs_n[:, None] * svt + offs_dv[None, :],
                mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk_scale = scale * LOG2E
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's tail: its own slice of k and of the dK accumulator
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        k2 = tl.load(k_ptr + b * skb + hk * skh + offs_n[:, None] * skt + offs_d2[None, :],
                     mask=(offs_n[:, None] < T) & (offs_d2[None, :] < D), other=0.0)
        if UPCAST:
            k2 = k2.to(tl.float32)
        dk2 = tl.zeros([BLOCK_N, BLOCK_D2], dtype=tl.float32)

    # query rows that can see this key block: causal -> from the block's first key on;
    # window -> up to the block's last key + window - 1 (absolute positions)
    first_k = pid_n * BLOCK_N
    lo = 0
    hi = S
    if CAUSAL:
        lo = tl.maximum(0, first_k - q_offset) // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(S, first_k + BLOCK_N - 1 + window - q_offset)
    for i in range(0, group):
        h = hk * group + i
        bh = b * n_q_heads + h
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + offs_m0
            row_ok = offs_m < S
            q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                        mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
            do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sds + offs_dv[None, :],
                         mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                do = do.to(tl.float32)
            lse = tl.load(lse_ptr + bh * S + offs_m, mask=row_ok, other=0.0)
            delta = tl.load(delta_ptr + bh * S + offs_m, mask=row_ok, other=0.0)
            # transposed scores s^T [BLOCK_N, BLOCK_M], so dV and dK come out without transposes
            s_t = tl.dot(k, tl.trans(q))
            if BLOCK_D2 > 0:
                q2 = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d2[None, :],
                             mask=row_ok[:, None] & (offs_d2[None, :] < D), other=0.0)
                if UPCAST:
                    q2 = q2.to(tl.float32)
                s_t += tl.dot(k2, tl.trans(q2))
            p_t = tl.exp2(s_t * qk_scale - lse[None, :] * LOG2E)
            # as in the forward, only tiles that straddle an edge of the band (or of the
            # sequences) pay for the mask
            straddles = (start_m + BLOCK_M > S) | (first_k + BLOCK_N > T)
            if CAUSAL:
                straddles = straddles | (start_m + q_offset < first_k + BLOCK_N - 1)
            if HAS_WINDOW:
                straddles = straddles | (start_m + BLOCK_M - 1 + q_offset - window >= first_k)
            if straddles:
                visible = _band_mask(offs_m[None, :] + q_offset, offs_n[:, None], T, window, CAUSAL, HAS_WINDOW)
                p_t = tl.where(visible & row_ok[None, :], p_t, 0.0)
            dv += tl.dot(p_t.to(do.dtype), do)
            dp_t = tl.dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += tl.dot(ds_t.to(q.dtype), q)
            if BLOCK_D2 > 0:
                dk2 += tl.dot(ds_t.to(q2.dtype), q2)

    out_rows = pid_bhk.to(tl.int64) * T + offs_n[:, None]
    tl.store(dk_ptr + out_rows * D + offs_d[None, :], (dk * scale).to(dk_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < T) & (offs_d[None, :] < D))
    tl.store(dv_ptr + out_rows * DV + offs_dv[None, :], dv.to(dv_ptr.dtype.element_ty),
             mask=(offs_n[:, None] < T) & (offs_dv[None, :] < DV))
    if BLOCK_D2 > 0:
        tl.store(dk_ptr + out_rows * D + offs_d2[None, :], (dk2 * scale).to(dk_ptr.dtype.element_ty),
                 mask=(offs_n[:, None] < T) & (offs_d2[None, :] < D))


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqs, skb, skh, skt, svb, svh, svt, sdb, sdh, sds,
                        n_q_heads, group, S, T, D, DV, scale, window, size_bucket,
                        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr):
    n_blocks = tl.cdiv(S, BLOCK_M)
    pid_m = tl.program_id(0) % n_blocks
    pid_bh = tl.program_id(0) // n_blocks
    b = (pid_bh // n_q_heads).to(tl.int64)
    h = (pid_bh % n_q_heads).to(tl.int64)
    hk = h // group
    q_offset = T - S

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < S
    q = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d[None, :],
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + offs_m[:, None] * sds + offs_dv[None, :],
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_ptr + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    delta = tl.load(delta_ptr + pid_bh.to(tl.int64) * S + offs_m, mask=row_ok, other=0.0)
    qk_scale = scale * LOG2E
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if BLOCK_D2 > 0:  # the head dim's tail: its own slice of q and of the dQ accumulator
        offs_d2 = BLOCK_D + tl.arange(0, BLOCK_D2)
        q2 = tl.load(q_ptr + b * sqb + h * sqh + offs_m[:, None] * sqs + offs_d2[None, :],
                     mask=row_ok[:, None] & (offs_d2[None, :] < D), other=0.0)
        if UPCAST:
            q2 = q2.to(tl.float32)
        dq2 = tl.zeros([BLOCK_M, BLOCK_D2], dtype=tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh

    first_q = pid_m * BLOCK_M + q_offset
    lo = 0
    hi = T
    if CAUSAL:
        hi = tl.minimum(T, first_q + BLOCK_M)
    if HAS_WINDOW:
        lo = tl.maximum(0, first_q - window + 1) // BLOCK_N * BLOCK_N
    for start_n in range(lo, hi, BLOCK_N):
        kn = start_n + offs_n0
        k = tl.load(k_base + kn[:, None] * skt + offs_d[None, :],
                    mask=(kn[:, None] < T) & (offs_d[None, :] < D), other=0.0)
        v = tl.load(v_base + kn[:, None] * svt + offs_dv[None, :],
                    mask=(kn[:, None] < T) & (offs_dv[None, :] < DV), other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k))
        if BLOCK_D2 > 0:
            k2 = tl.load(k_base + kn[:, None] * skt + offs_d2[None, :],
                         mask=(kn[:, None] < T) & (offs_d2[None, :] < D), other=0.0)
            if UPCAST:
                k2 = k2.to(tl.float32)
            s += tl.dot(q2, tl.trans(k2))
        p = tl.exp2(s * qk_scale - lse[:, None] * LOG2E)
        straddles = start_n + BLOCK_N > T
        if CAUSAL:
            straddles = straddles | (start_n + BLOCK_N - 1 > first_q)
        if HAS_WINDOW:
            straddles = straddles | (start_n <= first_q + BLOCK_M - 1 - window)
        if straddles:
            p = tl.where(_band_mask(offs_m[:, None] + q_offset, kn[None, :], T, window, CAUSAL, HAS_WINDOW), p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k)
        if BLOCK_D2 > 0:
            dq2 += tl.dot(ds.to(k2.dtype), k2)

    tl.store(dq_ptr + (pid_bh.to(tl.int64) * S + offs_m[:, None]) * D + offs_d[None, :],
             (dq * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < D))
    if BLOCK_D2 > 0:
        tl.store(dq_ptr + (pid_bh.to(tl.int64) * S + offs_m[:, None]) * D + offs_d2[None, :],
                 (dq2 * scale).to(dq_ptr.dtype.element_ty), mask=row_ok[:, None] & (offs_d2[None, :] < D))


# ----------------------------------------------------------------------------------------------
# launch configuration: one small config in the interpreter, a few autotuned ones on a GPU
# ----------------------------------------------------------------------------------------------

def head_blocks(d, dv):
    """Tile widths for head dims d (queries/keys) and dv (values): BLOCK_D, BLOCK_D2, BLOCK_DV.
    A q/k head dim of 3/4 of a power of two (MLA's 192 = 128 + 64 RoPE dims) is cut into two
    power-of-two slices, 128 + 64, instead of being padded to 256: a third less tile work and
    registers, which lets the 192/128 case use the same tiles as head dim 128. Each slice must
    be >= 16 wide (tl.dot's minimum)."""
    block_d = max(16, triton.next_power_of_2(d))
    block_d2 = 0
    if block_d >= 64 and d <= 3 * block_d // 4:
        block_d, block_d2 = block_d // 2, block_d // 4
    return {"BLOCK_D": block_d, "BLOCK_D2": block_d2, "BLOCK_DV": max(16, triton.next_power_of_2(dv))}


def _gpu_configs(blocks, kind):
    """Autotune candidates; `blocks` from head_blocks (wide heads drop the largest tiles)."""
    block_d = blocks["BLOCK_D"] + blocks["BLOCK_D2"]
    if kind == "fwd":
        # (16, 64) and (32, 64) are for decode (a handful of queries): big query blocks would idle
        shapes = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (16, 64, 4, 3), (32, 64, 4, 3)]
    else:
        # (64, 32, 8 warps): the one backward tile that compiles without spilling registers on
        # sm_90 at MLA's 192/128 head dims (tests/test_kernels_sm90.py)
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (64, 32, 8, 2)]
    shapes.append((32, 32, 4, 1))  # fits shared memory for every dtype and head size (fp32 d256)
    configs = []
    for bm, bn, warps, stages in shapes:
        if block_d >= 256 and bm * bn > 64 * 64:
            continue  # too many registers/shared memory for wide heads
        configs.append(config({"BLOCK_M": bm, "BLOCK_N": bn}, warps, stages))
    return configs


_TUNED = {}


def _launcher(kernel, kind, blocks):
    """The kernel autotuned over the candidates for these head sizes (cached; in the interpreter
    the one small config below)."""
    key = (id(kernel), tuple(sorted(blocks.items())))
    if key not in _TUNED:
        _TUNED[key] = autotune(_gpu_configs(blocks, kind), _INTERPRETER_BLOCKS,
                               key=["size_bucket", "BLOCK_D", "BLOCK_D2", "BLOCK_DV", "CAUSAL", "HAS_WINDOW"])(kernel)
    return _TUNED[key]


_INTERPRETER_BLOCKS = dict(BLOCK_M=16, BLOCK_N=16)


def _size_bucket(S, T):
    """The autotuning key for the sequence sizes: powers of two of S and T. Keying on the exact
    sizes would re-tune at every generation step (T grows by one each time)."""
    return 64 * (S - 1).bit_length() + (T - 1).bit_length()


def _launch(kernel, kind, grid_len, grid_heads, blocks, *args, **constexprs):
    _launcher(kernel, kind, blocks)[lambda meta: (grid_len(meta) * grid_heads,)](*args, **constexprs)


# ----------------------------------------------------------------------------------------------
# launchers
# ----------------------------------------------------------------------------------------------

def _check_inputs(q, k, v, causal, window):
    check_tensor(OP, "q", q, ndim=4, contiguous="last")
    check_tensor(OP, "k", k, ndim=4, contiguous="last")
    check_tensor(OP, "v", v, ndim=4, contiguous="last")
    check_same_dtype(OP, q=q, k=k, v=v)
    check_same_device(OP, q=q, k=k, v=v)
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    check_tensor(OP, "k", k, shape=(B, None, None, D), dtypes=None, contiguous=False)
    check_tensor(OP, "v", v, shape=(B, Hkv, T, None), dtypes=None, contiguous=False)
    if Hq % Hkv:
        raise ValueError(f"{OP}: query heads ({Hq}) must be a multiple of key/value heads ({Hkv})")
    if T < S:
        raise ValueError(f"{OP}: k has {T} positions, fewer than the {S} queries")
    if window is not None:
        if not causal:
            raise ValueError(f"{OP}: window needs causal=True (it looks back only)")
        if int(window) != window or window < 1:
            raise ValueError(f"{OP}: window must be a positive int, got {window!r}")
    if max(D, v.shape[-1]) > 256:
        raise ValueError(f"{OP}: head dims up to 256 are supported, got q/k {D} and v {v.shape[-1]}")


def _common(q, k, v, causal, window, scale):
    B, Hq, S, D = q.shape
    Hkv, T, DV = k.shape[1], k.shape[2], v.shape[-1]
    scale = D ** -0.5 if scale is None else float(scale)
    flags = dict(CAUSAL=bool(causal), HAS_WINDOW=window is not None,
                 UPCAST=interpreting() and q.dtype == torch.bfloat16, **head_blocks(D, DV))
    return B, Hq, Hkv, S, T, D, DV, scale, flags


def flash_attention_forward(q, k, v, causal=True, window=None, scale=None):
    """Launch the forward kernel. Returns (out [B, Hq, S, Dv] contiguous, lse [B, Hq, S] float32)."""
    _check_inputs(q, k, v, causal, window)
    B, Hq, Hkv, S, T, D, DV, scale, flags = _common(q, k, v, causal, window, scale)
    bucket = _size_bucket(S, T)
    out = torch.empty(B, Hq, S, DV, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    _launch(_attn_fwd_kernel, "fwd", lambda meta: triton.cdiv(S, meta["BLOCK_M"]), B * Hq, head_blocks(D, DV),
            q, k, v, out, lse, q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), Hq, Hq // Hkv, S, T, D, DV, scale, window or 0, bucket, **flags)
    return out, lse


def flash_attention_backward(do, q, k, v, out, lse, causal=True, window=None, scale=None):
    """Launch the backward kernels. Returns (dq, dk, dv) shaped like q, k, v (contiguous)."""
    _check_inputs(q, k, v, causal, window)
    B, Hq, Hkv, S, T, D, DV, scale, flags = _common(q, k, v, causal, window, scale)
    check_tensor(OP, "grad_out", do, shape=(B, Hq, S, DV), dtypes=(q.dtype,), contiguous="last")
    check_tensor(OP, "out", out, shape=(B, Hq, S, DV), dtypes=(q.dtype,))
    check_tensor(OP, "lse", lse, shape=(B, Hq, S), dtypes=(torch.float32,))
    bucket = _size_bucket(S, T)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    if q.numel() == 0 or k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty(B, Hq, S, dtype=torch.float32, device=q.device)
    block_m_delta = 16 if interpreting() else 64
    _attn_bwd_delta_kernel[(triton.cdiv(S, block_m_delta) * B * Hq,)](
        out, do, delta, do.stride(0), do.stride(1), do.stride(2), Hq, S, DV,
        BLOCK_M=block_m_delta, BLOCK_DV=flags["BLOCK_DV"])
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2), do.stride(0), do.stride(1), do.stride(2))
    _launch(_attn_bwd_dkdv_kernel, "bwd", lambda meta: triton.cdiv(T, meta["BLOCK_N"]), B * Hkv, head_blocks(D, DV),
            q, k, v, do, lse, delta, dk, dv, *strides, Hq, Hkv, Hq // Hkv, S, T, D, DV, scale, window or 0, bucket, **flags)
    _launch(_attn_bwd_dq_kernel, "bwd", lambda meta: triton.cdiv(S, meta["BLOCK_M"]), B * Hq, head_blocks(D, DV),
            q, k, v, do, lse, delta, dq, *strides, Hq, Hq // Hkv, S, T, D, DV, scale, window or 0, bucket, **flags)
    return dq, dk, dv


class FlashAttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal, window, scale):
        out, lse = flash_attention_forward(q, k, v, causal, window, scale)
        ctx.save_for_backward(q, k, v, out, lse)  # the only extra tensor kept is lse [B, Hq, S]
        ctx.causal, ctx.window, ctx.scale = causal, window, scale
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        if do.stride(-1) != 1:
            do = do.contiguous()
        dq, dk, dv = flash_attention_backward(do.to(q.dtype), q, k, v, out, lse, ctx.causal, ctx.window, ctx.scale)
        return dq, dk, dv, None, None, None


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Can the kernel run these (checked) inputs? fp16/bf16/fp32 with head dims up to 256 (wider
    tiles do not fit in registers and shared memory)."""
    return float_tensors(q, k, v) and max(q.shape[-1], v.shape[-1]) <= 256


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    window: int | None = None, scale: float | None = None) -> torch.Tensor:
    """Fused, differentiable attention; same contract as
    `deepseek_mini.attention.scaled_dot_product_attention` (without `return_weights`).
    Inputs whose last dimension is strided are copied to contiguous; other strides are free."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(OP, name, t, contiguous=False)
    q, k, v = (t if t.dim() == 0 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return FlashAttentionFunction.apply(q, k, v, causal, window, scale)


def flops(B, Hq, S, T, D, DV, causal=True, window=None) -> float:
    """Matmul FLOPs of the forward (2 matmuls over the visible (query, key) pairs); the
    backward does 2.5x as many. Used by the benchmark."""
    offset = T - S
    if window is not None:
        pairs = sum(min(i + offset + 1, window) for i in range(S)) if S <= 65536 else S * min(window, T)
    elif causal:
        pairs = S * offset + S * (S + 1) / 2
    else:
        pairs = S * T
    return 2.0 * B * Hq * pairs * (D + DV)

