"""Multi-head Latent Attention: absorbed == naive, cached decoding == full pass (both forms),
what each form caches, gradients (gradcheck in float64), and the module against transformers'."""

import pytest
import torch

from deepseek_mini.attention import KVCache, MultiHeadLatentAttention
from deepseek_mini.rope import precompute_rope
from deepseek_mini.viz import AttentionWeights

DIMS = dict(dim=32, n_heads=4, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5)


def make(q_lora_rank=10, dtype=torch.float64, **kw):
    mla = MultiHeadLatentAttention(**{**DIMS, **kw}, q_lora_rank=q_lora_rank).to(dtype)
    with torch.no_grad():
        for p in mla.parameters():
            p.normal_(0, 0.3) if p.dim() > 1 else p.uniform_(0.5, 1.5)
    return mla


@pytest.mark.parametrize("q_lora_rank", [None, 10])
@pytest.mark.parametrize("interleaved", [True, False])
def test_absorbed_equals_naive(q_lora_rank, interleaved):
    mla = make(q_lora_rank, rope_interleaved=interleaved, softmax_scale=0.37)
    cos, sin = precompute_rope(4, 11)
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    torch.testing.assert_close(mla(x, cos, sin, absorb=True), mla(x, cos, sin, absorb=False), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_decoding_equals_full_pass_and_cache_contents(absorb):
    mla = make()
    cos, sin = precompute_rope(4, 9)
    x = torch.randn(2, 9, 32, dtype=torch.float64)
    full = mla(x, cos, sin, absorb=absorb)
    cache = KVCache()
    outs = [mla(x[:, :4], cos[:4], sin[:4], cache=cache, absorb=absorb)]
    for t in range(4, 9):
        outs.append(mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache, absorb=absorb))
    torch.testing.assert_close(torch.cat(outs, 1), full, atol=1e-12, rtol=1e-10)
    shapes = [tuple(t.shape) for t in cache.layers[0]]
    if absorb:  # only the latent and the shared rope key: (12 + 4) values per token
        assert shapes == [(2, 1, 9, 12), (2, 1, 9, 4)]
    else:  # every head's key (6 + 4) and value (5)
        assert shapes == [(2, 4, 9, 10), (2, 4, 9, 5)]


def test_gradcheck_float64_both_forms():
    mla = make(q_lora_rank=None, dim=8, n_heads=2, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2)
    cos, sin = precompute_rope(2, 3)
    x = torch.randn(1, 3, 8, dtype=torch.float64, requires_grad=True)
    for absorb in (False, True):
        assert torch.autograd.gradcheck(lambda x: mla(x, cos, sin, absorb=absorb), (x,))
    # parameter gradients flow through the absorbed path too (it reads kv_b_proj.weight directly)
    mla(x, cos, sin, absorb=True).sum().backward()
    assert mla.kv_b_proj.weight.grad is not None and mla.kv_b_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_module_matches_transformers_attention(q_lora_rank):
    transformers = pytest.importorskip("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

    cfg = transformers.DeepseekV3Config(hidden_size=32, num_attention_heads=4, num_key_value_heads=4,
                                        kv_lora_rank=12, q_lora_rank=q_lora_rank, qk_nope_head_dim=6,
                                        qk_rope_head_dim=4, v_head_dim=5, rope_interleave=True)
    cfg._attn_implementation = "eager"
    hf = DeepseekV3Attention(cfg, layer_idx=0).eval()
    ours = make(q_lora_rank, dtype=torch.float32)
    hf.load_state_dict(ours.state_dict())
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)[None]
    hf_cos, hf_sin = DeepseekV3RotaryEmbedding(cfg)(x, pos)
    mask = torch.full((7, 7), float("-inf")).triu(1)[None, None]
    expected, _ = hf(x, (hf_cos, hf_sin), mask)
    cos, sin = precompute_rope(4, 7)
    for absorb in (False, True):
        torch.testing.assert_close(ours(x, cos, sin, absorb=absorb), expected, atol=1e-5, rtol=1e-5)


def test_bad_input_and_adapter_guard():
    mla = make()
    cos, sin = precompute_rope(4, 5)
    with pytest.raises(ValueError, match=r"x must be \[batch, seq, dim\]"):
        mla(torch.randn(5, 32, dtype=torch.float64), cos, sin)
    with pytest.raises(ValueError, match="cos has shape"):
        mla(torch.randn(1, 4, 32, dtype=torch.float64), cos, sin)
    mla.kv_b_proj = torch.nn.Sequential(mla.kv_b_proj)  # stands for an adapter-wrapped projection
    with pytest.raises(TypeError, match="plain nn.Linear"):
        mla(torch.randn(1, 5, 32, dtype=torch.float64), cos, sin, absorb=True)


def test_kept_attention_weights_are_the_same_in_both_forms():
    mla = make()
    cos, sin = precompute_rope(4, 6)
    x = torch.randn(1, 6, 32, dtype=torch.float64)
    with AttentionWeights(mla) as attention:
        out_naive = mla(x, cos, sin, absorb=False)
        naive = attention.weights[0]
        out_absorbed = mla(x, cos, sin, absorb=True)
    assert naive.shape == (1, 4, 6, 6)
    torch.testing.assert_close(attention.weights[0], naive)
    torch.testing.assert_close(out_absorbed, out_naive)
    torch.testing.assert_close(naive.sum(-1), torch.ones(1, 4, 6, dtype=torch.float64))
    assert (naive.triu(1) == 0).all()  # causal
