"""Nothing is stashed on modules by a forward: what plots and the bias update need is recorded by
forward hooks (`record_routing`, `viz.routing`, `viz.AttentionWeights`) and removed afterwards;
the auxiliary loss is returned; the model checks its inputs once, without reading GPU values."""

import pytest
import torch

from deepseek_mini import backend, train, viz
from deepseek_mini.attention import MultiHeadAttention, scaled_dot_product_attention
from deepseek_mini.model import DeepseekConfig, DeepseekModel, check_inputs, causal_lm_loss, record_routing
from deepseek_mini.moe import MoE
from deepseek_mini.rope import precompute_rope

SMALL = dict(vocab_size=50, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=16)


def small_model(**changes):
    torch.manual_seed(0)
    model = DeepseekModel(DeepseekConfig(**{**SMALL, **changes})).double().eval()
    with torch.no_grad():  # larger weights than the init so that routing and attention vary
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    return model


def step_by_step(model, ids):
    """Each block run by hand: the gate's choices on its real input, and every layer's attention
    weights from its q and k (the naive MLA form), without any hook."""
    S = ids.shape[1]
    cos, sin = model.rope_tables(0, S, ids.device)
    x, gates, maps = model.embed_tokens(ids), {}, []
    for layer in model.layers:
        attn, a = layer.self_attn, layer.input_layernorm(x)
        q_nope, q_pe = attn.project_q(a)
        c_kv, k_pe = attn.project_kv_latent(a)
        k_nope = attn.kv_b_proj(c_kv[:, 0]).view(*ids.shape, attn.n_heads, -1).transpose(1, 2)[..., :attn.qk_nope_head_dim]
        from deepseek_mini.rope import apply_rope
        q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, attn.rope_interleaved)), -1)
        k = torch.cat((k_nope, apply_rope(k_pe, cos, sin, attn.rope_interleaved).expand(-1, attn.n_heads, -1, -1)), -1)
        maps.append(scaled_dot_product_attention(q, k, k, scale=attn.softmax_scale, return_weights=True)[1])
        h = x + attn(a, cos, sin)
        if isinstance(layer.mlp, MoE):
            gates[layer.layer_idx] = layer.mlp.gate(layer.post_attention_layernorm(h).reshape(-1, h.shape[-1]))
        x = layer(x, cos, sin)[0]
    return gates, maps


def no_hooks_left(model):
    return not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("absorb", [False, True])
def test_routing_and_attention_hooks_equal_a_step_by_step_forward(absorb):
    model = small_model(absorb_mla=absorb)
    ids = torch.randint(0, 50, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        gates, maps = step_by_step(model, ids)
        routing = viz.routing(model, ids)
        attention = viz.attention_maps(model, ids)
    assert list(routing) == [1, 2], "layers 1 and 2 are MoE (first_k_dense_replace=1)"
    for i, (idx, w) in routing.items():
        assert idx.shape == w.shape == (2, 7, 2)
        assert torch.equal(idx.reshape(14, 2), gates[i][0]), f"layer {i}: expert ids differ from the gate's own"
        torch.testing.assert_close(w.reshape(14, 2), gates[i][1])
    assert len(attention) == 3
    for got, want in zip(attention, maps):
        torch.testing.assert_close(got, want)
    assert no_hooks_left(model), "the recording hooks must be removed"
    # and the forward keeps nothing: no tensor attribute outside parameters and buffers
    for name, module in model.named_modules():
        stashed = [k for k, v in vars(module).items() if isinstance(v, torch.Tensor)]
        assert not stashed, f"{name} keeps {stashed} from its forward"


def test_record_routing_counts_every_call_and_feeds_the_bias_update():
    model = small_model().train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(2))
    with record_routing(model) as routing:
        model(ids[:1])
        model(ids[1:])
    assert [len(calls) for calls in routing.values()] == [2, 2]  # one entry per forward
    assert no_hooks_left(model)
    model(ids)  # outside the block: nothing recorded
    assert [len(calls) for calls in routing.values()] == [2, 2]
    gate = model.layers[2].mlp.gate
    load = torch.bincount(torch.cat([r.topk_idx.flatten() for r in routing[2]]), minlength=4).float()
    before = gate.e_score_correction_bias.clone()
    model.update_expert_biases(routing, speed=0.01)
    torch.testing.assert_close(gate.e_score_correction_bias, before + 0.01 * torch.sign(load.mean() - load))


def test_attention_weights_do_not_change_the_fused_forward():
    """Recording does not switch the layer to the reference path: on the Triton backend (the
    interpreter here) the output is flash attention's, and the weights are still recorded."""
    torch.manual_seed(3)
    attn = MultiHeadAttention(32, 4, n_kv_heads=2, window=3)
    cos, sin = precompute_rope(8, 6)
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        reference = attn(x, cos, sin)
        with backend.forced("triton"), viz.AttentionWeights(attn) as recorded:
            fused = attn(x, cos, sin)
    torch.testing.assert_close(fused, reference, atol=1e-5, rtol=1e-5)
    w = recorded.weights[0]
    assert w.shape == (2, 4, 6, 6) and torch.all(w.triu(1) == 0) and torch.all(w.tril(-3) == 0), "causal, window 3"
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 4, 6))
    assert not attn.attend._forward_hooks
    with pytest.raises(TypeError, match="no attention layer"):
        viz.AttentionWeights(torch.nn.Linear(2, 2))


def test_aux_loss_is_returned_and_summed_over_blocks():
    model = small_model(aux_loss_alpha=0.01).train()
    ids = torch.randint(0, 50, (2, 6), generator=torch.Generator().manual_seed(4))
    x, aux = model.hidden_states(ids)
    per_block, h = [], model.embed_tokens(ids)
    cos, sin = model.rope_tables(0, 6, ids.device)
    for layer in model.layers:
        h, a = layer(h, cos, sin)
        per_block.append(a)
    assert per_block[0] is None and all(a is not None for a in per_block[1:]), "dense block: None; MoE: a loss"
    torch.testing.assert_close(aux, per_block[1] + per_block[2])
    torch.testing.assert_close(x, h)
    out = model(ids, labels=ids)
    torch.testing.assert_close(out.aux_loss, aux)
    torch.testing.assert_close(out.loss, causal_lm_loss(out.logits, ids) + aux)
    # the Trainer's default loss passes the labels to the model, so it trains on the aux loss too
    torch.testing.assert_close(train.default_loss(model, {"input_ids": ids, "labels": ids}), out.loss)
    assert model.eval()(ids, labels=ids).aux_loss is None, "training only"
    assert train.causal_lm_loss is causal_lm_loss, "one loss, in model.py"


def test_input_checks_name_the_problem_on_cpu_and_never_read_values_elsewhere():
    config = DeepseekConfig(**SMALL)
    model = small_model()
    for bad, message in ((torch.tensor([[3, -1]]), r"input_ids must lie in \[0, vocab_size=50\), got \[-1, 3\]"),
                         (torch.tensor([[3, 50]]), r"input_ids must lie in \[0, vocab_size=50\), got \[3, 50\]"),
                         (torch.tensor([3, 4]), r"int64 tensor \[batch, seq\], got torch.int64 of shape \(2,\)"),
                         (torch.tensor([[3.0, 4.0]]), r"int64 tensor \[batch, seq\], got torch.float32"),
                         ([[3, 4]], r"int64 tensor \[batch, seq\], got list")):
        with pytest.raises(ValueError, match=message):
            model(bad)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match=r"labels must have the shape of input_ids \(1, 3\)"):
        model(ids, labels=ids[:, :2])
    with pytest.raises(ValueError, match=r"attention_mask must have the shape of input_ids \(1, 3\)"):
        model(ids, attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="padding"):
        model(ids, attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="every label is ignore_index"):
        model(ids, labels=torch.full_like(ids, -100))
    check_inputs(config, ids, ids.clone(), torch.ones(1, 3))  # valid input passes
    # Off the CPU only types and shapes are checked: values of a "meta" tensor cannot be read at
    # all, so any .min() / .all() here would raise.
    meta = torch.zeros(2, 3, dtype=torch.long, device="meta")
    check_inputs(config, meta, meta, torch.zeros(2, 3, device="meta"))
    with pytest.raises(ValueError, match="labels must have the shape"):
        check_inputs(config, meta, meta[:, :2])
    causal_lm_loss(torch.zeros(2, 3, 50, device="meta"), torch.full((2, 3), -100, device="meta"))


def test_one_token_decode_of_absorbed_mla_records_its_weights(monkeypatch):
    """On the Triton backend one new token of absorbed MLA runs the decode kernel, which forms no
    weights; the hook still records them, rebuilt from the latent query and cache it was given."""
    from deepseek_mini.attention import KVCache, MultiHeadLatentAttention
    from deepseek_mini.kernels import mla_decode

    torch.manual_seed(5)
    attn = MultiHeadLatentAttention(32, 2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                    v_head_dim=8, absorb=True).eval()
    cos, sin = precompute_rope(4, 6)
    x = torch.randn(1, 6, 32)
    calls, original = [], mla_decode.mla_decode
    monkeypatch.setattr(mla_decode, "mla_decode", lambda *a, **k: calls.append(1) or original(*a, **k))
    with torch.no_grad():
        with viz.AttentionWeights(attn) as full:
            attn(x, cos, sin)  # all six tokens at once: the reference weights
        cache = KVCache()
        attn(x[:, :5], cos[:5], sin[:5], cache=cache)
        with backend.forced("triton"), viz.AttentionWeights(attn) as last:
            attn(x[:, 5:], cos[5:], sin[5:], cache=cache)
    assert calls, "one token on the Triton backend goes through the decode kernel"
    torch.testing.assert_close(last.weights[0], full.weights[0][:, :, 5:], atol=1e-5, rtol=1e-5)
