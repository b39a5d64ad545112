"""The two small building blocks every DeepSeek block uses: RMSNorm and the SwiGLU MLP.

The functions (`rms_norm`, `swiglu`) are the reference math; fused Triton kernels in
`deepseek_mini/kernels/` are tested against them.
"""

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini.kernels._checks import fusable


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    Computed in float32 and cast back, as DeepSeek-V3 and transformers do, so that bf16/fp16
    inputs do not lose the small mean-square.
    """
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")
    if fusable(x, weight):  # CUDA -> the fused kernel in deepseek_mini/kernels/rmsnorm.py
        from deepseek_mini.kernels.rmsnorm import rms_norm as fused_rms_norm
        return fused_rms_norm(x, weight, eps)
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))  # float32 at least; float64 stays float64 (gradcheck)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up (the gated half of the MLP)."""
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")
    if fusable(gate, up) and gate.dtype == up.dtype:  # CUDA -> deepseek_mini/kernels/swiglu.py
        from deepseek_mini.kernels.swiglu import swiglu as fused_swiglu
        return fused_swiglu(gate, up)
    return F.silu(gate) * up


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x)). Dense layers and each expert use it."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x)))
