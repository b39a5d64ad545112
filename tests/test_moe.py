"""DeepSeekMoE: the routed-expert reference, every gate variant against transformers' routers,
the aux-loss-free bias, the load-balancing loss, and the MoE layer (also through the fused kernel)."""

import pytest
import torch

from deepseek_mini import backend
from deepseek_mini.moe import Gate, MoE, apply_capacity, expert_load, load_balancing_loss, routed_experts


def dense_reference(x, idx, w, gate_proj, up_proj, down_proj):
    """Token by token, slot by slot: nothing shared with the implementation's gather/scatter."""
    out = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[n, k]
            h = torch.nn.functional.silu(gate_proj[e] @ x[n]) * (up_proj[e] @ x[n])
            out[n] += w[n, k] * (down_proj[e] @ h)
    return out


def make_experts(E=6, D=8, I=5, dtype=torch.float64):
    return (torch.randn(E, I, D, dtype=dtype), torch.randn(E, I, D, dtype=dtype), torch.randn(E, D, I, dtype=dtype))


def test_routed_experts_matches_token_loop():
    g, u, d = make_experts()
    x = torch.randn(7, 8, dtype=torch.float64)
    idx = torch.stack([torch.randperm(6)[:2] for _ in range(7)])
    w = torch.rand(7, 2, dtype=torch.float64)
    torch.testing.assert_close(routed_experts(x, idx, w, g, u, d), dense_reference(x, idx, w, g, u, d))


def test_routed_experts_gradcheck():
    g, u, d = (t.requires_grad_() for t in make_experts(E=3, D=4, I=3))
    x = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    w = torch.rand(4, 2, dtype=torch.float64, requires_grad=True)
    idx = torch.tensor([[0, 2], [1, 2], [2, 0], [1, 0]])
    assert torch.autograd.gradcheck(lambda x, w, g, u, d: routed_experts(x, idx, w, g, u, d), (x, w, g, u, d))


def test_routed_experts_bad_inputs():
    g, u, d = make_experts()
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"topk_idx values must lie in \[0, 6\)"):
        routed_experts(x, torch.tensor([[0], [6], [1]]), torch.ones(3, 1, dtype=torch.float64), g, u, d)
    with pytest.raises(ValueError, match="down_proj has shape"):
        routed_experts(x, torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1), g, u, d.transpose(1, 2))
    with pytest.raises(TypeError, match="topk_idx must be int64"):
        routed_experts(x, torch.zeros(3, 1), torch.ones(3, 1), g, u, d)
    with pytest.raises(ValueError, match="topk_weight has shape"):
        routed_experts(x, torch.zeros(3, 2, dtype=torch.long), torch.ones(3, 1), g, u, d)


def hf_router(version, **kw):
    if version == 3:
        from transformers import DeepseekV3Config
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
        return DeepseekV3TopkRouter(DeepseekV3Config(hidden_size=16, **kw))
    from transformers import DeepseekV2Config
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    return DeepseekV2TopkRouter(DeepseekV2Config(hidden_size=16, num_attention_heads=4, **kw))


def same_routing(ours_idx, ours_w, hf_idx, hf_w):
    # top-k order is unspecified: compare per token after sorting by expert id
    o, h = ours_idx.sort(-1), hf_idx.sort(-1)
    assert torch.equal(o.values, h.values)
    torch.testing.assert_close(ours_w.gather(1, o.indices), hf_w.gather(1, h.indices))


@pytest.mark.parametrize("n_group,topk_group,norm", [(1, 1, True), (4, 2, True), (4, 1, False), (2, 2, False)])
def test_sigmoid_noaux_gate_matches_transformers_v3(n_group, topk_group, norm):
    hf = hf_router(3, n_routed_experts=8, num_experts_per_tok=3, n_group=n_group, topk_group=topk_group,
                   norm_topk_prob=norm, routed_scaling_factor=2.5)
    torch.nn.init.normal_(hf.weight)
    hf.e_score_correction_bias.normal_()
    ours = Gate(16, 8, 3, scoring_func="sigmoid", topk_method="noaux_tc", n_group=n_group, topk_group=topk_group,
                norm_topk_prob=norm, routed_scaling_factor=2.5)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(20, 16)
    _, hf_w, hf_idx = hf(x)
    same_routing(*ours(x), hf_idx, hf_w)


@pytest.mark.parametrize("method,n_group,topk_group", [("greedy", None, None), ("group_limited_greedy", 4, 2)])
def test_softmax_gate_matches_transformers_v2(method, n_group, topk_group):
    hf = hf_router(2, n_routed_experts=8, num_experts_per_tok=2, topk_method=method, n_group=n_group,
                   topk_group=topk_group, routed_scaling_factor=1.5)
    torch.nn.init.normal_(hf.weight)
    ours = Gate(16, 8, 2, scoring_func="softmax", topk_method=method, n_group=n_group or 1,
                topk_group=topk_group or 1, norm_topk_prob=False, routed_scaling_factor=1.5)
    ours.load_state_dict(hf.state_dict())
    x = torch.randn(20, 16)
    _, hf_w, hf_idx = hf(x)
    same_routing(*ours(x), hf_idx, hf_w)


def test_group_limit_keeps_choices_inside_the_best_groups():
    gate = Gate(16, 12, 2, scoring_func="softmax", topk_method="group_limited_greedy", n_group=4, topk_group=1)
    idx, _ = gate(torch.randn(50, 16))
    groups = idx // 3  # 12 experts in 4 groups of 3; only one group may be used per token
    assert (groups[:, 0] == groups[:, 1]).all()


def test_bias_changes_choice_not_weights():
    gate = Gate(16, 8, 2, norm_topk_prob=False)
    x = torch.randn(30, 16)
    idx0, w0 = gate(x)
    scores = gate.scores(x)
    gate.e_score_correction_bias[5] = 10.0  # expert 5 now always wins a slot
    idx1, w1 = gate(x)
    assert (idx1 == 5).any(-1).all() and not (idx0 == 5).all()
    torch.testing.assert_close(w1, scores.gather(1, idx1))  # the weight is still the plain score


def test_update_bias_moves_toward_balance():
    gate = Gate(16, 4, 1)
    with torch.no_grad():
        gate.weight.normal_(std=0.3)
        gate.weight[0] += 0.5  # expert 0 is favoured by most (positive) tokens
    x = torch.rand(200, 16)
    start = expert_load(gate(x)[0], 4)
    assert start[0] > 150
    bias_before = gate.e_score_correction_bias.clone()
    gate.update_bias(start, speed=0.1)
    expected = bias_before + 0.1 * torch.sign(start.float().mean() - start.float())
    torch.testing.assert_close(gate.e_score_correction_bias, expected)
    for _ in range(200):
        load = expert_load(gate(x)[0], 4)
        gate.update_bias(load, speed=0.002)
    assert load.max() < start.max() * 0.6  # the bias spread the load
    with pytest.raises(ValueError, match="noaux_tc"):
        Gate(16, 4, 1, scoring_func="softmax", topk_method="greedy").update_bias(load)


def test_load_balancing_loss():
    even_scores = torch.full((8, 4), 0.25)
    even_idx = torch.arange(8).remainder(4)[:, None]
    assert load_balancing_loss(even_scores, even_idx, 4).item() == pytest.approx(1.0)
    skew_scores = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    assert load_balancing_loss(skew_scores, torch.zeros(8, 1, dtype=torch.long), 4).item() == pytest.approx(2.8)
    moe = MoE(16, 8, n_routed_experts=4, n_shared_experts=0, top_k=2, aux_loss_alpha=0.01).train()
    x = torch.randn(5, 16)
    y, aux_loss = moe(x, return_aux_loss=True)
    assert aux_loss is not None and aux_loss.requires_grad
    torch.testing.assert_close(y, moe(x))
    torch.testing.assert_close(aux_loss, 0.01 * load_balancing_loss(moe.gate.scores(x), moe.gate(x)[0], 4))
    assert moe.eval()(x, return_aux_loss=True)[1] is None  # training only
    assert MoE(16, 8, 4, 0, 2).train()(x, return_aux_loss=True)[1] is None  # aux_loss_alpha = 0: none


def test_gate_config_errors():
    with pytest.raises(ValueError, match="scoring_func"):
        Gate(8, 4, 2, scoring_func="relu")
    with pytest.raises(ValueError, match="n_group"):
        Gate(8, 6, 2, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        Gate(8, 8, 2, n_group=2, topk_group=3)
    with pytest.raises(ValueError, match="top_k"):
        Gate(8, 4, 5)
    with pytest.raises(ValueError, match="Gate: x must be"):
        Gate(8, 4, 2)(torch.randn(3, 7))


def test_moe_layer_and_fused_kernel_path():
    moe = MoE(16, 8, n_routed_experts=6, n_shared_experts=1, top_k=2, n_group=2, topk_group=1)
    x = torch.randn(2, 5, 16)
    y = moe(x)
    flat = x.reshape(-1, 16)
    idx, w = moe.gate(flat)  # the gate keeps nothing: ask it again
    e = moe.experts
    expected = dense_reference(flat, idx, w, e.gate_proj, e.up_proj, e.down_proj).view(2, 5, 16) + moe.shared_experts(x)
    torch.testing.assert_close(y, expected, atol=1e-5, rtol=1e-5)
    assert idx.shape == (10, 2)
    with backend.forced("triton"):  # Triton interpreter on CPU
        torch.testing.assert_close(moe(x), y, atol=1e-5, rtol=1e-5)


def test_moe_layer_gradcheck_float64():
    moe = MoE(6, 4, n_routed_experts=4, n_shared_experts=1, top_k=2, n_group=2, topk_group=1).double()
    x = torch.randn(1, 3, 6, dtype=torch.float64, requires_grad=True)
    # gradients reach x through the experts and through the gate weights (routing itself is discrete)
    assert torch.autograd.gradcheck(moe, (x,))


def test_correction_bias_stays_float32_when_the_model_is_cast():
    gate = Gate(16, 8, 2)
    gate.e_score_correction_bias.copy_(torch.linspace(0, 1e-3, 8))
    gate = gate.to(torch.bfloat16)
    assert gate.weight.dtype == torch.bfloat16 and gate.e_score_correction_bias.dtype == torch.float32
    torch.testing.assert_close(gate.e_score_correction_bias, torch.linspace(0, 1e-3, 8), atol=0, rtol=0)
    idx, w = gate(torch.randn(4, 16, dtype=torch.bfloat16))
    assert w.dtype == torch.float32 and idx.shape == (4, 2)


def test_capacity_drops_the_late_slots_of_overloaded_experts():
    # 4 tokens x 2 slots over 4 experts: capacity = ceil(1.0 * 8 / 4) = 2 slots per expert
    idx = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 0]])
    w = torch.ones(4, 2)
    new_w, dropped = apply_capacity(idx, w, 4, capacity_factor=1.0)
    # expert 0 is picked 4 times: its 3rd and 4th slots (token 2 slot 0, token 3 slot 1) are dropped
    assert dropped.tolist() == [[False, False], [False, False], [True, False], [False, True]]
    assert torch.equal(new_w, (~dropped).float())
    assert not apply_capacity(idx, w, 4, capacity_factor=2.0)[1].any()
    with pytest.raises(ValueError, match="capacity_factor"):
        apply_capacity(idx, w, 4, capacity_factor=0)
    moe = MoE(16, 8, n_routed_experts=4, n_shared_experts=0, top_k=2, capacity_factor=0.5)
    x = torch.randn(12, 16)
    y = moe(x)
    e, gate = moe.experts, moe.gate
    idx, w = gate(x)
    kept, dropped = apply_capacity(idx, w, 4, capacity_factor=0.5)
    assert dropped.sum() >= 12  # at most 4 experts x ceil(0.5*24/4)=3 slots = 12 of 24 kept
    torch.testing.assert_close(y, dense_reference(x, idx, kept, e.gate_proj, e.up_proj, e.down_proj),
                               atol=1e-5, rtol=1e-5)
