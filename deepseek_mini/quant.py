"""Weight quantization: int8 (absmax and zero-point), int4 in groups, FP8 in 128x128 blocks.

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

`QuantLinear` keeps a quantized weight and dequantizes it on the fly in `forward`
(`QuantExperts` does the same for stacked MoE experts); `quantize_model` swaps a model's
layers for them and reports the error of each.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.surgery import check_names, find_modules, name_matches, replace_module  # noqa: F401 (name_matches: public here too)

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


# ---------------------------------------------------------------------------------------------
# Error statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class QuantError:
    """How far a dequantized weight is from the original (one row of a quantize_model report)."""
    name: str
    scheme: str
    shape: tuple
    max_abs_error: float
    mean_abs_error: float
    snr_db: float  # 10 log10(sum w^2 / sum (w - w_hat)^2); inf when exact

    def as_dict(self) -> dict:
        return asdict(self)


def quantization_error(w: torch.Tensor, w_hat: torch.Tensor, name: str = "", scheme: str = "") -> QuantError:
    """Max/mean absolute error and signal-to-noise ratio (dB) of w_hat as an estimate of w."""
    if w.shape != w_hat.shape:
        raise ValueError(f"w {tuple(w.shape)} and w_hat {tuple(w_hat.shape)} must have the same shape")
    w, err = w.double(), (w.double() - w_hat.double())
    noise, signal = err.pow(2).sum().item(), w.pow(2).sum().item()
    if noise == 0:
        snr = math.inf
    elif signal == 0:
        snr = -math.inf
    else:
        snr = 10 * math.log10(signal / noise)
    return QuantError(name, scheme, tuple(w.shape), err.abs().max().item() if err.numel() else 0.0,
                      err.abs().mean().item() if err.numel() else 0.0, snr)


# ---------------------------------------------------------------------------------------------
# QuantLinear and quantize_model
# ---------------------------------------------------------------------------------------------

def check_quant_linear(layer: "QuantLinear", x: torch.Tensor):
    _check_input(x)
    if x.shape[-1] != layer.in_features:
        raise ValueError(f"x must have last dimension in_features={layer.in_features}, got {tuple(x.shape)}")


def quant_linear_reference(layer: "QuantLinear", x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b with the whole weight dequantized; with FP8 activations x is first rounded to
    FP8 and back, the gradient passing straight through the rounding."""
    if layer.fp8_activations:
        with torch.no_grad():
            rounded = dequantize_fp8_activation(*quantize_fp8_activation(x, layer.block_size), layer.block_size,
                                                x.dtype)
        x = x + (rounded - x).detach() if x.requires_grad else rounded
    return F.linear(x, layer.dequantize_weight(x.dtype), bias)


def _check_input(x: torch.Tensor):
    """A quantized layer computes in its input's dtype: an integer input would dequantize the
    weight to integers (all zeros), so it is refused. Only the dtype is read: no device sync."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dtype == FP8_DTYPE:
        raise TypeError(f"x must be a float16/bfloat16/float32 tensor (the activations), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}; token ids go through an embedding first")


class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized and dequantized on the fly in forward.

    Buffers by scheme (names follow the checkpoints that use them, so an FP8 DeepSeek-V3
    checkpoint's `weight` + `weight_scale_inv` load straight into a scheme="fp8" layer):
        int8 / int8-asym: weight int8 [N, K], weight_scale [N] or [], weight_zero_point (asym)
        int4:             weight uint8 [N, K // 2], weight_scale [N, K // group_size]
        fp8:              weight float8_e4m3fn [N, K], weight_scale_inv [ceil(N/bs), ceil(K/bs)]
    The quantized weight is a buffer, not a parameter: it is frozen by construction (QLoRA
    trains adapters on top of it). `bias`, if any, stays a float parameter.

    fp8_activations=True (scheme "fp8" only) also rounds the input to FP8 with one scale per
    128 values, as DeepSeek-V3's FP8 linear layers do (W8A8); on a GPU, inference then runs the
    FP8 x FP8 block-scaled GEMM. The default keeps activations in their own dtype (weight-only).
    """

    def __init__(self, in_features: int, out_features: int, scheme: str, bias: bool = True, *,
                 group_size: int = 128, block_size: int = 128, per_channel: bool = True,
                 fp8_activations: bool = False, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
        if fp8_activations and scheme != "fp8":
            raise ValueError(f"fp8_activations=True needs scheme='fp8', got scheme={scheme!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.group_size, self.block_size, self.per_channel = group_size, block_size, per_channel
        self.fp8_activations = fp8_activations
        n, k = out_features, in_features
        empty = dict(device=device)
        if scheme in ("int8", "int8-asym"):
            scale_shape = (n,) if per_channel else ()
            self.register_buffer("weight", torch.zeros(n, k, dtype=torch.int8, **empty))
            self.register_buffer("weight_scale", torch.ones(scale_shape, **empty))
            if scheme == "int8-asym":
                self.register_buffer("weight_zero_point", torch.zeros(scale_shape, dtype=torch.int32, **empty))
        elif scheme == "int4":
            _check_group_size(group_size, k, "in_features")
            self.register_buffer("weight", torch.zeros(n, k // 2, dtype=torch.uint8, **empty))
            self.register_buffer("weight_scale", torch.ones(n, k // group_size, **empty))
        else:
            _check_block_size(block_size)
            self.register_buffer("weight", torch.zeros(n, k, dtype=FP8_DTYPE, **empty))
            self.register_buffer("weight_scale_inv",
                                 torch.ones(-(-n // block_size), -(-k // block_size), **empty))
        self.bias = nn.Parameter(torch.zeros(n, dtype=dtype, **empty)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str, **kwargs) -> "QuantLinear":
        """Quantize an existing nn.Linear (its weight is copied, the original is left untouched)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"linear must be an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, scheme, linear.bias is not None,
                    dtype=w.dtype, device=w.device, **kwargs)
        layer.set_weight(w)
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.detach())
        return layer

    @torch.no_grad()
    def set_weight(self, w: torch.Tensor):
        """Quantize a float [out_features, in_features] weight into this layer's buffers."""
        if tuple(w.shape) != (self.out_features, self.in_features):
            raise ValueError(f"w must have shape ({self.out_features}, {self.in_features}), got {tuple(w.shape)}")
        if self.scheme in ("int8", "int8-asym"):
            q, scale, zp = quantize_int8(w, per_channel=self.per_channel, symmetric=self.scheme == "int8")
            self.weight.copy_(q)
            self.weight_scale.copy_(scale)
            if zp is not None:
                self.weight_zero_point.copy_(zp)
        elif self.scheme == "int4":
            packed, scales = quantize_int4(w, self.group_size)
            self.weight.copy_(packed)
            self.weight_scale.copy_(scales)
        else:
            w_fp8, scale_inv = quantize_fp8_block(w, self.block_size)
            self.weight.copy_(w_fp8)
            self.weight_scale_inv.copy_(scale_inv)

    def dequantize_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [out_features, in_features] this layer computes with."""
        if self.scheme in ("int8", "int8-asym"):
            return dequantize_int8(self.weight, self.weight_scale, getattr(self, "weight_zero_point", None), dtype)
        if self.scheme == "int4":
            return dequantize_int4(self.weight, self.weight_scale, self.group_size, dtype)
        return dequantize_fp8_block(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.quant_linear(self, x)

    def _apply(self, fn, recurse=True):
        # model.half() / .to(torch.bfloat16) would also cast the codes (float8 counts as a float
        # dtype) and the float32 scales: let them follow device moves but keep their dtype
        saved = {name: b for name, b in self._buffers.items() if b is not None}
        super()._apply(fn, recurse)
        for name, old in saved.items():
            if self._buffers[name].dtype != old.dtype:
                self._buffers[name] = old.to(self._buffers[name].device)
        return self

    def extra_repr(self) -> str:
        detail = {"int4": f", group_size={self.group_size}",
                  "fp8": f", block_size={self.block_size}, fp8_activations={self.fp8_activations}"}
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme}{detail.get(self.scheme, '')}, bias={self.bias is not None}")


class QuantExperts(nn.Module):
    """MoE routed experts (`moe.Experts`: stacked gate_proj, up_proj [E, I, D], down_proj [E, D, I])
    with each expert's three matrices quantized on their own, as DeepSeek-V3 checkpoints store
    them (per-expert `weight` + `weight_scale_inv`). Forward dequantizes and runs the same
    routed-experts computation as the float module.

    `gate_projs[e]` is expert e's gate projection (a QuantLinear), and so on. The plural names
    keep LoRA targets such as "gate_proj" from matching these lists: like the float Experts,
    the routed experts are not a LoRA target here."""

    def __init__(self, experts: nn.Module, scheme: str, **kwargs):
        super().__init__()
        for name in ("gate_proj", "up_proj", "down_proj"):
            stacked = getattr(experts, name).detach()
            layers = []
            for w in stacked:  # one [out, in] matrix per expert
                layer = QuantLinear(w.shape[1], w.shape[0], scheme, bias=False, device=w.device, **kwargs)
                layer.set_weight(w)
                layers.append(layer)
            setattr(self, name + "s", nn.ModuleList(layers))
        self.scheme = scheme

    def dequantize_weights(self, dtype: torch.dtype = torch.float32):
        """(gate_proj, up_proj, down_proj) as stacked float tensors, like moe.Experts holds them."""
        return tuple(torch.stack([layer.dequantize_weight(dtype) for layer in layers])
                     for layers in (self.gate_projs, self.up_projs, self.down_projs))

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        _check_input(x)
        return ops.routed_experts(x, topk_idx, topk_weight, *self.dequantize_weights(x.dtype))


def quantize_model(model: nn.Module, scheme: str, *, group_size: int = 128, block_size: int = 128,
                   per_channel: bool = True, skip=(), experts: bool = True,
                   fp8_activations: bool = False) -> list[QuantError]:
    """Replace every nn.Linear in `model` (in place) by a QuantLinear of `scheme`, and (with
    experts=True) every stacked `moe.Experts` by a QuantExperts, except modules whose name
    matches `skip` (names or suffixes, e.g. ["lm_head"]). Returns one QuantError per quantized
    weight: max/mean absolute error and SNR of the dequantized weight (for experts, one per
    stacked tensor, named '<module>.gate_proj' etc.). fp8_activations: see QuantLinear."""
    from deepseek_mini.moe import Experts

    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if fp8_activations and scheme != "fp8":
        raise ValueError(f"fp8_activations=True needs scheme='fp8', got scheme={scheme!r}")
    skip = check_names("skip", skip)
    if scheme == "int4":
        _check_group_value(group_size)
    if scheme == "fp8":
        _check_block_size(block_size)
    kinds = (nn.Linear, Experts) if experts else (nn.Linear,)
    if isinstance(model, kinds):
        raise TypeError("model is itself the layer to quantize; use QuantLinear.from_linear(model, scheme)")
    targets = find_modules(model, lambda name, m: isinstance(m, kinds) and not name_matches(name, skip))
    if scheme == "int4":  # fail before changing anything
        for name, m in targets:
            widths = [m.in_features] if isinstance(m, nn.Linear) else [m.gate_proj.shape[2], m.down_proj.shape[2]]
            if any(k % group_size for k in widths):
                raise ValueError(f"layer {name!r} has in_features={widths[0] if len(widths) == 1 else widths}, "
                                 f"not divisible by group_size={group_size}; pass skip=[{name!r}] or another group_size")
    options = dict(group_size=group_size, block_size=block_size, per_channel=per_channel)
    report = []
    for name, module in targets:
        if isinstance(module, nn.Linear):
            new = QuantLinear.from_linear(module, scheme, fp8_activations=fp8_activations, **options)
            report.append(quantization_error(module.weight.detach(), new.dequantize_weight(), name, scheme))
        else:
            new = QuantExperts(module, scheme, **options)
            for tensor_name, w_hat in zip(("gate_proj", "up_proj", "down_proj"), new.dequantize_weights()):
                w = getattr(module, tensor_name).detach()
                report.append(quantization_error(w, w_hat, f"{name}.{tensor_name}", scheme))
        replace_module(model, name, new)
    return report


# Imported last: ops imports this module, and modules that import names from this one.
from deepseek_mini import ops  # noqa: E402
