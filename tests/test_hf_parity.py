"""Logits parity with transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM, both ways:
a random transformers model saved to disk -> load_pretrained -> same logits, and a random model of
ours -> save_pretrained -> transformers' from_pretrained -> same logits (float32, atol 1e-5)."""

import json

import pytest
import torch

from deepseek_mini import load_pretrained, save_pretrained
from deepseek_mini.hf import config_from_hf
from deepseek_mini.model import DeepseekConfig, DeepseekModel

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=96, hidden_size=32, intermediate_size=40, moe_intermediate_size=12, num_hidden_layers=2,
            num_attention_heads=4, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=12,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, max_position_embeddings=64)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 16,
        "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 1.0}
YARN_PLAIN = {"rope_type": "yarn", "rope_theta": 500.0, "factor": 2.0, "original_max_position_embeddings": 32}

V3_CASES = {
    "q_lora_groups2_norm_dense1": dict(q_lora_rank=24, n_group=2, topk_group=1, norm_topk_prob=True,
                                       first_k_dense_replace=1, routed_scaling_factor=2.5),
    "no_q_lora_groups4_nonorm_yarn": dict(q_lora_rank=None, n_group=4, topk_group=2, norm_topk_prob=False,
                                          first_k_dense_replace=0, rope_parameters=YARN, routed_scaling_factor=1.5),
    "half_rope_one_group_yarn_bias": dict(q_lora_rank=20, n_group=1, topk_group=1, norm_topk_prob=True,
                                          first_k_dense_replace=1, rope_interleave=False, rope_parameters=YARN_PLAIN,
                                          attention_bias=True, rms_norm_eps=1e-5, n_shared_experts=2),
    "three_layers_16_experts_top4": dict(num_hidden_layers=3, n_routed_experts=16, num_experts_per_tok=4, n_group=4,
                                         topk_group=2, q_lora_rank=16, first_k_dense_replace=1, hidden_size=48,
                                         num_attention_heads=6, rope_parameters=YARN, routed_scaling_factor=2.5),
    # transformers still builds (and saves) shared experts, 0 wide, when there are none
    "no_shared_experts_dense0": dict(n_shared_experts=0, first_k_dense_replace=0, q_lora_rank=16, n_group=2,
                                     topk_group=1, rope_interleave=False),
}
V2_CASES = {
    "greedy_no_q_lora_yarn_dense1": dict(q_lora_rank=None, topk_method="greedy", first_k_dense_replace=1,
                                         rope_parameters=YARN, routed_scaling_factor=1.0),
    "group_limited_q_lora_dense0": dict(q_lora_rank=24, topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                        first_k_dense_replace=0, routed_scaling_factor=2.0),
    "three_layers_shared2_top3": dict(num_hidden_layers=3, q_lora_rank=None, topk_method="greedy", n_shared_experts=2,
                                      num_experts_per_tok=3, first_k_dense_replace=1, routed_scaling_factor=16.0),
}


def randomize_(model):
    """Random values everywhere (norm weights, biases, the gate's correction bias included), so
    that a wrong mapping of any tensor shows up in the logits."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.2) if p.dim() > 1 else p.uniform_(0.5, 1.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return model.eval()


def hf_model(version, case):
    if version == 3:
        cfg = transformers.DeepseekV3Config(**{**TINY, **case})
        return randomize_(transformers.DeepseekV3ForCausalLM(cfg))
    cfg = transformers.DeepseekV2Config(**{**TINY, **case})
    return randomize_(transformers.DeepseekV2ForCausalLM(cfg))


def assert_same_logits(hf, ours, seq=20):
    ids = torch.randint(0, TINY["vocab_size"], (2, seq))
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


CASES = [(3, name) for name in V3_CASES] + [(2, name) for name in V2_CASES]


@pytest.mark.parametrize("version,name", CASES)
def test_transformers_to_ours(version, name, tmp_path):
    hf = hf_model(version, (V3_CASES if version == 3 else V2_CASES)[name])
    hf.save_pretrained(tmp_path)
    ours = load_pretrained(tmp_path)
    assert_same_logits(hf, ours, seq=40 if "yarn" in name else 20)  # past original_max_position_embeddings


@pytest.mark.parametrize("version,name", CASES)
def test_ours_to_transformers(version, name, tmp_path):
    # build our config the way a user would: from the HF field values
    hf_cfg = hf_model(version, (V3_CASES if version == 3 else V2_CASES)[name]).config.to_dict()
    ours = randomize_(DeepseekModel(config_from_hf(hf_cfg)))
    save_pretrained(ours, tmp_path)
    cls = transformers.DeepseekV3ForCausalLM if version == 3 else transformers.DeepseekV2ForCausalLM
    hf = cls.from_pretrained(tmp_path).eval()
    assert_same_logits(hf, ours)
    # and back again: the round trip is lossless
    again = load_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(ours.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


def test_native_config_saves_as_v3_and_tied_embeddings(tmp_path):
    ours = randomize_(DeepseekModel(DeepseekConfig(tie_word_embeddings=True, n_group=None, topk_group=None,
                                                   rope_scaling={"type": "yarn", "factor": 2.0})))
    save_pretrained(ours, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "deepseek_v3"
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_logits(hf, ours)


def with_legacy_rope_fields(cfg: dict) -> dict:
    """A transformers 5 config dict rewritten the way older config.json files say it:
    rope_theta + rope_scaling (with "type") instead of rope_parameters (with "rope_type")."""
    rope = cfg.pop("rope_parameters")
    cfg["rope_theta"] = rope.pop("rope_theta")
    rope["type"] = rope.pop("rope_type")
    cfg["rope_scaling"] = rope
    return cfg


def test_legacy_rope_scaling_fields(tmp_path):
    # config.json files on the Hub (written by older transformers) use rope_theta + rope_scaling
    hf = hf_model(2, V2_CASES["greedy_no_q_lora_yarn_dense1"])
    hf.save_pretrained(tmp_path)
    cfg = with_legacy_rope_fields(json.loads((tmp_path / "config.json").read_text()))
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    assert_same_logits(hf, load_pretrained(tmp_path))


def test_errors_name_the_problem(tmp_path):
    hf = hf_model(3, V3_CASES["q_lora_groups2_norm_dense1"])
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    half = load_pretrained(tmp_path, dtype="bfloat16")
    assert half.lm_head.weight.dtype == torch.bfloat16
    assert half.layers[1].mlp.gate.e_score_correction_bias.dtype == torch.float32

    def write(**changes):
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **changes}))

    write(sliding_window=4)
    with pytest.raises(ValueError, match="unsupported field.*sliding_window"):
        load_pretrained(tmp_path)
    write(scoring_func="softmax")
    with pytest.raises(ValueError, match="scoring_func"):
        load_pretrained(tmp_path)
    write(hidden_act="gelu")
    with pytest.raises(ValueError, match="hidden_act"):
        load_pretrained(tmp_path)
    write(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4})
    with pytest.raises(ValueError, match="rope type 'linear'"):
        load_pretrained(tmp_path)
    write(model_type="llama")
    with pytest.raises(ValueError, match="model_type 'llama'"):
        load_pretrained(tmp_path)
    write(n_routed_experts=16)
    with pytest.raises(ValueError, match="missing .*expert"):
        load_pretrained(tmp_path)
    write(kv_lora_rank=8)
    with pytest.raises(ValueError, match="shape"):
        load_pretrained(tmp_path)

    # a tensor missing from the checkpoint is named
    from safetensors.torch import load_file, save_file
    write()
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.0.self_attn.kv_a_layernorm.weight"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="missing.*layers.0.self_attn.kv_a_layernorm.weight"):
        load_pretrained(tmp_path)


def test_save_refuses_what_transformers_cannot_represent(tmp_path):
    model = DeepseekModel(DeepseekConfig(scoring_func="softmax", topk_method="greedy", norm_topk_prob=True))
    with pytest.raises(ValueError, match="norm_topk_prob"):
        save_pretrained(model, tmp_path)
    model = DeepseekModel(DeepseekConfig(capacity_factor=1.25))
    with pytest.raises(ValueError, match="capacity_factor"):
        save_pretrained(model, tmp_path)
    model = DeepseekModel(DeepseekConfig(scoring_func="sigmoid", topk_method="greedy"))
    with pytest.raises(ValueError, match="no transformers equivalent"):
        save_pretrained(model, tmp_path)


def test_v2_norm_topk_prob_follows_transformers_with_a_warning(tmp_path):
    hf = hf_model(2, {**V2_CASES["group_limited_q_lora_dense0"], "norm_topk_prob": True})
    hf.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="norm_topk_prob"):
        ours = load_pretrained(tmp_path)
    assert_same_logits(hf, ours)


def test_hub_style_v3_config_and_mtp_layer(tmp_path):
    """config.json as DeepSeek published it (rope_scaling, scoring_func, topk_method, ...) and an
    extra multi-token-prediction layer after the last block, which is skipped like transformers does."""
    from safetensors.torch import load_file, save_file

    hf = hf_model(3, V3_CASES["no_q_lora_groups4_nonorm_yarn"])
    hf.save_pretrained(tmp_path)
    cfg = with_legacy_rope_fields(json.loads((tmp_path / "config.json").read_text()))
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1, ep_size=1,
               seq_aux=True, aux_loss_alpha=0.001, num_nextn_predict_layers=1, torch_dtype="float32",
               auto_map={"AutoConfig": "configuration_deepseek.DeepseekV3Config"})
    for key in ("dtype", "head_dim", "qk_head_dim"):
        cfg.pop(key, None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(tmp_path / "model.safetensors")
    n = cfg["num_hidden_layers"]
    tensors.update({k.replace("layers.1.", f"layers.{n}."): v.clone() for k, v in tensors.items() if ".layers.1." in k})
    save_file(tensors, tmp_path / "model.safetensors")
    assert_same_logits(hf, load_pretrained(tmp_path))


def test_fp8_checkpoint_is_dequantized_on_load(tmp_path):
    """DeepSeek-V3 ships FP8 weights with one `weight_scale_inv` per 128x128 block; loading such a
    folder gives the model whose weights are the dequantized blocks (transformers' logits on them)."""
    from safetensors.torch import load_file, save_file

    from deepseek_mini.quant import dequantize_fp8_block, quantize_fp8_block

    hf = hf_model(3, V3_CASES["q_lora_groups2_norm_dense1"])
    hf.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    fp8, dequantized = {}, {}
    for key, t in tensors.items():
        is_linear = key.endswith("proj.weight") and t.dim() == 2  # the projections are FP8 in the release
        if is_linear:
            q, scale_inv = quantize_fp8_block(t.float(), block_size=16)
            fp8[key], fp8[key + "_scale_inv"] = q, scale_inv
            dequantized[key] = dequantize_fp8_block(q, scale_inv, block_size=16)
        else:
            fp8[key] = dequantized[key] = t
    assert any(k.endswith("weight_scale_inv") for k in fp8)
    save_file(fp8, tmp_path / "model.safetensors")
    cfg = json.loads((tmp_path / "config.json").read_text())
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [16, 16]}

    # without the quantization_config the scales cannot be interpreted: a clear error
    with pytest.raises(ValueError, match="FP8 scales"):
        load_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": {**quant, "fmt": "e5m2"}}))
    with pytest.raises(ValueError, match="quantization_config"):
        load_pretrained(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({**cfg, "quantization_config": quant}))
    ours = load_pretrained(tmp_path)
    # the reference: transformers on a plain float checkpoint holding the dequantized weights
    float_dir = tmp_path / "dequantized"
    float_dir.mkdir()
    (float_dir / "config.json").write_text(json.dumps(cfg))
    save_file(dequantized, float_dir / "model.safetensors")
    reference = transformers.DeepseekV3ForCausalLM.from_pretrained(float_dir).eval()
    assert_same_logits(reference, ours)
    with torch.no_grad():  # and quantization really happened: the FP8 model differs from the original
        ids = torch.randint(0, TINY["vocab_size"], (1, 8))
        assert not torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)
