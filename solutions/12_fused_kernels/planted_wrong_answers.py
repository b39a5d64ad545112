"""Typical wrong answers to the graded exercises of 12_fused_kernels (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_ROOFLINE = """
def arithmetic_intensity(m, n, k, weight_bytes=2.0, act_bytes=2.0, bandwidth=H100_BYTES_PER_S, peak=H100_BF16_FLOPS):
    flops = {flops}
    nbytes = {nbytes}
    intensity = flops / nbytes
    bound = {bound}
    seconds = {seconds}
    return {{"flops": flops, "bytes": nbytes, "intensity": intensity, "bound": bound, "seconds": seconds}}
"""
_FLOPS, _BYTES = "2 * m * n * k", "n * k * weight_bytes + m * k * act_bytes + m * n * act_bytes"
_BOUND, _SECONDS = '"memory" if intensity < peak / bandwidth else "compute"', "max(flops / peak, nbytes / bandwidth)"


def _roofline(flops=_FLOPS, nbytes=_BYTES, bound=_BOUND, seconds=_SECONDS):
    return _ROOFLINE.format(flops=flops, nbytes=nbytes, bound=bound, seconds=seconds)


_ALIGN_HEAD = """
def moe_align(topk_idx, num_experts, block_m):
    flat = topk_idx.reshape(-1).long()
    num_pairs = flat.numel()
    counts = torch.bincount(flat, minlength=num_experts)
"""

_ALIGN_BODY = """
    num_padded = int(padded.sum())
    run_start = torch.cumsum(padded, 0) - padded
    order = torch.argsort(flat, stable=True)
    expert_of = flat[order]
    rank = torch.arange(num_pairs) - (torch.cumsum(counts, 0) - counts)[expert_of]
    sorted_ids = torch.full((num_padded,), {sentinel}, dtype=torch.long)
    sorted_ids[run_start[expert_of] + rank] = {stored}
    block_expert = torch.repeat_interleave(torch.arange(num_experts), {blocks})
    return sorted_ids, block_expert, num_padded
"""

_CEIL = "\n    padded = (counts + block_m - 1) // block_m * block_m\n"


def _align(padding=_CEIL, sentinel="num_pairs", stored="order", blocks="padded // block_m"):
    return _ALIGN_HEAD + padding + _ALIGN_BODY.format(sentinel=sentinel, stored=stored, blocks=blocks)


_LORA = """
def lora_backward(x, weight, lora_A, lora_B, scaling, dy):
    t = x @ lora_A.t()
    dy_b = dy @ lora_B
    dx = {dx}
    d_lora_A = {da}
    d_lora_B = {db}
    return dx, d_lora_A, d_lora_B
"""
_DX, _DA, _DB = "dy @ weight + scaling * (dy_b @ lora_A)", "scaling * (dy_b.t() @ x)", "scaling * (dy.t() @ t)"


def _lora(dx=_DX, da=_DA, db=_DB):
    return _LORA.format(dx=dx, da=da, db=db)


_UNPACK = """
def unpack_int4(packed):
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack(({first}, {second}), dim=-1).reshape(packed.shape[0], -1)
    return {signed}


def dequantize_int4(packed, scales, group_size):
    q = unpack_int4(packed).float()
    return q * {scales}
"""
_SIGNED, _SCALES = "torch.where(q >= 8, q - 16, q)", "scales.float().repeat_interleave(group_size, dim=1)"


def _unpack(first="low", second="high", signed=_SIGNED, scales=_SCALES):
    return _UNPACK.format(first=first, second=second, signed=signed, scales=scales)


WRONG_ANSWERS = {
    "arithmetic_intensity": {
        "counts a multiply-add as one FLOP (m*n*k)": _roofline(flops="m * n * k"),
        "forgets the bytes of writing y": _roofline(nbytes="n * k * weight_bytes + m * k * act_bytes"),
        "reads the weight at act_bytes (int4 would gain nothing)": _roofline(
            nbytes="n * k * act_bytes + m * k * act_bytes + m * n * act_bytes"),
        "adds the compute time and the memory time": _roofline(seconds="flops / peak + nbytes / bandwidth"),
        "exactly at the ridge point counted as memory-bound (<= instead of <)": _roofline(
            bound='"memory" if intensity <= peak / bandwidth else "compute"'),
        "compares the intensity with the H100 ridge point instead of peak / bandwidth": _roofline(
            bound='"memory" if intensity < 295 else "compute"'),
    },
    "moe_align": {
        "pads with -1 instead of the sentinel N*K": _align(sentinel="-1"),
        "num_padded returned as a 0-d tensor, not an int": _align().replace("num_padded = int(padded.sum())",
            "num_padded = padded.sum()"),
        "stores the token index n instead of the pair index p = n*K + k": _align(stored="order // topk_idx.shape[1]"),
        "adds a whole block of padding when the count is already a multiple of block_m": _align(
            padding="\n    padded = (counts // block_m + 1) * block_m\n"),
        "gives every expert at least one block, even unused ones": _align(
            padding="\n    padded = torch.clamp((counts + block_m - 1) // block_m, min=1) * block_m\n"),
        "one block per expert in block_expert, whatever its length": _align(blocks="(padded > 0).long()"),
    },
    "padding_waste": {
        "divides the padding by the real rows instead of the padded rows": """
def padding_waste(counts, block_m):
    padded = (counts + block_m - 1) // block_m * block_m
    real = int(counts.sum())
    return float(int(padded.sum()) - real) / real if real else 0.0
""",
        "rounds down instead of up (counts // block_m * block_m)": """
def padding_waste(counts, block_m):
    padded = counts // block_m * block_m
    total = int(padded.sum())
    return float(total - int(counts.sum())) / total if total else 0.0
""",
        "pads an unused expert to a full block": """
def padding_waste(counts, block_m):
    padded = torch.clamp((counts + block_m - 1) // block_m, min=1) * block_m
    total = int(padded.sum())
    return float(total - int(counts.sum())) / total if total else 0.0
""",
    },
    "lora_backward": {
        "dx forgets the adapter path (only g W)": _lora(dx="dy @ weight"),
        "no scaling in the adapter gradients": _lora(da="dy_b.t() @ x", db="dy.t() @ t"),
        "scaling applied twice in dx": _lora(dx="dy @ weight + scaling * scaling * (dy_b @ lora_A)"),
        "d_lora_B transposed (t^T g, shape [r, out])": _lora(db="scaling * (t.t() @ dy)"),
        "d_lora_A transposed (x^T (g B), shape [in, r])": _lora(da="scaling * (x.t() @ dy_b)"),
    },
    "unpack_int4": {
        "high nibble first (odd and even columns swapped)": _unpack(first="high", second="low"),
        "no sign extension: nibbles 8..15 stay positive": _unpack(signed="q"),
        "offset binary (v - 8) instead of two's complement": _unpack(signed="q - 8"),
        "tiles the scales with repeat instead of repeat_interleave": _unpack(scales="scales.float().repeat(1, group_size)"),
    },
}
