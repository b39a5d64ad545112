"""Attention, from the plain formula to DeepSeek's Multi-head Latent Attention (MLA).

Read top to bottom:
  1. `scaled_dot_product_attention`: softmax(q k^T * scale + mask) v, with causal and
     sliding-window masks and grouped-query heads (GQA/MQA). Every other piece calls it, and the
     fused flash-attention / MLA-decode kernels are tested against it.
  2. `KVCache`: what generation keeps from earlier tokens so each new token costs one step.
     `Attend`: the formula as a module, so a forward hook sees each layer's q and k
     (`viz.AttentionWeights` records attention weights that way).
  3. `MultiHeadAttention`: MHA / GQA / MQA with RoPE and an optional sliding window.
  4. `MultiHeadLatentAttention`: DeepSeek-V2/V3 MLA. Keys and values are rebuilt from a small
     latent vector per token. Two equivalent ways to run it:
       naive    - expand the latent into per-head K and V and cache those (big cache);
       absorbed - fold the key up-projection into the query and the value up-projection into
                  the output, so attention runs directly on the latent: the cache holds only the
                  latent and the shared RoPE key (DeepSeek-V2 paper, section 2.1.3).
  5. `kv_cache_bytes_per_token`: how much memory each scheme needs per generated token.
"""

import torch
import torch.nn.functional as F
from torch import nn

from deepseek_mini import ops
from deepseek_mini.layers import RMSNorm
from deepseek_mini.rope import apply_rope


# ----------------------------------------------------------------------------------------------
# 1. The reference formula
# ----------------------------------------------------------------------------------------------

def attention_mask(q_len: int, k_len: int, *, causal: bool = True, window: int | None = None,
                   device=None) -> torch.Tensor | None:
    """Boolean [q_len, k_len] mask, True where a query may look at a key (None = see all).

    Queries are the LAST q_len of the k_len positions (earlier ones came from a KV cache), so
    query row i sits at absolute position k_len - q_len + i.
    """
    if not causal and window is None:
        return None
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]
    k_pos = torch.arange(k_len, device=device)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (k_pos > q_pos - window)
    return allowed


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
                                 causal: bool = True, window: int | None = None,
                                 scale: float | None = None, return_weights: bool = False):
    """softmax(q k^T * scale, masked) v.

    q [B, Hq, S, D]; k [B, Hkv, T, D]; v [B, Hkv, T, Dv]; T >= S, the queries being the last S
    positions. Hq must be a multiple of Hkv: query head h uses key/value head h // (Hq // Hkv)
    (GQA; Hkv = 1 is MQA). `window=W`: the query at position i sees keys i-W < j <= i.
    `scale` defaults to 1/sqrt(D). Returns out [B, Hq, S, Dv] (and the weights [B, Hq, S, T] if
    `return_weights`). The softmax runs in (at least) float32.

    Runs through ops.attention: flash attention on CUDA, `attention_reference` below on CPU.
    """
    return ops.attention(q, k, v, causal=causal, window=window, scale=scale, return_weights=return_weights)


def check_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, window: int | None):
    """Raise a clear error unless q, k, v fit the contract of scaled_dot_product_attention."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"scaled_dot_product_attention: {name} must be 4-D [batch, heads, seq, dim], "
                             f"got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"scaled_dot_product_attention: {name} must be a floating tensor, got {t.dtype}")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"scaled_dot_product_attention: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    B, Hq, S, D = q.shape
    if k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"scaled_dot_product_attention: k has shape {tuple(k.shape)}, expected "
                         f"[{B}, Hkv, T, {D}] (batch and head dim of q {tuple(q.shape)})")
    Hkv, T = k.shape[1], k.shape[2]
    if v.shape[:3] != (B, Hkv, T):
        raise ValueError(f"scaled_dot_product_attention: v has shape {tuple(v.shape)}, expected "
                         f"[{B}, {Hkv}, {T}, Dv] to match k {tuple(k.shape)}")
    if Hq % Hkv:
        raise ValueError(f"scaled_dot_product_attention: query heads ({Hq}) must be a multiple of "
                         f"key/value heads ({Hkv})")
    if T < S:
        raise ValueError(f"scaled_dot_product_attention: k has {T} positions, fewer than the {S} queries")
    if window is not None:
        if not causal:
            raise ValueError("scaled_dot_product_attention: window needs causal=True (it looks back only)")
        if int(window) != window or window < 1:
            raise ValueError(f"scaled_dot_product_attention: window must be a positive int, got {window!r}")


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        window: int | None = None, scale: float, return_weights: bool = False):
    """The math of scaled_dot_product_attention (inputs already checked, scale given)."""
    Hq, S, T = q.shape[1], q.shape[2], k.shape[2]
    Hkv = k.shape[1]
    # GQA/MQA: each key/value head serves a group of consecutive query heads.
    if Hkv != Hq:
        k = k.repeat_interleave(Hq // Hkv, dim=1)
        v = v.repeat_interleave(Hq // Hkv, dim=1)

    scores = (q @ k.transpose(-2, -1)) * scale
    mask = attention_mask(S, T, causal=causal, window=window, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    # float32 at least, so bf16/fp16 do not lose the small weights (float64 stays float64)
    weights = F.softmax(scores, dim=-1, dtype=torch.promote_types(q.dtype, torch.float32)).to(q.dtype)
    out = weights @ v
    return (out, weights) if return_weights else out


# ----------------------------------------------------------------------------------------------
# 2. KV cache
# ----------------------------------------------------------------------------------------------

class KVCache:
    """The tensors attention layers keep from earlier tokens, one tuple per layer.

    Each layer decides what it stores (K and V for MHA and naive MLA; the latent and the RoPE
    key for absorbed MLA); all are [batch, heads, seq, dim] and grow along seq.
    """

    def __init__(self):
        self.layers: dict[int, tuple[torch.Tensor, ...]] = {}

    def update(self, layer_idx: int, *new: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Append the new positions of `layer_idx` and return everything cached so far."""
        old = self.layers.get(layer_idx)
        if old is not None:
            if len(old) != len(new):
                raise ValueError(f"KVCache.update: layer {layer_idx} caches {len(old)} tensors, got {len(new)}")
            new = tuple(torch.cat((o, n), dim=-2) for o, n in zip(old, new))
        self.layers[layer_idx] = tuple(new)
        return self.layers[layer_idx]

    def seq_len(self, layer_idx: int = 0) -> int:
        """How many positions layer `layer_idx` holds (0 when empty)."""
        cached = self.layers.get(layer_idx)
        return 0 if cached is None else cached[0].shape[-2]

    def nbytes(self) -> int:
        """Memory held by the cache, in bytes."""
        return sum(t.numel() * t.element_size() for ts in self.layers.values() for t in ts)


class Attend(nn.Module):
    """`scaled_dot_product_attention` as a module without parameters. The attention layers call
    it, so a forward hook on it receives their q, k, v and options: enough to compute the
    attention weights for a plot, while the forward itself never forms them on the fused path."""

    def forward(self, q, k, v, *, causal: bool = True, window: int | None = None, scale: float | None = None):
        return scaled_dot_product_attention(q, k, v, causal=causal, window=window, scale=scale)

    def weights(self, q, k, v, *, causal: bool = True, window: int | None = None, scale: float | None = None):
        """The attention weights [B, H, S, T] of a call with these arguments (reference formula)."""
        return scaled_dot_product_attention(q, k, v, causal=causal, window=window, scale=scale, return_weights=True)[1]


class LatentAttend(Attend):
    """Absorbed MLA's attention (`ops.latent_attention`) as a module: queries [q_latent, q_rope]
    over keys [kv_latent, k_rope] whose values are kv_latent. A hook sees the latent inputs, and
    `weights` rebuilds the weights even when a GPU ran the one-token decode kernel, which forms none."""

    def forward(self, q_latent, q_rope, kv_latent, k_rope, *, scale: float):
        return ops.latent_attention(q_latent, q_rope, kv_latent, k_rope, scale=scale)

    def weights(self, q_latent, q_rope, kv_latent, k_rope, *, scale: float):
        q, k = torch.cat((q_latent, q_rope), dim=-1), torch.cat((kv_latent, k_rope), dim=-1)
        return super().weights(q, k, kv_latent, causal=True, scale=scale)


# ----------------------------------------------------------------------------------------------
# 3. Multi-head / grouped-query / multi-query attention
# ----------------------------------------------------------------------------------------------

class MultiHeadAttention(nn.Module):
    """Standard attention with n_kv_heads key/value heads: = n_heads (MHA), fewer (GQA), 1 (MQA).

    RoPE is applied to q and k when `cos`/`sin` (rows for the positions of x) are given.
    `window` turns on sliding-window attention.
    """

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int | None = None, head_dim: int | None = None,
                 window: int | None = None, bias: bool = False, rope_interleaved: bool = False):
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_heads % n_kv_heads:
            raise ValueError(f"MultiHeadAttention: n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if head_dim is None:
            if dim % n_heads:
                raise ValueError(f"MultiHeadAttention: dim ({dim}) must be divisible by n_heads ({n_heads})")
            head_dim = dim // n_heads
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, head_dim
        self.window, self.rope_interleaved = window, rope_interleaved
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias)
        self.attend = Attend()

    def forward(self, x: torch.Tensor, cos: torch.Tensor | None = None, sin: torch.Tensor | None = None,
                cache: KVCache | None = None, layer_idx: int = 0) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"MultiHeadAttention: x must be [batch, seq, dim], got shape {tuple(x.shape)}")
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if cos is not None:
            q = apply_rope(q, cos, sin, self.rope_interleaved)
            k = apply_rope(k, cos, sin, self.rope_interleaved)
        if cache is not None:
            k, v = cache.update(layer_idx, k, v)
        out = self.attend(q, k, v, causal=True, window=self.window)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, -1))


# ----------------------------------------------------------------------------------------------
# 4. Multi-head Latent Attention
# ----------------------------------------------------------------------------------------------

class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2/V3 MLA, with Hugging Face's parameter names.

    Per token x:
      query:  q = q_b_proj(norm(q_a_proj(x)))  (or q_proj(x) when q_lora_rank is None),
              split per head into q_nope [qk_nope_head_dim] and q_pe [qk_rope_head_dim].
      kv:     [c_kv, k_pe] = kv_a_proj_with_mqa(x); c_kv (kv_lora_rank) is normalised, and
              kv_b_proj(c_kv) gives each head its k_nope [qk_nope_head_dim] and v [v_head_dim].
              k_pe is ONE RoPE key shared by all heads (decoupled RoPE).
      score:  (q_nope . k_nope + rope(q_pe) . rope(k_pe)) * softmax_scale.
    `absorb=True` runs the same math on the latent (see module docstring).
    """

    def __init__(self, dim: int, n_heads: int, kv_lora_rank: int, qk_nope_head_dim: int,
                 qk_rope_head_dim: int, v_head_dim: int, q_lora_rank: int | None = None,
                 softmax_scale: float | None = None, rope_interleaved: bool = True, bias: bool = False,
                 absorb: bool = False):
        super().__init__()
        self.n_heads, self.kv_lora_rank, self.q_lora_rank = n_heads, kv_lora_rank, q_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5 if softmax_scale is None else softmax_scale
        self.rope_interleaved, self.absorb = rope_interleaved, absorb

        if q_lora_rank is None:
            self.q_proj = nn.Linear(dim, n_heads * self.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(dim, q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(q_lora_rank)  # eps 1e-6 as in HF, whatever rms_norm_eps is
            self.q_b_proj = nn.Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(kv_lora_rank)
        self.kv_b_proj = nn.Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.o_proj = nn.Linear(n_heads * v_head_dim, dim, bias=bias)
        self.attend, self.attend_latent = Attend(), LatentAttend()

    def project_q(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, dim] -> q_nope [B, H, S, nope], q_pe [B, H, S, rope] (before RoPE)."""
        B, S, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, S, self.n_heads, self.qk_head_dim).transpose(1, 2)
        return q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)

    def project_kv_latent(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, dim] -> normalised latent c_kv [B, 1, S, kv_lora_rank], k_pe [B, 1, S, rope]."""
        B, S, _ = x.shape
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)
        return c_kv.view(B, 1, S, self.kv_lora_rank), k_pe.view(B, 1, S, self.qk_rope_head_dim)

    def up_projections(self) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj split per head: W_UK [H, nope, rank] and W_UV [H, v, rank]."""
        if not isinstance(self.kv_b_proj, nn.Linear):
            raise TypeError(f"absorbed MLA needs kv_b_proj to be a plain nn.Linear, got "
                            f"{type(self.kv_b_proj).__name__} (merge adapters first)")
        w = self.kv_b_proj.weight.view(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        return w[:, : self.qk_nope_head_dim], w[:, self.qk_nope_head_dim:]

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: KVCache | None = None,
                layer_idx: int = 0, absorb: bool | None = None) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"MultiHeadLatentAttention: x must be [batch, seq, dim], got shape {tuple(x.shape)}")
        absorb = self.absorb if absorb is None else absorb
        B, S, _ = x.shape
        q_nope, q_pe = self.project_q(x)
        c_kv, k_pe = self.project_kv_latent(x)
        q_pe = apply_rope(q_pe, cos, sin, self.rope_interleaved)
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleaved)

        if not absorb:
            # Naive: rebuild every head's key and value, cache them, attend as usual.
            kv = self.kv_b_proj(c_kv[:, 0]).view(B, S, self.n_heads, -1).transpose(1, 2)
            k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat((k_nope, k_pe.expand(-1, self.n_heads, -1, -1)), dim=-1)
            q = torch.cat((q_nope, q_pe), dim=-1)
            if cache is not None:
                k, v = cache.update(layer_idx, k, v)
            out = self.attend(q, k, v, causal=True, scale=self.softmax_scale)
        else:
            # Absorbed: q_nope . (W_UK c) = (W_UK^T q_nope) . c, so move W_UK onto the query and
            # attend over the shared latent like multi-query attention with one kv head whose key
            # is [c_kv, k_pe] and whose value is c_kv; W_UV is applied after the weighted sum.
            if cache is not None:
                c_kv, k_pe = cache.update(layer_idx, c_kv, k_pe)
            w_uk, w_uv = self.up_projections()
            q_latent = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
            out = self.attend_latent(q_latent, q_pe, c_kv, k_pe, scale=self.softmax_scale)
            out = torch.einsum("bhsr,hvr->bhsv", out, w_uv)
        return self.o_proj(out.transpose(1, 2).reshape(B, S, self.n_heads * self.v_head_dim))


# ----------------------------------------------------------------------------------------------
# 5. KV-cache size
# ----------------------------------------------------------------------------------------------

def kv_cache_bytes_per_token(kind: str, *, n_layers: int, n_heads: int | None = None,
                             n_kv_heads: int | None = None, k_head_dim: int | None = None,
                             v_head_dim: int | None = None, kv_lora_rank: int | None = None,
                             qk_rope_head_dim: int | None = None, bytes_per_value: int = 2) -> int:
    """Bytes the KV cache grows by for each token, over all layers.

    kind: "mha" (every head's K and V), "gqa" (n_kv_heads shared K/V heads), "mqa" (one),
          "mla" (absorbed MLA: the latent plus the shared RoPE key).
    bytes_per_value: 2 for bf16/fp16, 1 for fp8, 4 for fp32.
    """
    def need(**kw):
        missing = [k for k, val in kw.items() if val is None]
        if missing:
            raise ValueError(f"kv_cache_bytes_per_token({kind!r}) needs {missing}")

    if kind in ("mha", "gqa", "mqa"):
        need(n_heads=n_heads, k_head_dim=k_head_dim)
        v_head_dim = k_head_dim if v_head_dim is None else v_head_dim
        heads = {"mha": n_heads, "mqa": 1, "gqa": n_kv_heads}[kind]
        if heads is None:
            raise ValueError("kv_cache_bytes_per_token('gqa') needs n_kv_heads")
        per_layer = heads * (k_head_dim + v_head_dim)
    elif kind == "mla":
        need(kv_lora_rank=kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim)
        per_layer = kv_lora_rank + qk_rope_head_dim
    else:
        raise ValueError(f"kind must be one of 'mha', 'gqa', 'mqa', 'mla'; got {kind!r}")
    return n_layers * per_layer * bytes_per_value
