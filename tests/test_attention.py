"""The attention reference: masks, GQA/MQA grouping, sliding window, cache, gradients."""

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini.viz import AttentionWeights

from deepseek_mini.attention import (KVCache, MultiHeadAttention, attention_mask, kv_cache_bytes_per_token,
                                     scaled_dot_product_attention)
from deepseek_mini.rope import precompute_rope


def loop_reference(q, k, v, scale, window=None):
    """Attention one query at a time with explicit visible-key lists: independent of masks."""
    B, Hq, S, D = q.shape
    Hkv, T = k.shape[1], k.shape[2]
    out = torch.zeros(B, Hq, S, v.shape[-1], dtype=q.dtype)
    for h in range(Hq):
        kh = h // (Hq // Hkv)
        for i in range(S):
            pos = T - S + i
            lo = 0 if window is None else max(0, pos - window + 1)
            s = (q[:, h, i:i + 1] @ k[:, kh, lo:pos + 1].transpose(-1, -2)) * scale
            out[:, h, i] = (s.softmax(-1) @ v[:, kh, lo:pos + 1])[:, 0]
    return out


def test_causal_matches_torch_sdpa():
    q, k, v = (torch.randn(2, 4, 9, 16) for _ in range(3))
    ours = scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    ours = scaled_dot_product_attention(q, k, v, causal=False, scale=0.3)
    torch.testing.assert_close(ours, F.scaled_dot_product_attention(q, k, v, scale=0.3), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_gqa_mqa_window_and_cache_offset_match_loop(hq, hkv, window):
    S, T = 5, 8  # queries are the last 5 of 8 positions
    q = torch.randn(2, hq, S, 8, dtype=torch.float64)
    k, v = torch.randn(2, hkv, T, 8, dtype=torch.float64), torch.randn(2, hkv, T, 6, dtype=torch.float64)
    ours = scaled_dot_product_attention(q, k, v, window=window)
    torch.testing.assert_close(ours, loop_reference(q, k, v, 8 ** -0.5, window))


def test_sliding_window_equals_masked_reference():
    q, k, v = (torch.randn(1, 2, 10, 4) for _ in range(3))
    W = 4
    i, j = torch.arange(10)[:, None], torch.arange(10)[None]
    mask = (j <= i) & (j > i - W)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(scaled_dot_product_attention(q, k, v, window=W), expected, atol=1e-6, rtol=1e-5)
    out, w = scaled_dot_product_attention(q, k, v, window=W, return_weights=True)
    assert (w[..., ~mask] == 0).all() and torch.allclose(w.sum(-1), torch.ones(1, 2, 10))
    assert attention_mask(2, 5, window=2).tolist() == [[False, False, True, True, False],
                                                       [False, False, False, True, True]]


def test_gradcheck_float64():
    q = torch.randn(1, 4, 3, 4, dtype=torch.float64, requires_grad=True)
    k = torch.randn(1, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 2, 5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda q, k, v: scaled_dot_product_attention(q, k, v, window=2), (q, k, v))


@pytest.mark.parametrize("n_kv_heads,window", [(4, None), (2, None), (1, 3)])
def test_module_cached_decoding_equals_full_pass(n_kv_heads, window):
    attn = MultiHeadAttention(32, 4, n_kv_heads=n_kv_heads, window=window).double()
    cos, sin = precompute_rope(8, 16)
    x = torch.randn(2, 7, 32, dtype=torch.float64)
    full = attn(x, cos[:7], sin[:7])
    cache = KVCache()
    steps = [attn(x[:, :3], cos[:3], sin[:3], cache=cache)]
    for t in range(3, 7):
        steps.append(attn(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache))
    torch.testing.assert_close(torch.cat(steps, 1), full)
    assert cache.seq_len() == 7
    with AttentionWeights(attn) as attention:
        attn(x, cos[:7], sin[:7])
    assert attention.weights[0].shape == (2, 4, 7, 7)
    assert cache.nbytes() == 2 * 2 * n_kv_heads * 7 * 8 * 8  # (k, v) x batch x heads x seq x dim x 8 bytes


def test_bad_inputs_name_the_problem():
    q = torch.randn(1, 4, 3, 8)
    with pytest.raises(ValueError, match="multiple of key/value heads"):
        scaled_dot_product_attention(q, torch.randn(1, 3, 3, 8), torch.randn(1, 3, 3, 8))
    with pytest.raises(ValueError, match="k has shape"):
        scaled_dot_product_attention(q, torch.randn(1, 4, 3, 6), torch.randn(1, 4, 3, 8))
    with pytest.raises(ValueError, match="v has shape"):
        scaled_dot_product_attention(q, torch.randn(1, 4, 3, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="fewer than"):
        scaled_dot_product_attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8))
    with pytest.raises(ValueError, match="4-D"):
        scaled_dot_product_attention(q[0], q[0], q[0])
    with pytest.raises(TypeError, match="dtypes differ"):
        scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(ValueError, match="window"):
        scaled_dot_product_attention(q, q, q, window=0)
    with pytest.raises(ValueError, match="n_heads"):
        MultiHeadAttention(32, 4, n_kv_heads=3)


def test_kv_cache_bytes_formulas():
    # DeepSeek-V3: 61 layers, 128 heads, K 192 / V 128, latent 512 + rope key 64, bf16
    assert kv_cache_bytes_per_token("mha", n_layers=61, n_heads=128, k_head_dim=192, v_head_dim=128) == 61 * 128 * 320 * 2
    assert kv_cache_bytes_per_token("mla", n_layers=61, kv_lora_rank=512, qk_rope_head_dim=64) == 61 * 576 * 2
    assert kv_cache_bytes_per_token("gqa", n_layers=2, n_heads=8, n_kv_heads=2, k_head_dim=4) == 2 * 2 * 8 * 2
    with pytest.raises(ValueError, match="n_kv_heads"):
        kv_cache_bytes_per_token("gqa", n_layers=2, n_heads=8, k_head_dim=4)
    with pytest.raises(ValueError, match="kind must be"):
        kv_cache_bytes_per_token("mlaa", n_layers=2)


def test_kv_cache_refuses_a_different_number_of_tensors():
    cache = KVCache()
    k = torch.randn(1, 2, 3, 4)
    assert cache.seq_len(0) == 0
    cache.update(0, k, k)
    with pytest.raises(ValueError, match="caches 2 tensors, got 1"):
        cache.update(0, k)
