"""Every op that has a fused Triton kernel, and the one place that decides which code runs it.

Layers call these unconditionally. Each op does the same three steps:

  1. check its input once, with the `check_*` function of the file that owns the math
     (clear errors that name the argument; kernels and references then trust their input);
  2. if `backend.use_triton(...)` (CUDA tensors, or forced; see backend.py) and the kernel's
     own `supports(...)` (next to the kernel, in deepseek_mini/kernels/) accepts the inputs,
     run the kernel;
  3. otherwise run the pure-PyTorch reference (`*_reference`, or the references of moe.py).

Kernel modules import triton, which is missing on some platforms, so they are imported only
once step 2 has chosen them. They are looked up as module attributes at call time, which lets
tests wrap a launcher (monkeypatch) and see it called.
"""

import torch

from deepseek_mini import attention as attention_math  # the module; `attention` below is the op
from deepseek_mini import backend, layers, lora, moe, quant, rope


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) * weight over the last dimension (layers.rms_norm_reference)."""
    layers.check_rms_norm(x, weight)
    if backend.use_triton(x, weight):
        from deepseek_mini.kernels import rmsnorm
        if rmsnorm.supports(x, weight):
            return rmsnorm.rms_norm(x, weight, eps)
    return layers.rms_norm_reference(x, weight, eps)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up (layers.swiglu_reference)."""
    layers.check_swiglu(gate, up)
    if backend.use_triton(gate, up):
        from deepseek_mini.kernels import swiglu as kernel
        if kernel.supports(gate, up):
            return kernel.swiglu(gate, up)
    return layers.swiglu_reference(gate, up)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate x [batch, heads, seq, head_dim] by cos/sin [seq, head_dim//2] (rope.apply_rope_reference)."""
    rope.check_rope(x, cos, sin)
    if backend.use_triton(x, cos, sin):
        from deepseek_mini.kernels import rope as kernel
        if kernel.supports(x, cos, sin):
            return kernel.apply_rope(x, cos, sin, interleaved)
    return rope.apply_rope_reference(x, cos, sin, interleaved)


def attention(q, k, v, *, causal=True, window=None, scale=None, return_weights=False):
    """softmax(q k^T * scale, masked) v; the contract of attention.scaled_dot_product_attention."""
    attention_math.check_attention(q, k, v, causal, window)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    # flash attention never forms the weights, so asking for them means the reference
    if not return_weights and backend.use_triton(q, k, v):
        from deepseek_mini.kernels import flash_attention
        if flash_attention.supports(q, k, v):
            return flash_attention.flash_attention(q, k, v, causal=causal, window=window, scale=scale)
    return attention_math.attention_reference(q, k, v, causal=causal, window=window, scale=scale,
                                              return_weights=return_weights)


def latent_attention(q_latent, q_rope, kv_latent, k_rope, *, scale: float, return_weights: bool = False):
    """Absorbed MLA: attention of queries [q_latent, q_rope] over keys [kv_latent, k_rope] whose
    values are kv_latent itself (one shared kv head). q_* [B, H, S, *]; kv_latent, k_rope
    [B, 1, T, *]. Returns o_latent [B, H, S, C] (and the weights with `return_weights`).

    One new token with no gradient (generation) on CUDA: the memory-bound decode kernel, which
    reads the cache once without concatenating it. Otherwise attention over the concatenation."""
    if (q_latent.shape[2] == 1 and not return_weights and not torch.is_grad_enabled()
            and backend.use_triton(q_latent, q_rope, kv_latent, k_rope)):
        from deepseek_mini.kernels import mla_decode
        if mla_decode.supports(q_latent, q_rope, kv_latent, k_rope):
            out = mla_decode.mla_decode(q_latent[:, :, 0], q_rope[:, :, 0], kv_latent[:, 0], k_rope[:, 0], scale=scale)
            return out[:, :, None]
    q = torch.cat((q_latent, q_rope), dim=-1)
    k = torch.cat((kv_latent, k_rope), dim=-1)
    return attention(q, k, kv_latent, causal=True, scale=scale, return_weights=return_weights)


def routed_experts(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj) -> torch.Tensor:
    """sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x[n]); the contract of moe.routed_experts.
    Off the kernel, the faster of two references. Measured on one CPU thread
    (benchmarks/bench_moe_cpu.py): the grouped one (one grouped matmul per projection) is 1.5-2x
    faster than the per-expert loop with gradients and at <= 64 rows per expert, but 0.75x on
    big batches without gradients, where the loop's per-expert matmuls are large."""
    moe.check_routed_experts(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj)
    weights = (gate_proj, up_proj, down_proj)
    if backend.use_triton(x, *weights):
        from deepseek_mini.kernels import fused_moe
        if fused_moe.supports(x, topk_idx, topk_weight, *weights):
            return fused_moe.fused_moe(x, topk_idx, topk_weight, *weights)
    wants_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (x, topk_weight, *weights))
    rows_per_expert = topk_idx.numel() / gate_proj.shape[0]
    if moe.grouped_supported(x, *weights) and (wants_grad or rows_per_expert <= 64):
        return moe.routed_experts_grouped(x, topk_idx, topk_weight, *weights)
    return moe.routed_experts_loop(x, topk_idx, topk_weight, *weights)


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T, never forming B A; the contract of lora.lora_linear."""
    lora.check_lora_linear(weight, lora_A, lora_B)
    if backend.use_triton(x):
        from deepseek_mini.kernels import fused_lora
        if fused_lora.supports(x, weight, bias, lora_A, lora_B):
            return fused_lora.fused_lora_linear(x, weight, bias, lora_A, lora_B, scaling)
    return lora.lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)


def quant_linear(layer: "quant.QuantLinear", x: torch.Tensor) -> torch.Tensor:
    """What a QuantLinear computes: x W^T + b with W its dequantized weight (and x rounded to FP8
    with `fp8_activations`). The kernels dequantize tile by tile in registers, never the whole weight."""
    quant.check_quant_linear(layer, x)
    bias = None if layer.bias is None else layer.bias.to(x.dtype)
    wants_grad = torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad))
    if backend.use_triton(x):
        from deepseek_mini.kernels import quant_matmul
        if quant_matmul.supports(x, fp8_activations=layer.fp8_activations, wants_grad=wants_grad):
            return quant_matmul.quant_linear(layer, x.contiguous(), bias)
    return quant.quant_linear_reference(layer, x, bias)

