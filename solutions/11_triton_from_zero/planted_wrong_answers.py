"""Typical wrong answers to the graded exercises of 11_triton_from_zero (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}. Each answer cell holds a kernel and its
launcher, so each plant is both, with the mistake in one of them.

None of these may crash the grading process: the tests put every tensor a kernel sees in the
middle of a NaN-filled guard buffer (deepseek_mini.kernels.guarded), so a missing mask reads or
writes guard values, never memory outside an allocation. Without the guards, the plants that store
without a mask corrupt the heap and kill the grading process.
"""


def _edit(code, old, new):
    """code with one exact piece replaced (fails loudly if the piece is not there)."""
    assert code.count(old) == 1, f"{old!r} not found exactly once"
    return code.replace(old, new)

# ------------------------------------------------------------------ add

_ADD_KERNEL = """
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)
"""

_ADD_LAUNCHER = """
def add(x, y, out=None, block=128):
    out = torch.empty_like(x) if out is None else out
    add_kernel[(triton.cdiv(x.numel(), block),)](x, y, out, x.numel(), BLOCK=block)
    return out
"""

# ------------------------------------------------------------------ softmax

_SOFTMAX_LAUNCHER = """
def softmax(x):
    out = torch.empty_like(x)
    softmax_kernel[(x.shape[0],)](x, out, x.stride(0), out.stride(0), x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
"""


def _softmax_kernel(load_other='float("-inf")', body=None, row_offset="row * x_row_stride"):
    body = body or """
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    result = e / tl.sum(e, axis=0)
"""
    return f"""
@triton.jit
def softmax_kernel(x_ptr, out_ptr, x_row_stride, out_row_stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + {row_offset} + cols, mask=mask, other={load_other}).to(tl.float32)
{body}
    tl.store(out_ptr + row * out_row_stride + cols, result.to(out_ptr.dtype.element_ty), mask=mask)
"""


# ------------------------------------------------------------------ matmul

def _matmul_kernel(k_offsets="k0 + ks", k_mask="& (k[None, :] < K)", k_mask_b="(k[:, None] < K) & "):
    return f"""
@triton.jit
def matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, stride_am, stride_ak, stride_bk, stride_bn, stride_cm, stride_cn,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = {k_offsets}
        a = tl.load(a_ptr + rows[:, None] * stride_am + k[None, :] * stride_ak,
                    mask=(rows[:, None] < M) {k_mask}, other=0.0)
        b = tl.load(b_ptr + k[:, None] * stride_bk + cols[None, :] * stride_bn,
                    mask={k_mask_b}(cols[None, :] < N), other=0.0)
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * stride_cm + cols[None, :] * stride_cn, acc.to(c_ptr.dtype.element_ty),
             mask=(rows[:, None] < M) & (cols[None, :] < N))
"""


def _matmul_launcher(grid="(triton.cdiv(M, block_m), triton.cdiv(N, block_n))",
                     strides="a.stride(0), a.stride(1), b.stride(0), b.stride(1), c.stride(0), c.stride(1)",
                     blocks="BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k"):
    return f"""
def matmul(a, b, block_m=32, block_n=32, block_k=16):
    (M, K), N = a.shape, b.shape[1]
    c = torch.empty(M, N, dtype=a.dtype, device=a.device)
    matmul_kernel[{grid}](a, b, c, M, N, K, {strides}, {blocks})
    return c
"""


# ------------------------------------------------------------------ rmsnorm

def _rmsnorm_kernel(x_line="x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)",
                    rstd_line="rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)",
                    y_line="y = x * rstd * w"):
    return f"""
@triton.jit
def rmsnorm_kernel(x_ptr, w_ptr, y_ptr, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    {x_line}
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    {rstd_line}
    {y_line}
    tl.store(y_ptr + row * n_cols + cols, y.to(y_ptr.dtype.element_ty), mask=mask)
"""


def _rmsnorm_launcher(dtype="torch.promote_types(x.dtype, weight.dtype)"):
    return f"""
def rmsnorm(x, weight, eps=1e-6):
    D = x.shape[-1]
    y = torch.empty(x.shape, dtype={dtype}, device=x.device)
    rmsnorm_kernel[(x.numel() // D,)](x, weight, y, D, eps, BLOCK=triton.next_power_of_2(D))
    return y
"""


# ------------------------------------------------------------------ flash attention

def _flash_kernel(mask_lines=None, update=None, final="out = acc / l_i[:, None]", scale="* scale"):
    mask_lines = mask_lines or """
        visible = keys[None, :] < S
        if CAUSAL:
            visible = visible & (keys[None, :] <= rows[:, None])
        s = tl.where(visible, s, float("-inf"))"""
    update = update or """
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new"""
    return f"""
@triton.jit
def flash_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, S, scale, D: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    head = tl.program_id(1) * S * D
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, D)
    q = tl.load(q_ptr + head + rows[:, None] * D + dims[None, :], mask=rows[:, None] < S, other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D], dtype=tl.float32)
    for start_n in range(0, S, BLOCK_N):
        keys = start_n + tl.arange(0, BLOCK_N)
        k = tl.load(k_ptr + head + keys[:, None] * D + dims[None, :], mask=keys[:, None] < S, other=0.0)
        v = tl.load(v_ptr + head + keys[:, None] * D + dims[None, :], mask=keys[:, None] < S, other=0.0)
        s = tl.dot(q, tl.trans(k)) {scale}{mask_lines}{update}
    {final}
    tl.store(o_ptr + head + rows[:, None] * D + dims[None, :], out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < S)
"""


def _flash_launcher(grid="(triton.cdiv(S, block_m), B * H)", blocks="BLOCK_M=block_m, BLOCK_N=block_n"):
    return f"""
def flash_attention_fwd(q, k, v, causal=True, block_m=16, block_n=16):
    B, H, S, D = q.shape
    o = torch.empty_like(q)
    flash_fwd_kernel[{grid}](q, k, v, o, S, 1.0 / math.sqrt(D), D=D, CAUSAL=causal, {blocks})
    return o
"""


WRONG_ANSWERS = {
    "add": {
        "no mask: the last block reads and writes past the end": """
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets) + tl.load(y_ptr + offsets))
""" + _ADD_LAUNCHER,
        "loads masked, tl.store not: the last block writes zeros past the end of out": _edit(
            _ADD_KERNEL, "mask=mask), mask=mask)", "mask=mask))") + _ADD_LAUNCHER,
        "grid of n // block programs: the partial last block is never computed": _ADD_KERNEL + """
def add(x, y, out=None, block=128):
    out = torch.empty_like(x) if out is None else out
    add_kernel[(x.numel() // block,)](x, y, out, x.numel(), BLOCK=block)
    return out
""",
        "offsets miss pid * BLOCK: every program handles the first block": """
@triton.jit
def add_kernel(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    tl.store(out_ptr + offsets, tl.load(x_ptr + offsets, mask=mask) + tl.load(y_ptr + offsets, mask=mask), mask=mask)
""" + _ADD_LAUNCHER,
        "ignores `out` and always returns a new tensor": _ADD_KERNEL + """
def add(x, y, out=None, block=128):
    result = torch.empty_like(x)
    add_kernel[(triton.cdiv(x.numel(), block),)](x, y, result, x.numel(), BLOCK=block)
    return result
""",
    },
    "softmax": {
        "padded lanes load 0.0 instead of -inf: they add exp(0 - max) to the sum":
            _softmax_kernel(load_other="0.0") + _SOFTMAX_LAUNCHER,
        "no max subtraction: exp overflows for large scores":
            _softmax_kernel(body="""
    e = tl.exp(x)
    result = e / tl.sum(e, axis=0)
""") + _SOFTMAX_LAUNCHER,
        "rows addressed with n_cols instead of the row stride":
            _softmax_kernel(row_offset="row * n_cols") + _SOFTMAX_LAUNCHER,
        "tl.store without a mask: the padded lanes of the last row write past the output": _edit(
            _softmax_kernel(), "result.to(out_ptr.dtype.element_ty), mask=mask)", "result.to(out_ptr.dtype.element_ty))")
            + _SOFTMAX_LAUNCHER,
        "one program for the whole tensor: only row 0 is computed": _softmax_kernel() + """
def softmax(x):
    out = torch.empty_like(x)
    softmax_kernel[(1,)](x, out, x.stride(0), out.stride(0), x.shape[1], BLOCK=triton.next_power_of_2(x.shape[1]))
    return out
""",
    },
    "matmul": {
        "no mask on the K tail: the last step reads past the end of each row": (
            _matmul_kernel(k_mask="", k_mask_b="") + _matmul_launcher()),
        "a loaded without the K mask: its reads past K are multiplied by b's masked zeros": (
            _matmul_kernel(k_mask="") + _matmul_launcher()),
        "b loaded without the K mask: its reads past K are multiplied by a's masked zeros": (
            _matmul_kernel(k_mask_b="") + _matmul_launcher()),
        "tl.store without a mask: the edge tiles write past c": (
            _edit(_matmul_kernel(), "acc.to(c_ptr.dtype.element_ty),\n             mask=(rows[:, None] < M) & (cols[None, :] < N))",
                  "acc.to(c_ptr.dtype.element_ty))") + _matmul_launcher()),
        "K offsets do not advance: every step multiplies the first K block": (
            _matmul_kernel(k_offsets="ks") + _matmul_launcher()),
        "assumes contiguous inputs: strides computed from the shapes": (
            _matmul_kernel() + _matmul_launcher(strides="K, 1, N, 1, N, 1")),
        "grid of M // block_m x N // block_n: the partial edge tiles are never computed": (
            _matmul_kernel() + _matmul_launcher(grid="(M // block_m, N // block_n)")),
        "block arguments ignored: fixed 32 x 32 tiles launched on a grid sized for the arguments": (
            _matmul_kernel() + _matmul_launcher(blocks="BLOCK_M=32, BLOCK_N=32, BLOCK_K=16")),
    },
    "rmsnorm": {
        "mean of the squares over BLOCK instead of n_cols": (
            _rmsnorm_kernel(rstd_line="rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / BLOCK + eps)") + _rmsnorm_launcher()),
        "eps outside the square root": (
            _rmsnorm_kernel(rstd_line="rstd = 1.0 / (tl.sqrt(tl.sum(x * x, axis=0) / n_cols) + eps)") + _rmsnorm_launcher()),
        "LayerNorm: subtracts the mean first": (
            _rmsnorm_kernel(rstd_line="x = tl.where(mask, x - tl.sum(x, axis=0) / n_cols, 0.0)\n"
                                      "    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / n_cols + eps)")
            + _rmsnorm_launcher()),
        "computes in the input dtype: x^2 overflows float16": (
            _rmsnorm_kernel(x_line="x = tl.load(x_ptr + row * n_cols + cols, mask=mask, other=0.0)",
                            rstd_line="rstd = 1.0 / tl.sqrt((tl.sum(x * x, axis=0) / n_cols).to(tl.float32) + eps)")
            + _rmsnorm_launcher()),
        "forgets the weight": _rmsnorm_kernel(y_line="y = x * rstd") + _rmsnorm_launcher(),
        "tl.store without a mask: the padded lanes of the last row write past y": (
            _edit(_rmsnorm_kernel(), "y.to(y_ptr.dtype.element_ty), mask=mask)", "y.to(y_ptr.dtype.element_ty))")
            + _rmsnorm_launcher()),
        "output in x's dtype instead of the promoted one": (
            _rmsnorm_kernel() + _rmsnorm_launcher(dtype="x.dtype")),
    },
    "flash_attention": {
        "no rescaling of l and acc when the running max grows (alpha forgotten)": _flash_kernel(update="""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp(s - m_new[:, None])
        l_i = l_i + tl.sum(p, 1)
        acc = acc + tl.dot(p.to(v.dtype), v)
        m_i = m_new""") + _flash_launcher(),
        "no running max: exp of the raw scores overflows": _flash_kernel(update="""
        p = tl.exp(s)
        l_i = l_i + tl.sum(p, 1)
        acc = acc + tl.dot(p.to(v.dtype), v)""") + _flash_launcher(),
        "causal mask keeps j < i: the diagonal is hidden and row 0 sees nothing": _flash_kernel(mask_lines="""
        visible = keys[None, :] < S
        if CAUSAL:
            visible = visible & (keys[None, :] < rows[:, None])
        s = tl.where(visible, s, float("-inf"))""") + _flash_launcher(),
        "keys past S are not masked: their zero scores get weight": _flash_kernel(mask_lines="""
        if CAUSAL:
            s = tl.where(keys[None, :] <= rows[:, None], s, float("-inf"))""") + _flash_launcher(),
        "scores not scaled by 1/sqrt(D)": _flash_kernel(scale="") + _flash_launcher(),
        "k and v loaded without a mask: keys past S get weight 0, but 0 * (what lies past v) is not always 0": (
            _edit(_edit(_flash_kernel(), "k = tl.load(k_ptr + head + keys[:, None] * D + dims[None, :], mask=keys[:, None] < S, other=0.0)",
                        "k = tl.load(k_ptr + head + keys[:, None] * D + dims[None, :])"),
                  "v = tl.load(v_ptr + head + keys[:, None] * D + dims[None, :], mask=keys[:, None] < S, other=0.0)",
                  "v = tl.load(v_ptr + head + keys[:, None] * D + dims[None, :])") + _flash_launcher()),
        "tl.store without a mask: the last query block writes past the output": (
            _edit(_flash_kernel(), "out.to(o_ptr.dtype.element_ty), mask=rows[:, None] < S)", "out.to(o_ptr.dtype.element_ty))")
            + _flash_launcher()),
        "grid of S // block_m query blocks: the last queries are never computed": (
            _flash_kernel() + _flash_launcher(grid="(S // block_m, B * H)")),
    },
}
