"""The model: shapes and loss, cached generation == recomputation, sampling filters, parameter
counts, gradient checkpointing, routing access, config errors, and the KV-cache table in docs."""

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepseek_mini.attention import KVCache
from deepseek_mini.model import (DeepseekConfig, DeepseekModel, LMOutput, kv_cache_table, record_routing,
                                  sample_next_token)

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=2,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=16)


def small_model(**changes):
    model = DeepseekModel(DeepseekConfig(**{**SMALL, **changes})).double().eval()
    with torch.no_grad():  # larger weights than the init so different tokens really differ
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def test_logits_and_loss():
    model = small_model()
    ids = torch.randint(0, 50, (3, 7))
    logits = model(ids)
    assert isinstance(logits, torch.Tensor) and logits.shape == (3, 7, 50)
    out = model(ids, labels=ids)
    assert isinstance(out, LMOutput)
    torch.testing.assert_close(out.logits, logits)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, expected)
    labels = ids.clone()
    labels[:, :4] = -100  # ignored positions
    expected = F.cross_entropy(logits[:, 3:-1].reshape(-1, 50), ids[:, 4:].reshape(-1))
    torch.testing.assert_close(model(ids, labels=labels).loss, expected)


@pytest.mark.parametrize("absorb", [False, True])
def test_cached_generation_equals_recomputation(absorb):
    model = small_model(absorb_mla=absorb)
    prompt = torch.randint(0, 50, (2, 5))
    generated = model.generate(prompt, max_new_tokens=15)  # runs past the initial rope table (16)
    assert generated.shape == (2, 20) and torch.equal(generated[:, :5], prompt)
    assert torch.equal(model.generate(prompt, max_new_tokens=15, use_cache=False), generated)
    # recompute from scratch: each generated token is the argmax of a full forward on its prefix
    for t in range(5, 20):
        assert torch.equal(model(generated[:, :t])[:, -1].argmax(-1), generated[:, t])
    # and the cached logits equal the full pass position by position
    cache = KVCache()
    steps = [model(generated[:, :5], cache=cache)]
    steps += [model(generated[:, t:t + 1], cache=cache) for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), model(generated), atol=1e-10, rtol=1e-8)


def test_absorbed_model_equals_naive_model():
    naive = small_model()
    absorbed = DeepseekModel(naive.config.replace(absorb_mla=True)).double().eval()
    absorbed.load_state_dict(naive.state_dict())
    ids = torch.randint(0, 50, (2, 9))
    torch.testing.assert_close(absorbed(ids), naive(ids), atol=1e-10, rtol=1e-8)


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample_next_token(logits[:3]), torch.tensor([4, 4, 4]))
    top2 = sample_next_token(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {3, 4}
    # softmax([0..4]) = [.012, .032, .086, .234, .636]: top_p 0.8 keeps {4, 3} (0.636 < 0.8 <= 0.87)
    nucleus = sample_next_token(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {3, 4}
    frac4 = (nucleus == 4).float().mean().item()
    assert abs(frac4 - 0.636 / 0.870) < 0.04  # renormalised inside the nucleus
    hot = sample_next_token(logits, temperature=100.0, generator=g)
    assert len(set(hot.tolist())) == 5  # a high temperature flattens the distribution
    model = small_model()
    ids = torch.randint(0, 50, (2, 3))
    a = model.generate(ids, 6, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    b = model.generate(ids, 6, temperature=0.8, top_k=5, top_p=0.9, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 9)


def test_generate_stops_at_eos():
    model = small_model()
    ids = torch.randint(0, 50, (1, 4))
    first = model.generate(ids, 1)[0, -1].item()
    out = model.generate(ids, 10, eos_token_id=first)
    assert out.shape == (1, 5) and out[0, -1].item() == first


def test_parameter_counts():
    model = small_model()
    total = sum(p.numel() for p in model.parameters())
    assert model.num_parameters() == total
    expert = 3 * 16 * 32  # gate, up, down of one routed expert
    # layer 0 is dense (first_k_dense_replace=1); layer 1 has 4 routed experts of which 2 are active
    assert model.num_parameters(active=True) == total - 2 * expert
    assert model.num_parameters(exclude_embeddings=True) == total - 2 * 50 * 32
    tied = small_model(tie_word_embeddings=True)
    assert tied.num_parameters() == total - 50 * 32


def test_real_sizes_from_configs():
    # DeepSeek-V3: 671B total and 37B active (the 14B multi-token-prediction module comes on top)
    with torch.device("meta"):
        v3 = DeepseekModel(DeepseekConfig.deepseek_v3())
        lite = DeepseekModel(DeepseekConfig.deepseek_v2_lite())
    assert 670e9 < v3.num_parameters() < 672e9
    assert 36e9 < v3.num_parameters(active=True) < 38e9
    assert 15.5e9 < lite.num_parameters() < 16e9
    assert 2.3e9 < lite.num_parameters(active=True) < 2.8e9


def test_gradient_checkpointing_gives_same_gradients():
    model = small_model().train()
    ids = torch.randint(0, 50, (2, 6))
    model(ids, labels=ids).loss.backward()
    plain = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.gradient_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if n in plain:
            torch.testing.assert_close(p.grad, plain[n], msg=n)


def test_aux_loss_and_routing():
    model = small_model(aux_loss_alpha=0.01).train()
    ids = torch.randint(0, 50, (2, 6))
    with record_routing(model) as routing:  # forward hooks on the gates, removed at exit
        out = model(ids, labels=ids)
    assert out.aux_loss is not None
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits[:, :-1].reshape(-1, 50), ids[:, 1:].reshape(-1)) + out.aux_loss)
    assert list(routing) == [1] and len(routing[1]) == 1  # only layer 1 is MoE; one forward
    idx, w = routing[1][0]
    assert idx.shape == w.shape == (12, 2) and int(idx.max()) < 4
    gate = model.layers[1].mlp.gate
    load = torch.bincount(idx.flatten(), minlength=4).float()
    before = gate.e_score_correction_bias.clone()
    model.update_expert_biases(routing, speed=0.01)
    torch.testing.assert_close(gate.e_score_correction_bias, before + 0.01 * torch.sign(load.mean() - load))


def test_linear_projections_for_lora():
    model = small_model()
    names = {n.split(".")[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "lm_head"} <= names
    assert "q_proj" in {n.split(".")[-1] for n, m in small_model(q_lora_rank=None).named_modules()}


def test_config_and_input_errors():
    with pytest.raises(ValueError, match="hidden_act"):
        DeepseekConfig(hidden_act="gelu")
    with pytest.raises(ValueError, match="qk_rope_head_dim"):
        DeepseekConfig(qk_rope_head_dim=7)
    with pytest.raises(ValueError, match="num_experts_per_tok"):
        DeepseekConfig(n_routed_experts=4, num_experts_per_tok=5)
    with pytest.raises(ValueError, match="scoring_func"):
        DeepseekConfig(scoring_func="tanh")
    with pytest.raises(ValueError, match="moe_layer_freq"):
        DeepseekConfig(moe_layer_freq=2)
    with pytest.raises(ValueError, match="rope scaling"):
        DeepseekConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="n_group"):
        DeepseekConfig(n_routed_experts=6, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        DeepseekConfig(n_routed_experts=8, n_group=2, topk_group=3)
    model = small_model()
    with pytest.raises(ValueError, match="input_ids must be an int64"):
        model(torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, vocab_size=50\)"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(ValueError, match="labels must have the shape"):
        model(torch.tensor([[1, 2]]), labels=torch.tensor([[1]]))
    with pytest.raises(ValueError, match="padding"):
        model(torch.tensor([[1, 2]]), attention_mask=torch.tensor([[0, 1]]))
    torch.testing.assert_close(model(torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 2)), model(torch.tensor([[1, 2]])))
    with pytest.raises(ValueError, match="top_p"):
        model.generate(torch.tensor([[1]]), 2, temperature=1.0, top_p=0.0)


def test_kv_cache_doc_is_generated_by_the_library():
    table = kv_cache_table()
    assert "| DeepSeek-V3 | MLA (absorbed) | latent 512 + rope key 64 | 68.6 | 0.014 |" in table
    doc = (Path(__file__).resolve().parents[1] / "docs" / "kv_cache.md").read_text()
    assert table in doc, "docs/kv_cache.md is stale: regenerate it with python -m deepseek_mini.model"


@pytest.mark.parametrize("absorb", [False, True])
def test_triton_path_matches_reference(absorb):
    """The same model through the fused kernels (Triton interpreter on CPU; the real kernels on a GPU)."""
    from deepseek_mini import backend

    model = small_model(absorb_mla=absorb).float()
    ids = torch.randint(0, 50, (2, 6))
    reference, generated = model(ids), model.generate(ids[:, :3], 3)
    with backend.forced("triton"):
        torch.testing.assert_close(model(ids), reference, atol=1e-4, rtol=1e-4)
        assert torch.equal(model.generate(ids[:, :3], 3), generated)


@pytest.mark.parametrize("absorb,kind", [(False, "mha"), (True, "mla")])
def test_measured_cache_size_matches_the_formula(absorb, kind):
    from deepseek_mini.attention import kv_cache_bytes_per_token

    model = small_model(absorb_mla=absorb)
    cfg = model.config
    cache = KVCache()
    model(torch.randint(0, 50, (3, 7)), cache=cache)
    per_token = kv_cache_bytes_per_token(kind, n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads,
                                         k_head_dim=cfg.qk_head_dim, v_head_dim=cfg.v_head_dim,
                                         kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                                         bytes_per_value=8)  # float64 model
    assert cache.nbytes() == 3 * 7 * per_token
