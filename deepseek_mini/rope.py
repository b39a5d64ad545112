"""Rotary position embeddings (RoPE), with the YaRN context extension DeepSeek-V2/V3 use.

RoPE encodes a token's position by rotating pairs of query/key features by an angle that grows
with the position: pair i turns by `pos * inv_freq[i]`, with `inv_freq[i] = theta^(-2i/d)`.
The dot product of a rotated query and a rotated key then depends only on their distance.

Two layouts of "pairs" exist and both are in use:
  * interleaved=True:  pairs are (x[0], x[1]), (x[2], x[3]), ...  (DeepSeek's own code, HF
    `rope_interleave=True` in DeepSeek-V3, always in DeepSeek-V2)
  * interleaved=False: pairs are (x[i], x[i + d/2])                (Llama / HF `rotate_half`)

YaRN (https://arxiv.org/abs/2309.00071) stretches a model trained on `original_max_position_embeddings`
tokens to `factor` times more: low-frequency pairs are interpolated (divided by `factor`),
high-frequency pairs kept, with a linear ramp between (`beta_fast`, `beta_slow` rotations).
It also rescales attention: cos/sin are multiplied by `yarn_attention_factor(scaling)` and the
softmax scale by `mscale^2` (see `softmax_scale`), exactly as Hugging Face transformers does.
"""

import math

import torch


# The keys a `scaling` dict (HF `rope_scaling` / `rope_parameters`) may carry. Anything else is
# refused rather than silently ignored, because it would change the math.
_YARN_KEYS = {
    "rope_type", "type", "rope_theta", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale", "mscale_all_dim", "attention_factor", "truncate",
}


def rope_type(scaling: dict | None) -> str:
    """'default' (plain RoPE) or 'yarn'; other HF rope types are not supported here."""
    if not scaling:
        return "default"
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"rope scaling type {kind!r} is not supported: expected 'default' or 'yarn'")
    if kind == "yarn":
        unknown = set(scaling) - _YARN_KEYS
        if unknown:
            raise ValueError(f"rope scaling: unsupported yarn field(s) {sorted(unknown)}; "
                             f"supported: {sorted(_YARN_KEYS)}")
        if "factor" not in scaling:
            raise ValueError("rope scaling: yarn needs 'factor'")
    return kind


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(scale) + 1 (1 when not stretched)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(scaling: dict | None) -> float:
    """The factor YaRN multiplies cos and sin by (1.0 without YaRN).

    With both `mscale` and `mscale_all_dim` set (as in DeepSeek-V3's config, where they are equal)
    it is their ratio; otherwise the plain YaRN temperature of `factor`.
    """
    if rope_type(scaling) != "yarn":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    factor = scaling["factor"]
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if mscale and mscale_all_dim:
        return yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    return yarn_get_mscale(factor)


def softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under YaRN (DeepSeek-V2/V3 MLA)."""
    scale = qk_head_dim ** -0.5
    if rope_type(scaling) == "yarn" and scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(scaling["factor"], scaling["mscale_all_dim"])
        scale = scale * m * m
    return scale


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None,
                  max_seq_len: int | None = None) -> torch.Tensor:
    """The rotation speed of each of the head_dim//2 pairs, [head_dim//2] float32."""
    if head_dim <= 0 or head_dim % 2:
        raise ValueError(f"head_dim must be a positive even number, got {head_dim}")
    pos_freqs = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq = 1.0 / pos_freqs
    if rope_type(scaling) == "default":
        return inv_freq

    factor = scaling["factor"]
    original_len = scaling.get("original_max_position_embeddings") or max_seq_len
    if original_len is None:
        raise ValueError("rope scaling: yarn needs 'original_max_position_embeddings'")
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    # The pair index at which a pair makes `num_rotations` full turns over the original length.
    def correction_dim(num_rotations):
        return head_dim * math.log(original_len / (num_rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # avoid dividing by zero in the ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = keep the original (fast) frequency, 0 = interpolate by `factor`
    return 1.0 / (factor * pos_freqs) * (1 - keep) + inv_freq * keep


def precompute_rope(head_dim: int, max_seq_len: int, theta: float = 10000.0,
                    scaling: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for positions 0..max_seq_len-1, each [max_seq_len, head_dim//2] float32.

    Under YaRN both already carry `yarn_attention_factor(scaling)`.
    """
    if max_seq_len <= 0:
        raise ValueError(f"max_seq_len must be positive, got {max_seq_len}")
    inv_freq = rope_inv_freq(head_dim, theta, scaling, max_seq_len)
    angles = torch.arange(max_seq_len, dtype=torch.float32)[:, None] * inv_freq[None, :]
    attention_factor = yarn_attention_factor(scaling)
    return angles.cos() * attention_factor, angles.sin() * attention_factor


def check_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    if x.dim() != 4:
        raise ValueError(f"apply_rope: x must be [batch, heads, seq, head_dim], got shape {tuple(x.shape)}")
    seq, head_dim = x.shape[2], x.shape[3]
    if head_dim % 2:
        raise ValueError(f"apply_rope: head_dim (last dim of x) must be even, got {head_dim}")
    for name, t in (("cos", cos), ("sin", sin)):
        if t.shape != (seq, head_dim // 2):
            raise ValueError(f"apply_rope: {name} has shape {tuple(t.shape)}, expected ({seq}, {head_dim // 2}) "
                             f"= (seq of x, head_dim//2)")


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by cos/sin [seq, head_dim//2] (the rows of x's positions).

    The result keeps x's layout and dtype (the rotation itself runs in at least float32).
    """
    head_dim = x.shape[3]
    dtype = x.dtype
    compute = torch.promote_types(dtype, torch.float32)  # float32 at least; float64 stays float64
    x, cos, sin = x.to(compute), cos.to(compute), sin.to(compute)
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    else:
        x1, x2 = x[..., : head_dim // 2], x[..., head_dim // 2:]
        out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """RoPE (see apply_rope_reference): the fused kernel on CUDA, the reference on CPU."""
    return ops.apply_rope(x, cos, sin, interleaved)


# Imported last: ops imports this module, and modules that import names from this one.
from deepseek_mini import ops  # noqa: E402
