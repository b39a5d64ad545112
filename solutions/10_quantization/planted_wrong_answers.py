"""Typical wrong answers to the graded exercises of 10_quantization (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_ABSMAX_DEQUANT = """

def absmax_dequantize(q, scale):
    return q.float() * scale.float()
"""


def _absmax(amax_line, scale_line, code_line):
    return f"""
def absmax_quantize(x, dim=None):
    x = x.float()
    if dim is None:
        amax = x.abs().amax()
    else:
        others = [d for d in range(x.ndim) if d != dim % x.ndim]
        {amax_line}
    {scale_line}
    {code_line}
    return q, scale
""" + _ABSMAX_DEQUANT


_AMAX_OK = "amax = x.abs().amax(dim=others, keepdim=True)"
_SCALE_OK = "scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))"
_CODE_OK = "q = torch.round(x / scale).clamp(-127, 127).to(torch.int8)"

_ZP_DEQUANT = """

def zeropoint_dequantize(q, scale, zero_point):
    return (q.float() - zero_point.float()) * scale.float()
"""

_UNPACK_OK = """

def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).flatten(1)
    return torch.where(q > 7, q - 16, q)
"""

_PACK_OK = """
def pack_int4(q):
    nibbles = q.to(torch.uint8) & 0xF
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)
"""

_DEQUANT_GROUPS_OK = """

def dequantize_int4_groups(packed, scales, group_size=128):
    q = unpack_int4(packed).float()
    n, k = q.shape
    return (q.reshape(n, k // group_size, group_size) * scales.float()[..., None]).reshape(n, k)
"""

_FP8_DEQUANT_OK = """

def fp8_block_dequantize(w_fp8, scale_inv, block_size=128):
    n, k = w_fp8.shape
    per_weight = scale_inv.float().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return w_fp8.float() * per_weight[:n, :k]
"""

_FP8_HEAD = """
def fp8_block_quantize(w, block_size=128):
    n, k = w.shape
    nb, kb = math.ceil(n / block_size), math.ceil(k / block_size)
    padded = F.pad(w.float(), (0, kb * block_size - k, 0, nb * block_size - n))
"""

_PRUNE_GLOBAL_TAIL = """
    if scope == "layer":
        return {name: keep_mask(w.detach().abs()).view(w.shape) for name, w in weights.items()}
    keep = keep_mask(torch.cat([w.detach().abs().flatten() for w in weights.values()]))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return masks
"""

WRONG_ANSWERS = {
    "absmax_quantize": {
        "negative dim not normalised: dim=-2 matches no axis, so every axis is reduced": _absmax(
            "amax = x.abs().amax(dim=[d for d in range(x.ndim) if d != dim], keepdim=True)", _SCALE_OK, _CODE_OK),
        "casts with .to(torch.int8), which truncates toward zero instead of rounding":
            _absmax(_AMAX_OK, _SCALE_OK, "q = (x / scale).clamp(-127, 127).to(torch.int8)"),
        "rounds halves up with floor(x + 0.5)":
            _absmax(_AMAX_OK, _SCALE_OK, "q = torch.floor(x / scale + 0.5).clamp(-127, 127).to(torch.int8)"),
        "divides by 128 (the int8 range is -128..127) instead of 127":
            _absmax(_AMAX_OK, "scale = torch.where(amax > 0, amax / 128, torch.ones_like(amax))", _CODE_OK),
        "per channel: takes the max along dim instead of over the other dims":
            _absmax("amax = x.abs().amax(dim=dim, keepdim=True)", _SCALE_OK, _CODE_OK),
        "no guard for all-zero data: 0 / 0 gives NaN":
            _absmax(_AMAX_OK, "scale = amax / 127", _CODE_OK),
    },
    "zeropoint_quantize": {
        "zero point truncated toward zero by .to(torch.int32) instead of rounded": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero_point = (-lo / scale - 128).to(torch.int32)
    q = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point
""" + _ZP_DEQUANT,
        "range [min, max] without 0: zero is no longer exact, a constant tensor divides by zero": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min(), x.max()
    scale = (hi - lo) / 255
    zero_point = (torch.round(-lo / scale) - 128).to(torch.int32)
    q = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point
""" + _ZP_DEQUANT,
        "256 steps instead of 255": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 256, torch.ones_like(hi))
    zero_point = (torch.round(-lo / scale) - 128).to(torch.int32)
    q = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point
""" + _ZP_DEQUANT,
        "zero point with the wrong sign": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero_point = (torch.round(lo / scale) - 128).to(torch.int32)
    q = (torch.round(x / scale) + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, zero_point
""" + _ZP_DEQUANT,
        "no clamp: a tie at the top of the range wraps 128 to -128": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero_point = (torch.round(-lo / scale) - 128).to(torch.int32)
    q = (torch.round(x / scale) + zero_point).to(torch.int32).to(torch.int8)
    return q, scale, zero_point
""" + _ZP_DEQUANT,
        "zero point left fractional (rounded only at the end)": """
def zeropoint_quantize(x):
    x = x.float()
    lo, hi = x.min().clamp(max=0), x.max().clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    zero_point = -lo / scale - 128
    q = torch.round(x / scale + zero_point).clamp(-128, 127).to(torch.int8)
    return q, scale, torch.round(zero_point).to(torch.int32)
""" + _ZP_DEQUANT,
    },
    "pack_int4": {
        "even column in the high nibble, odd in the low one": """
def pack_int4(q):
    nibbles = q.to(torch.uint8) & 0xF
    return (nibbles[:, 0::2] << 4) | nibbles[:, 1::2]


def unpack_int4(packed):
    high = (packed & 0xF).to(torch.int8)
    low = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=-1).flatten(1)
    return torch.where(q > 7, q - 16, q)
""",
        "unpack forgets the sign: nibbles 8..15 come back as 8..15": _PACK_OK + """

def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    return torch.stack((low, high), dim=-1).flatten(1)
""",
        "unpack concatenates all low nibbles, then all high ones": _PACK_OK + """

def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.cat((low, high), dim=1)
    return torch.where(q > 7, q - 16, q)
""",
        "pairs up rows instead of columns": """
def pack_int4(q):
    nibbles = q.to(torch.uint8) & 0xF
    return nibbles[0::2] | (nibbles[1::2] << 4)


def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack((low, high), dim=1).flatten(0, 1)
    return torch.where(q > 7, q - 16, q)
""",
    },
    "int4_groups": {
        "halves rounded up with floor(x + 0.5) (torch.round rounds them to even)": """
def quantize_int4_groups(w, group_size=128):
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"quantize_int4_groups: K={k} is not a multiple of group_size={group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)
    amax = groups.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.floor(groups / scales[..., None] + 0.5).clamp(-7, 7).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales
""" + _DEQUANT_GROUPS_OK,
        "scale max|w| / 8 (the code -8 exists, but +8 does not: the largest weight is clipped)": """
def quantize_int4_groups(w, group_size=128):
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    groups = w.float().reshape(n, k // group_size, group_size)
    amax = groups.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 8, torch.ones_like(amax))
    q = torch.round(groups / scales[..., None]).clamp(-8, 7).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales
""" + _DEQUANT_GROUPS_OK,
        "strided groups: reshape(n, group_size, k // group_size) mixes columns far apart": """
def quantize_int4_groups(w, group_size=128):
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    groups = w.float().reshape(n, group_size, k // group_size)
    amax = groups.abs().amax(dim=1)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(groups / scales[:, None, :]).clamp(-7, 7).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales


def dequantize_int4_groups(packed, scales, group_size=128):
    q = unpack_int4(packed).float()
    n, k = q.shape
    return (q.reshape(n, group_size, k // group_size) * scales.float()[:, None, :]).reshape(n, k)
""",
        "no error when K is not a multiple: the last columns are silently dropped": """
def quantize_int4_groups(w, group_size=128):
    n, k = w.shape
    k = k - k % group_size
    groups = w[:, :k].float().reshape(n, k // group_size, group_size)
    amax = groups.abs().amax(dim=-1)
    scales = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(groups / scales[..., None]).clamp(-7, 7).to(torch.int8)
    return pack_int4(q.reshape(n, k)), scales
""" + _DEQUANT_GROUPS_OK,
        "one scale per row, ignoring the groups (repeated to the expected shape)": """
def quantize_int4_groups(w, group_size=128):
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K={k} is not a multiple of group_size={group_size}")
    amax = w.float().abs().amax(dim=1, keepdim=True)
    row_scale = torch.where(amax > 0, amax / 7, torch.ones_like(amax))
    q = torch.round(w.float() / row_scale).clamp(-7, 7).to(torch.int8)
    return pack_int4(q), row_scale.expand(n, k // group_size).contiguous()
""" + _DEQUANT_GROUPS_OK,
    },
    "fp8_block_quantize": {
        "stores 448 / max (the factor applied), not max / 448 (what DeepSeek-V3 stores)": _FP8_HEAD + """
    blocks = padded.reshape(nb, block_size, kb, block_size)
    amax = blocks.abs().amax(dim=(1, 3))
    factor = torch.where(amax > 0, FP8_MAX / amax, torch.ones_like(amax))
    scaled = (blocks * factor[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w_fp8 = scaled.reshape(nb * block_size, kb * block_size)[:n, :k].to(torch.float8_e4m3fn)
    return w_fp8, factor
""" + """

def fp8_block_dequantize(w_fp8, scale_inv, block_size=128):
    n, k = w_fp8.shape
    per_weight = scale_inv.float().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return w_fp8.float() / per_weight[:n, :k]
""",
        "blocks cut with reshape(nb, kb, bs, bs): each 'block' is a strip of rows": _FP8_HEAD + """
    blocks = padded.reshape(nb, kb, block_size, block_size)
    amax = blocks.abs().amax(dim=(2, 3))
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    scaled = (blocks / scale_inv[:, :, None, None]).clamp(-FP8_MAX, FP8_MAX)
    w_fp8 = scaled.reshape(nb * block_size, kb * block_size)[:n, :k].to(torch.float8_e4m3fn)
    return w_fp8, scale_inv
""" + _FP8_DEQUANT_OK,
        "uses int8's 127 as the largest FP8 value": _FP8_HEAD + """
    blocks = padded.reshape(nb, block_size, kb, block_size)
    amax = blocks.abs().amax(dim=(1, 3))
    scale_inv = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    scaled = blocks / scale_inv[:, None, :, None]
    w_fp8 = scaled.reshape(nb * block_size, kb * block_size)[:n, :k].to(torch.float8_e4m3fn)
    return w_fp8, scale_inv
""" + _FP8_DEQUANT_OK,
        "one scale for the whole matrix, repeated over the block grid": _FP8_HEAD + """
    amax = w.float().abs().amax()
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    w_fp8 = (w.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return w_fp8, scale.expand(nb, kb).contiguous()
""" + _FP8_DEQUANT_OK,
    },
    "magnitude_prune": {
        "halves of a weight rounded up with int(x + 0.5) (Python's round takes them to even)": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(magnitudes):
        keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
        n_prune = int(sparsity * magnitudes.numel() + 0.5)
        if n_prune:
            keep[torch.topk(magnitudes.flatten(), n_prune, largest=False).indices] = False
        return keep
""" + _PRUNE_GLOBAL_TAIL,
        "math.ceil of the number to prune": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(magnitudes):
        keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
        n_prune = math.ceil(sparsity * magnitudes.numel())
        if n_prune:
            keep[torch.topk(magnitudes.flatten(), n_prune, largest=False).indices] = False
        return keep
""" + _PRUNE_GLOBAL_TAIL,
        "threshold |w| <= k-th smallest: every tie is pruned, not exactly k": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(magnitudes):
        n_prune = round(sparsity * magnitudes.numel())
        if n_prune == 0:
            return torch.ones(magnitudes.numel(), dtype=torch.bool)
        threshold = magnitudes.flatten().kthvalue(n_prune).values
        return magnitudes.flatten() > threshold
""" + _PRUNE_GLOBAL_TAIL,
        "ranks w instead of |w|: prunes the most negative weights": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(values):
        keep = torch.ones(values.numel(), dtype=torch.bool)
        n_prune = round(sparsity * values.numel())
        if n_prune:
            keep[torch.topk(values.flatten(), n_prune, largest=False).indices] = False
        return keep

    if scope == "layer":
        return {name: keep_mask(w.detach()).view(w.shape) for name, w in weights.items()}
    keep = keep_mask(torch.cat([w.detach().flatten() for w in weights.values()]))
    masks, start = {}, 0
    for name, w in weights.items():
        masks[name] = keep[start:start + w.numel()].view(w.shape)
        start += w.numel()
    return masks
""",
        "global scope pruned tensor by tensor (the scope is ignored)": """
def magnitude_prune(weights, sparsity, scope="global"):
    masks = {}
    for name, w in weights.items():
        keep = torch.ones(w.numel(), dtype=torch.bool)
        n_prune = round(sparsity * w.numel())
        if n_prune:
            keep[torch.topk(w.detach().abs().flatten(), n_prune, largest=False).indices] = False
        masks[name] = keep.view(w.shape)
    return masks
""",
        "int() floors the number to prune instead of rounding": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(magnitudes):
        keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
        n_prune = int(sparsity * magnitudes.numel())
        if n_prune:
            keep[torch.topk(magnitudes.flatten(), n_prune, largest=False).indices] = False
        return keep
""" + _PRUNE_GLOBAL_TAIL,
        "keeps the smallest weights and prunes the largest": """
def magnitude_prune(weights, sparsity, scope="global"):
    def keep_mask(magnitudes):
        keep = torch.ones(magnitudes.numel(), dtype=torch.bool)
        n_prune = round(sparsity * magnitudes.numel())
        if n_prune:
            keep[torch.topk(magnitudes.flatten(), n_prune, largest=True).indices] = False
        return keep
""" + _PRUNE_GLOBAL_TAIL,
    },
}
