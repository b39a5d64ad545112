"""LoRA parity with Hugging Face peft (outputs, adapter gradients, merged weights, saved files),
exact merge/unmerge, freezing and parameter counts, and QLoRA over a quantized base."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from deepseek_mini.lora import (
    LoRALinear, inject_lora, load_lora, lora_layers, lora_linear, merge_and_unload, merge_lora,
    save_lora, trainable_parameters, unmerge_lora,
)
from deepseek_mini.quant import QuantLinear, quantize_model

DEEPSEEK_TARGETS = ["q_b_proj", "kv_b_proj", "o_proj"]


class Plain(nn.Module):
    """A small network with linears at different depths, with and without bias."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 24)
        self.blocks = nn.ModuleList([nn.ModuleDict({"attn": nn.Linear(24, 24, bias=False), "mlp": nn.Linear(24, 24)})
                                     for _ in range(2)])
        self.head = nn.Linear(24, 5)

    def forward(self, x):
        h = self.inp(x)
        for b in self.blocks:
            h = h + b["attn"](torch.tanh(h))
            h = h + b["mlp"](F.silu(h))
        return self.head(h)


def tiny_deepseek():
    """transformers' DeepSeek-V3 (MLA + MoE) at toy size, built offline from a config."""
    config = DeepseekV3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=16, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
        n_group=1, topk_group=1, n_shared_experts=1, max_position_embeddings=64)
    return DeepseekV3ForCausalLM(config).eval()


def tiny_deepseek_mini():
    """Our own DeepseekModel (MLA + MoE), same toy size; module names follow transformers."""
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    config = DeepseekConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=4, q_lora_rank=16, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_routed_experts=4,
                            num_experts_per_tok=2, max_position_embeddings=64)
    return DeepseekModel(config).eval()


CASES = {
    "plain": (Plain, ["attn", "mlp", "head"], lambda: torch.randn(3, 7, 12)),
    "deepseek": (tiny_deepseek, DEEPSEEK_TARGETS, lambda: torch.randint(0, 64, (2, 9))),
    "deepseek_mini": (tiny_deepseek_mini, DEEPSEEK_TARGETS, lambda: torch.randint(0, 64, (2, 9))),
}


def run(model, inputs):
    out = model(inputs)
    return out.logits if hasattr(out, "logits") else out


def peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def make_pair(case, r=4, alpha=8.0, dropout=0.0, use_rslora=False):
    """Our LoRA model and peft's on copies of one base, with the same non-zero adapter weights."""
    build, targets, make_input = CASES[case]
    base = build()
    ours = inject_lora(copy.deepcopy(base), targets, r=r, alpha=alpha, dropout=dropout, use_rslora=use_rslora)
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, use_rslora=use_rslora)
    theirs = get_peft_model(copy.deepcopy(base), config)
    assert sorted(lora_layers(ours)) == sorted(n for n, m in theirs.base_model.model.named_modules()
                                              if hasattr(m, "lora_A"))
    with torch.no_grad():
        for name, layer in lora_layers(ours).items():
            layer.lora_B.normal_(std=0.5)  # B = 0 at init would hide every mistake in B's path
            peft_layer(theirs, name).lora_A["default"].weight.copy_(layer.lora_A)
            peft_layer(theirs, name).lora_B["default"].weight.copy_(layer.lora_B)
    return base, ours, theirs, make_input()


# ---------------------------------------------------------------------------------------------
# one layer
# ---------------------------------------------------------------------------------------------

def test_lora_linear_starts_as_base_and_computes_the_low_rank_update():
    base = nn.Linear(40, 30)
    layer = LoRALinear(base, r=4, alpha=8)
    assert layer.scaling == 2.0 and LoRALinear(nn.Linear(40, 30), r=4, alpha=8, use_rslora=True).scaling == 4.0
    assert layer.lora_A.shape == (4, 40) and layer.lora_B.shape == (30, 4)
    assert (layer.lora_B == 0).all() and layer.lora_A.abs().max() <= 1 / math.sqrt(40)
    assert layer.lora_A.std() > 0.5 / math.sqrt(3 * 40)  # uniform(-1/sqrt(in), 1/sqrt(in)) has std 1/sqrt(3 in)
    x = torch.randn(5, 40)
    torch.testing.assert_close(layer(x), base(x), rtol=0, atol=0)  # B = 0: exactly the base model
    assert not base.weight.requires_grad and not base.bias.requires_grad
    with torch.no_grad():
        layer.lora_B.normal_()
    expected = x @ (base.weight + 2.0 * layer.lora_B @ layer.lora_A).T + base.bias
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(lora_linear(x, base.weight, base.bias, layer.lora_A, layer.lora_B, 2.0), expected)


def test_merge_unmerge_exact():
    layer = LoRALinear(nn.Linear(64, 48), r=8, alpha=16)
    with torch.no_grad():
        layer.lora_B.normal_()
    original = layer.base.weight.clone()
    x = torch.randn(4, 64)
    unmerged = layer(x)
    layer.merge()
    torch.testing.assert_close(layer.base.weight, original + 2.0 * layer.lora_B @ layer.lora_A)
    torch.testing.assert_close(layer(x), unmerged)
    layer.unmerge()
    torch.testing.assert_close(layer.base.weight, original, rtol=0, atol=1e-6)  # float rounding only
    torch.testing.assert_close(layer(x), unmerged)
    with pytest.raises(RuntimeError, match="not merged"):
        layer.unmerge()
    layer.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        layer.merge()


# ---------------------------------------------------------------------------------------------
# parity with peft
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ["plain", "deepseek", "deepseek_mini"])
@pytest.mark.parametrize("use_rslora", [False, True])
def test_outputs_gradients_and_merged_weights_match_peft(case, use_rslora):
    base, ours, theirs, inputs = make_pair(case, r=4, alpha=8.0, use_rslora=use_rslora)
    assert trainable_parameters(ours) == theirs.get_nb_trainable_parameters()
    out_ours, out_theirs = run(ours, inputs), run(theirs, inputs)
    assert not torch.allclose(out_ours, run(base, inputs))  # the adapters do change the output
    torch.testing.assert_close(out_ours, out_theirs)

    (out_ours.square().mean()).backward()
    (out_theirs.square().mean()).backward()
    for name, layer in lora_layers(ours).items():
        theirs_layer = peft_layer(theirs, name)
        torch.testing.assert_close(layer.lora_A.grad, theirs_layer.lora_A["default"].weight.grad)
        torch.testing.assert_close(layer.lora_B.grad, theirs_layer.lora_B["default"].weight.grad)
        assert layer.lora_A.grad.abs().max() > 0 and layer.lora_B.grad.abs().max() > 0
    # everything but the adapters is frozen and gets no gradient
    for name, p in ours.named_parameters():
        assert p.requires_grad == (".lora_" in name), name
        assert (p.grad is not None) == (".lora_" in name), name

    merged_ours = merge_and_unload(copy.deepcopy(ours))
    merged_theirs = theirs.merge_and_unload()
    for name in lora_layers(ours):
        assert type(merged_ours.get_submodule(name)) is nn.Linear
        torch.testing.assert_close(merged_ours.get_submodule(name).weight, merged_theirs.get_submodule(name).weight)
    torch.testing.assert_close(run(merged_ours, inputs), out_ours)


def test_dropout_applied_where_peft_applies_it():
    """Same seed, same dropout masks: in training mode outputs still match peft exactly, so the
    dropout sits on the adapter path only (not on the base path, not after B)."""
    _, ours, theirs, inputs = make_pair("plain", dropout=0.3)
    ours.train(), theirs.train()
    torch.manual_seed(123)
    out_ours = run(ours, inputs)
    torch.manual_seed(123)
    torch.testing.assert_close(out_ours, run(theirs, inputs))
    torch.manual_seed(124)
    assert not torch.allclose(out_ours, run(ours, inputs))  # dropout really is active
    ours.eval(), theirs.eval()
    torch.testing.assert_close(run(ours, inputs), run(theirs, inputs))


@pytest.mark.parametrize("case", ["plain", "deepseek", "deepseek_mini"])
def test_peft_loads_our_adapter_and_we_load_peft_adapter(case, tmp_path):
    base, ours, theirs, inputs = make_pair(case, r=4, alpha=8.0, use_rslora=True)
    expected = run(ours, inputs)

    save_lora(ours, tmp_path / "ours")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    first = sorted(lora_layers(ours))[0]
    assert f"base_model.model.{first}.lora_A.weight" in keys and len(keys) == 2 * len(lora_layers(ours))
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["use_rslora"]) == ("LORA", 4, 8.0, True)
    loaded_by_peft = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    torch.testing.assert_close(run(loaded_by_peft, inputs), expected)

    theirs.save_pretrained(tmp_path / "theirs")
    loaded_by_us = load_lora(copy.deepcopy(base), tmp_path / "theirs")
    torch.testing.assert_close(run(loaded_by_us, inputs), expected)
    assert trainable_parameters(loaded_by_us) == trainable_parameters(ours)

    # into a model that already has (freshly initialised) adapters: weights are replaced
    fresh = inject_lora(copy.deepcopy(base), CASES[case][1], r=4, alpha=8.0, use_rslora=True)
    torch.testing.assert_close(run(load_lora(fresh, tmp_path / "ours"), inputs), expected)


def test_trainable_parameter_counts():
    model = Plain()
    total_before = sum(p.numel() for p in model.parameters())
    inject_lora(model, ["attn", "mlp"], r=3, alpha=6)
    adapters = 4 * 3 * (24 + 24)  # 4 layers of r * (in + out)
    assert trainable_parameters(model) == (adapters, total_before + adapters)
    model = Plain()
    base_only = trainable_parameters(model)
    assert base_only == (total_before, total_before)


@pytest.mark.parametrize("case", ["deepseek", "deepseek_mini"])
def test_model_level_merge_unmerge_round_trip(case):
    _, ours, _, inputs = make_pair(case)
    originals = {n: m.base.weight.clone() for n, m in lora_layers(ours).items()}
    expected = run(ours, inputs)
    merge_lora(ours)
    torch.testing.assert_close(run(ours, inputs), expected)
    unmerge_lora(ours)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base.weight, originals[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(run(ours, inputs), expected)


# ---------------------------------------------------------------------------------------------
# QLoRA: LoRA over a frozen quantized base
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_qlora_trains_adapters_only(scheme):
    model = Plain()
    quantize_model(model, scheme, group_size=12 if scheme == "int4" else 128)
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    inject_lora(model, ["attn", "mlp"], r=4, alpha=8)
    layer = model.blocks[0]["attn"]
    assert isinstance(layer, LoRALinear) and isinstance(layer.base, QuantLinear)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(6, 24)
    expected = layer.base(x) + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    inputs, target = torch.randn(8, 12), torch.randn(8, 5)
    losses = []
    for _ in range(5):
        loss = F.mse_loss(model(inputs), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (".lora_" in name), name
    after = model.state_dict()
    for key, value in frozen.items():  # base (quantized weights, scales, biases) is untouched
        new_key = next(k for k in after if k.replace(".base.", ".") == key)
        assert torch.equal(after[new_key], value), key
    trainable, total = trainable_parameters(model)
    assert trainable == 4 * 4 * (24 + 24)
    assert total == sum(p.numel() for p in Plain().parameters()) + trainable
    with pytest.raises(TypeError, match="quantized base"):
        layer.merge()


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------

def test_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="target_modules must be a list"):
        inject_lora(Plain(), "attn")
    with pytest.raises(ValueError, match="no module of the model matches"):
        inject_lora(Plain(), ["q_proj"])
    with pytest.raises(TypeError, match="'blocks.0' matches target_modules but is a ModuleDict"):
        inject_lora(Plain(), ["0"])
    with pytest.raises(ValueError, match="r \\(the rank\\) must be a positive integer"):
        LoRALinear(nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(TypeError, match="base must be an nn.Linear or QuantLinear"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2, alpha=1)
    model = inject_lora(Plain(), ["head"])
    with pytest.raises(ValueError, match="already has a LoRA adapter"):
        inject_lora(model, ["head"])
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_lora(Plain(), tmp_path / "none")
    save_lora(model, tmp_path / "head")
    other = inject_lora(Plain(), ["head"], r=2)
    with pytest.raises(ValueError, match=r"head.lora_A: expected shape \(2, 24\), got \(8, 24\)"):
        load_lora(other, tmp_path / "head")
    with pytest.raises(ValueError, match=r"head: the model's adapter has \(alpha, use_rslora\) = \(8, False\) "
                                         r"but the saved one has \(16, False\)"):
        load_lora(inject_lora(Plain(), ["head"], alpha=8), tmp_path / "head")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_lora(Plain(), tmp_path / "missing")
    with pytest.raises(ValueError, match="lora_A must be"):
        lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 5), torch.randn(3, 2), 1.0)


def test_lora_linear_dispatches_to_fused_kernel_with_same_result(monkeypatch):
    """With the Triton backend (here forced, through the interpreter) LoRALinear runs the fused
    LoRA kernel: same output and same gradients for x and the adapters as the reference."""
    from deepseek_mini import backend
    from deepseek_mini.kernels import fused_lora

    calls = []
    real = fused_lora.fused_lora_linear
    monkeypatch.setattr(fused_lora, "fused_lora_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = LoRALinear(nn.Linear(48, 40), r=4, alpha=8)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(2, 5, 48, requires_grad=True)

    def forward_and_grads():
        out = layer(x)
        return (out, *torch.autograd.grad(out.square().sum(), [x, layer.lora_A, layer.lora_B]))

    expected = forward_and_grads()
    with backend.forced("triton"):
        got = forward_and_grads()
    assert calls == [1]
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-4)


def test_tied_weight_is_never_merged():
    """A LoRA on an lm_head tied to the embedding must not merge: W += BA would change the
    embedding too."""
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    model = DeepseekModel(DeepseekConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, n_routed_experts=None,
                                         q_lora_rank=8, kv_lora_rank=8, tie_word_embeddings=True))
    embedding = model.embed_tokens.weight.clone()
    inject_lora(model, ["lm_head", "o_proj"])
    assert model.lm_head.weight_is_shared and not model.layers[0].self_attn.o_proj.weight_is_shared
    with pytest.raises(RuntimeError, match="tied to another module"):
        merge_lora(model)
    assert torch.equal(model.embed_tokens.weight, embedding)


def test_lora_with_gradient_checkpointing_and_qlora_on_our_model():
    """Our DeepseekModel: LoRA gradients are the same with activation checkpointing on, and
    QLoRA (int4 base, adapters on MLA projections) trains with the model's own loss."""
    ids = torch.randint(0, 64, (2, 9))
    model = inject_lora(tiny_deepseek_mini(), DEEPSEEK_TARGETS, r=4, alpha=8).train()
    for layer in lora_layers(model).values():
        torch.nn.init.normal_(layer.lora_B, std=0.1)
    grads = []
    for checkpointing in (False, True):
        model.gradient_checkpointing = checkpointing
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * 3 * 2
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name])

    model = tiny_deepseek_mini().train()
    report = quantize_model(model, "int4", group_size=16, skip=["lm_head"])  # experts included
    assert {r.name.rsplit(".", 1)[-1] for r in report} >= set(DEEPSEEK_TARGETS) | {"gate_proj", "down_proj"}
    # the dense and shared-expert MLPs are adaptable too; the quantized routed experts are not targets
    inject_lora(model, DEEPSEEK_TARGETS + ["gate_proj", "up_proj", "down_proj"], r=4, alpha=8)
    assert not any(".experts." in name for name in lora_layers(model))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-2)
    losses = []
    for _ in range(8):
        loss = model(ids, labels=ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05
    assert all(isinstance(m.base, QuantLinear) for m in lora_layers(model).values())
