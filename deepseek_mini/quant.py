"""Weight quantization of models: layers that keep int8 / int4 / FP8 weights, and the swap.

The number formats themselves (the table below; quantize, dequantize, int4 packing) live in
`quant_formats.py` and are re-exported here:

    scheme      code                          scales                           error per weight
    int8        int8 in [-127, 127]           one per row (or per tensor)      <= scale / 2
    int8-asym   int8 in [-128, 127]           one scale + zero point per row   <= scale / 2
    int4        4-bit in [-8, 7], 2 per byte  one per `group_size` columns     <= scale / 2
    fp8         float8_e4m3fn                 one per 128x128 block            <= 2^-4 |w| (relative)

`QuantLinear` keeps a quantized weight and dequantizes it on the fly in `forward`
(`QuantExperts` does the same for stacked MoE experts); `quantize_model` swaps a model's
layers for them and reports the error of each.
"""

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.quant_formats import (  # noqa: F401 (re-exported: the formats are public here too)
    FP8_DTYPE, FP8_MAX, SCHEMES, _check_block_size, _check_group_size, _check_group_value, dequantize_fp8_activation,
    dequantize_fp8_block, dequantize_fp8_state_dict, dequantize_int4, dequantize_int8, pack_int4,
    quantize_fp8_activation, quantize_fp8_block, quantize_int4, quantize_int8, unpack_int4,
)
from deepseek_mini.surgery import check_names, find_modules, name_matches, replace_module  # noqa: F401 (name_matches: public here too)


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
