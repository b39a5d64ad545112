"""Quantized number formats: int8 (absmax and zero-point), int4 in groups, FP8 in 128x128 blocks.

Every scheme stores a low-precision integer/float code per weight plus a few float scales, and
gets the weight back as `code * scale` (int8 asymmetric: `(code - zero_point) * scale`):

    scheme      code                          scales                           error per weight
    int8        int8 in [-127, 127]           one per row (or per tensor)      <= scale / 2
    int8-asym   int8 in [-128, 127]           one scale + zero point per row   <= scale / 2
    int4        4-bit in [-8, 7], 2 per byte  one per `group_size` columns     <= scale / 2
    fp8         float8_e4m3fn                 one per 128x128 block            <= 2^-4 |w| (relative)

FP8 uses the layout of real DeepSeek-V3 checkpoints: next to each `weight` (float8_e4m3fn,
[N, K]) sits `weight_scale_inv` (float32, [ceil(N/128), ceil(K/128)]) and the real weight is
`weight * weight_scale_inv` block by block, so a downloaded FP8 checkpoint dequantizes with
`dequantize_fp8_block`. Activations get one scale per 128 consecutive values, as in DeepSeek-V3's
FP8 training.

This file is the one home of the formats (quantize, dequantize, int4 packing): `quant.py`
(layers, quantize_model) and the kernels in `kernels/quant_matmul.py` both import from here,
so neither imports the other.
"""

import math

import torch
import torch.nn.functional as F

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCHEMES = ("int8", "int8-asym", "int4", "fp8")


def _check_float(name: str, t: torch.Tensor, ndim: int | None = None):
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == FP8_DTYPE:
        raise TypeError(f"{name} must be a float16/bfloat16/float32 tensor, got "
                        f"{getattr(t, 'dtype', type(t))}")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains inf or NaN; quantization needs finite values")


def _check_dtype(name: str, t: torch.Tensor, dtype: torch.dtype):
    if not isinstance(t, torch.Tensor) or t.dtype != dtype:
        raise TypeError(f"{name} must be a {dtype} tensor, got {getattr(t, 'dtype', type(t))}")


def _safe(amax: torch.Tensor, qmax: float) -> torch.Tensor:
    """scale = amax / qmax, but 1 where amax == 0 (an all-zero row/group/block quantizes to 0)."""
    return torch.where(amax > 0, amax / qmax, torch.ones_like(amax))


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------

def quantize_int8(w: torch.Tensor, *, per_channel: bool = True, symmetric: bool = True):
    """Quantize to int8. Returns (q int8, scale float32, zero_point int32 or None).

    per_channel: one scale per output row (dim 0), shape [N]; else one scale for the tensor
    (a 0-d tensor). symmetric (absmax): q = round(w / scale), scale = max|w| / 127, no zero
    point. Asymmetric: the range [min(w, 0), max(w, 0)] is spread over all 256 codes,
    q = round(w / scale) + zero_point, scale = (max - min) / 255; 0 stays exactly representable.
    """
    _check_float("w", w)
    if per_channel and w.ndim < 1:
        raise ValueError("w must have at least 1 dimension for per_channel=True (one scale per row)")
    wf = w.float()
    dims = tuple(range(1, wf.ndim)) if per_channel else tuple(range(wf.ndim))
    # shape that broadcasts a per-row value back over the row
    view = (-1,) + (1,) * (wf.ndim - 1) if per_channel else ()
    if symmetric:
        amax = wf.abs().amax(dim=dims) if dims else wf.abs()
        scale = _safe(amax, 127.0)
        q = torch.round(wf / scale.reshape(view)).clamp(-127, 127).to(torch.int8)
        return q, scale, None
    lo = wf.amin(dim=dims).clamp(max=0) if dims else wf.clamp(max=0)
    hi = wf.amax(dim=dims).clamp(min=0) if dims else wf.clamp(min=0)
    scale = _safe(hi - lo, 255.0)
    zero_point = (torch.round(-lo / scale) - 128).to(torch.int32)  # code that means 0.0
    q = (torch.round(wf / scale.reshape(view)) + zero_point.reshape(view)).clamp(-128, 127)
    return q.to(torch.int8), scale, zero_point


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None = None,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = (q - zero_point) * scale, with scale (and zero_point) per row [N] or per tensor []."""
    _check_dtype("q", q, torch.int8)
    if scale.shape not in ((), (q.shape[0],)):
        raise ValueError(f"scale must have shape () (per tensor) or ({q.shape[0]},) (one per row of q "
                         f"{tuple(q.shape)}), got {tuple(scale.shape)}")
    if zero_point is not None and zero_point.shape != scale.shape:
        raise ValueError(f"zero_point must have the shape of scale {tuple(scale.shape)}, "
                         f"got {tuple(zero_point.shape)}")
    view = (-1,) + (1,) * (q.ndim - 1) if scale.ndim == 1 else ()
    w = q.float()
    if zero_point is not None:
        w = w - zero_point.float().reshape(view)
    return (w * scale.float().reshape(view)).to(dtype)


# ---------------------------------------------------------------------------------------------
# int4, group-wise symmetric, two values per byte
# ---------------------------------------------------------------------------------------------

def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int8 values in [-8, 7] of shape [N, K] (K even) into uint8 [N, K // 2].

    packed[n, j] = (q[n, 2j] & 0xF) | ((q[n, 2j+1] & 0xF) << 4): the low nibble holds the even
    column, each nibble is the value's 4-bit two's complement.
    """
    _check_dtype("q", q, torch.int8)
    if q.ndim != 2 or q.shape[1] % 2:
        raise ValueError(f"q must be 2-D [N, K] with K even (two values per byte), got {tuple(q.shape)}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError(f"q values must lie in [-8, 7] to fit 4 bits, got [{int(q.min())}, {int(q.max())}]")
    nibbles = q.to(torch.uint8) & 0xF  # int8 -> uint8 wraps negatives to two's complement
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_int4`: uint8 [N, K // 2] -> int8 [N, K] with values in [-8, 7]."""
    _check_dtype("packed", packed, torch.uint8)
    if packed.ndim != 2:
        raise ValueError(f"packed must be 2-D [N, K // 2], got {tuple(packed.shape)}")
    low = (packed & 0xF).to(torch.int8)
    high = (packed >> 4).to(torch.int8)
    q = torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)
    return torch.where(q >= 8, q - 16, q)  # nibbles 8..15 are the negatives -8..-1


def _check_group_value(group_size: int):
    if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 2 or group_size % 2:
        raise ValueError(f"group_size must be an even integer >= 2, got {group_size!r}")


def _check_group_size(group_size: int, k: int, what: str):
    _check_group_value(group_size)
    if k % group_size:
        raise ValueError(f"{what} has K={k} columns, not divisible by group_size={group_size}; "
                         f"pick a group_size that divides K (e.g. {math.gcd(k, group_size)}) "
                         f"or leave this layer unquantized")


def quantize_int4(w: torch.Tensor, group_size: int = 128):
    """Symmetric int4 per group of `group_size` consecutive columns of a [N, K] weight.

    Returns (packed uint8 [N, K // 2], scales float32 [N, K // group_size]) with
    scale = max|w| / 7 over the group and q = round(w / scale) in [-7, 7] (the code -8 is
    never produced, so the grid is symmetric around 0 and the rounding error is <= scale / 2).
    """
    _check_float("w", w, ndim=2)
    n, k = w.shape
    _check_group_size(group_size, k, "w")
    groups = w.float().reshape(n, k // group_size, group_size)
    scales = _safe(groups.abs().amax(dim=-1), 7.0)
    q = torch.round(groups / scales[..., None]).clamp(-7, 7).to(torch.int8).reshape(n, k)
    return pack_int4(q), scales


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, group_size: int = 128,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w[n, k] = q[n, k] * scales[n, k // group_size] -> [N, K] in `dtype`."""
    q = unpack_int4(packed)
    n, k = q.shape
    _check_group_size(group_size, k, "the unpacked weight")
    if scales.shape != (n, k // group_size):
        raise ValueError(f"scales must have shape ({n}, {k // group_size}) = (N, K // group_size) for "
                         f"packed {tuple(packed.shape)} and group_size={group_size}, got {tuple(scales.shape)}")
    w = q.float().reshape(n, k // group_size, group_size) * scales.float()[..., None]
    return w.reshape(n, k).to(dtype)


# ---------------------------------------------------------------------------------------------
# FP8 e4m3 with 128x128 weight blocks (DeepSeek-V3 checkpoint layout) and 1x128 activation tiles
# ---------------------------------------------------------------------------------------------

def _check_block_size(block_size: int):
    if not isinstance(block_size, int) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size!r}")


def _pad_to_blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad the last two dims up to multiples of block_size (ragged edge blocks)."""
    n, k = x.shape[-2:]
    return F.pad(x, (0, -k % block_size, 0, -n % block_size))


def quantize_fp8_block(w: torch.Tensor, block_size: int = 128):
    """Quantize a [N, K] weight to float8_e4m3fn with one scale per block_size x block_size block.

    Returns (w_fp8 [N, K], weight_scale_inv float32 [ceil(N/bs), ceil(K/bs)]) where
    weight_scale_inv = max|w| / 448 over the block, so the block's largest value maps to the
    largest finite e4m3 number. Edge blocks may be smaller than bs x bs.
    """
    _check_float("w", w, ndim=2)
    _check_block_size(block_size)
    n, k = w.shape
    nb, kb = -(-n // block_size), -(-k // block_size)
    blocks = _pad_to_blocks(w.float(), block_size).reshape(nb, block_size, kb, block_size)
    scale_inv = _safe(blocks.abs().amax(dim=(1, 3)), FP8_MAX)
    scaled = (blocks / scale_inv[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    w_fp8 = scaled.reshape(nb * block_size, kb * block_size)[:n, :k].to(FP8_DTYPE)
    return w_fp8, scale_inv


def dequantize_fp8_block(w_fp8: torch.Tensor, scale_inv: torch.Tensor, block_size: int = 128,
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w = w_fp8 * scale_inv of its block, for a DeepSeek-V3 style (weight, weight_scale_inv) pair."""
    _check_dtype("w_fp8", w_fp8, FP8_DTYPE)
    _check_block_size(block_size)
    if w_fp8.ndim != 2:
        raise ValueError(f"w_fp8 must be 2-D [N, K], got {tuple(w_fp8.shape)}")
    n, k = w_fp8.shape
    expected = (-(-n // block_size), -(-k // block_size))
    if tuple(scale_inv.shape) != expected:
        raise ValueError(f"scale_inv must have shape {expected} = (ceil(N/{block_size}), ceil(K/{block_size})) "
                         f"for w_fp8 {tuple(w_fp8.shape)}, got {tuple(scale_inv.shape)}")
    scale = scale_inv.float().repeat_interleave(block_size, 0).repeat_interleave(block_size, 1)
    return (w_fp8.float() * scale[:n, :k]).to(dtype)


def quantize_fp8_activation(x: torch.Tensor, block_size: int = 128):
    """Quantize activations to float8_e4m3fn with one scale per `block_size` consecutive values
    of the last dim. Returns (x_fp8 shaped like x, scale float32 [..., ceil(K / block_size)]),
    x ~= x_fp8 * scale of its tile (a ragged last tile is allowed)."""
    _check_float("x", x)
    _check_block_size(block_size)
    if x.ndim < 1:
        raise ValueError("x must have at least 1 dimension (the one split into tiles)")
    k = x.shape[-1]
    kb = -(-k // block_size)
    tiles = F.pad(x.float(), (0, kb * block_size - k)).reshape(*x.shape[:-1], kb, block_size)
    scale = _safe(tiles.abs().amax(dim=-1), FP8_MAX)
    x_fp8 = (tiles / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).reshape(*x.shape[:-1], kb * block_size)
    return x_fp8[..., :k].to(FP8_DTYPE), scale


def dequantize_fp8_activation(x_fp8: torch.Tensor, scale: torch.Tensor, block_size: int = 128,
                              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `quantize_fp8_activation`: x = x_fp8 * scale of its tile of the last dim."""
    _check_dtype("x_fp8", x_fp8, FP8_DTYPE)
    _check_block_size(block_size)
    k = x_fp8.shape[-1]
    expected = (*x_fp8.shape[:-1], -(-k // block_size))
    if tuple(scale.shape) != expected:
        raise ValueError(f"scale must have shape {expected} (one per {block_size} values of the last dim "
                         f"of x_fp8 {tuple(x_fp8.shape)}), got {tuple(scale.shape)}")
    full = scale.float().repeat_interleave(block_size, dim=-1)[..., :k]
    return (x_fp8.float() * full).to(dtype)


def dequantize_fp8_state_dict(tensors: dict, block_size: int = 128, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Turn a DeepSeek-V3 FP8 checkpoint's tensors into float ones: each `X.weight` stored as
    float8_e4m3fn with its `X.weight_scale_inv` becomes a `dtype` `X.weight`; the scale keys go
    away and every other tensor is passed through unchanged."""
    out = {}
    for key, value in tensors.items():
        if key.endswith("weight_scale_inv"):
            if key[:-len("_scale_inv")] not in tensors:
                raise KeyError(f"{key!r} has no matching {key[:-len('_scale_inv')]!r} weight")
            continue
        if value.dtype == FP8_DTYPE:
            scale_key = key + "_scale_inv"
            if scale_key not in tensors:
                raise KeyError(f"FP8 tensor {key!r} has no {scale_key!r} to dequantize it with")
            value = dequantize_fp8_block(value, tensors[scale_key], block_size, dtype)
        out[key] = value
    return out
