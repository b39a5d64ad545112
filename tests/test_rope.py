"""RoPE and YaRN: both pair layouts, relative-position property, and agreement with the
Hugging Face implementations (transformers' DeepSeek-V3 rotate-half/interleave and V2 complex form)."""

import math

import pytest
import torch

from deepseek_mini.rope import (apply_rope, precompute_rope, rope_inv_freq, softmax_scale,
                                yarn_attention_factor, yarn_get_mscale)

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 64, "beta_fast": 32,
        "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}


def test_tables_shape_and_plain_values():
    cos, sin = precompute_rope(8, 5, theta=10000.0)
    assert cos.shape == sin.shape == (5, 4) and cos.dtype == torch.float32
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2).float() / 8)
    torch.testing.assert_close(cos[3], torch.cos(3 * inv))
    torch.testing.assert_close(sin[3], torch.sin(3 * inv))


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotation_keeps_norm_and_depends_only_on_distance(interleaved):
    cos, sin = precompute_rope(16, 32)
    q = torch.randn(1, 1, 1, 16, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def score(i, j):
        qi = apply_rope(q, cos[i:i + 1].double(), sin[i:i + 1].double(), interleaved)
        kj = apply_rope(k, cos[j:j + 1].double(), sin[j:j + 1].double(), interleaved)
        return (qi * kj).sum()

    torch.testing.assert_close(score(7, 3), score(20, 16))
    rotated = apply_rope(q, cos[9:10].double(), sin[9:10].double(), interleaved)
    torch.testing.assert_close(rotated.norm(), q.norm())


def test_layouts_are_permutations_of_each_other():
    # interleaved rope on x equals half-rotated rope on x with pairs de-interleaved
    cos, sin = precompute_rope(8, 6)
    x = torch.randn(2, 3, 6, 8)
    perm = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))
    a = apply_rope(x, cos, sin, interleaved=True)[..., perm]
    b = apply_rope(x[..., perm], cos, sin, interleaved=False)
    torch.testing.assert_close(a, b)


def test_matches_transformers_rope_functions():
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import apply_rotary_emb
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb, apply_rotary_pos_emb_interleave

    cos, sin = precompute_rope(8, 6)
    q, k = torch.randn(2, 3, 6, 8), torch.randn(2, 1, 6, 8)
    hf_cos, hf_sin = torch.cat((cos, cos), -1)[None], torch.cat((sin, sin), -1)[None]
    hq, hk = apply_rotary_pos_emb(q, k, hf_cos, hf_sin)
    torch.testing.assert_close(apply_rope(q, cos, sin, False), hq)
    torch.testing.assert_close(apply_rope(k, cos, sin, False), hk)
    # HF's V3 interleave returns the rotated pairs de-interleaved (evens then odds); the same values
    hq, _ = apply_rotary_pos_emb_interleave(q, k, hf_cos, hf_sin)
    ours = apply_rope(q, cos, sin, True)
    torch.testing.assert_close(torch.cat((ours[..., 0::2], ours[..., 1::2]), -1), hq)
    # V2 complex form keeps the interleaved layout
    hq, _ = apply_rotary_emb(q, k, torch.polar(torch.ones_like(cos), torch.atan2(sin, cos))[None])
    torch.testing.assert_close(ours, hq, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("scaling", [YARN, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
                                     {"type": "yarn", "factor": 8.0, "original_max_position_embeddings": 128,
                                      "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.707}])
def test_yarn_matches_transformers(scaling):
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    params = {k: v for k, v in scaling.items() if k != "type"} | {"rope_type": "yarn", "rope_theta": 10000.0}
    cfg = DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=16, max_position_embeddings=256,
                           rope_parameters=params)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](cfg)
    torch.testing.assert_close(rope_inv_freq(16, 10000.0, scaling), inv_freq, rtol=0, atol=0)
    assert yarn_attention_factor(scaling) == pytest.approx(attention_factor)
    cos, _ = precompute_rope(16, 256, 10000.0, scaling)
    torch.testing.assert_close(cos[5], torch.cos(5 * inv_freq) * attention_factor)


def test_softmax_scale_uses_mscale_all_dim():
    assert softmax_scale(192, None) == pytest.approx(192 ** -0.5)
    m = 0.1 * 1.0 * math.log(40.0) + 1.0
    assert yarn_get_mscale(40.0, 1.0) == pytest.approx(m)
    assert softmax_scale(192, YARN) == pytest.approx(192 ** -0.5 * m * m)
    assert yarn_attention_factor(YARN) == pytest.approx(1.0)  # mscale == mscale_all_dim


def test_bad_inputs_name_the_problem():
    cos, sin = precompute_rope(8, 6)
    with pytest.raises(ValueError, match="x must be"):
        apply_rope(torch.randn(6, 8), cos, sin, True)
    with pytest.raises(ValueError, match="cos has shape"):
        apply_rope(torch.randn(1, 1, 5, 8), cos, sin, True)
    with pytest.raises(ValueError, match="head_dim"):
        precompute_rope(7, 4)
    with pytest.raises(ValueError, match="not supported"):
        precompute_rope(8, 4, scaling={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(ValueError, match="unsupported yarn field"):
        precompute_rope(8, 4, scaling={"rope_type": "yarn", "factor": 2.0, "low_freq_factor": 1.0})


@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_float64(interleaved):
    cos, sin = precompute_rope(6, 4, scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2})
    x = torch.randn(1, 2, 4, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: apply_rope(x, cos, sin, interleaved), (x,))
