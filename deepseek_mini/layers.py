"""The two small building blocks every DeepSeek block uses: RMSNorm and the SwiGLU MLP.

`rms_norm_reference` and `swiglu_reference` are the math; fused Triton kernels in
`deepseek_mini/kernels/` are tested against them. `rms_norm` and `swiglu` check their input
and run through `deepseek_mini.ops`, which picks the kernel (CUDA) or the reference (CPU).
"""

import torch
import torch.nn.functional as F
from torch import nn


def check_rms_norm(x: torch.Tensor, weight: torch.Tensor):
    if weight.shape != x.shape[-1:]:
        raise ValueError(f"rms_norm: weight has shape {tuple(weight.shape)}, expected ({x.shape[-1]},) "
                         f"to match the last dimension of x {tuple(x.shape)}")


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """y = x / sqrt(mean(x^2) + eps) * weight, over the last dimension.

    Computed in float32 and cast back, as DeepSeek-V3 and transformers do, so that bf16/fp16
    inputs do not lose the small mean-square.
    """
    dtype = x.dtype
    x = x.to(torch.promote_types(dtype, torch.float32))  # float32 at least; float64 stays float64 (gradcheck)
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x.to(dtype)


def check_swiglu(gate: torch.Tensor, up: torch.Tensor):
    if gate.shape != up.shape:
        raise ValueError(f"swiglu: gate {tuple(gate.shape)} and up {tuple(up.shape)} must have the same shape")


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU activation: silu(gate) * up (the gated half of the MLP)."""
    return F.silu(gate) * up


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm (see rms_norm_reference): the fused kernel on CUDA, the reference on CPU."""
    return ops.rms_norm(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (see swiglu_reference): the fused kernel on CUDA, the reference on CPU."""
    return ops.swiglu(gate, up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class MLP(nn.Module):
    """Gated feed-forward: down(silu(gate(x)) * up(x)). Dense layers and each expert use it."""

    def __init__(self, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, inter_dim, bias=False)
        self.up_proj = nn.Linear(dim, inter_dim, bias=False)
        self.down_proj = nn.Linear(inter_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.swiglu(self.gate_proj(x), self.up_proj(x)))


# Imported last: ops imports this module, and modules that import names from this one.
from deepseek_mini import ops  # noqa: E402
