"""Regression tests for issue 15 (library side): checkpoints that load as a silently wrong model,
config and quantization validation, LoRA load rollback, the pretrained cache's repair, the
trainer's atomic checkpoints and `doctor`'s report. Each test failed before its fix."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from deepseek_mini.hf import load_pretrained, save_pretrained
from deepseek_mini.model import DeepseekConfig, DeepseekModel

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8,
             v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64)


def small_model(seed=0, **changes):
    torch.manual_seed(seed)
    return DeepseekModel(DeepseekConfig(**{**SMALL, **changes})).eval()


# ----------------------------------------------------------------------------------------------
# 5. load_pretrained / save_pretrained
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def checkpoint(tmp_path):
    save_pretrained(small_model(), tmp_path)
    return tmp_path


def rewrite_tensors(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


KEY = "model.layers.0.self_attn.o_proj.weight"


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool, torch.int8])
def test_load_refuses_integer_and_bool_tensors_of_the_right_shape(checkpoint, dtype):
    rewrite_tensors(checkpoint, lambda t: t.update({KEY: t[KEY].to(dtype)}))
    with pytest.raises(ValueError, match=rf"model.safetensors: tensor '{KEY}' has dtype {dtype}; expected float32"):
        load_pretrained(checkpoint)


def test_load_refuses_fp8_weights_without_their_scales(checkpoint):
    from deepseek_mini.quant import quantize_fp8_block

    fp8, scale_inv = quantize_fp8_block(load_file(checkpoint / "model.safetensors")[KEY], block_size=16)
    rewrite_tensors(checkpoint, lambda t: t.update({KEY: fp8}))
    # no quantization_config, no scales: the raw FP8 codes must not load as weights
    with pytest.raises(ValueError, match=rf"tensor '{KEY}' is float8_e4m3fn but config.json has no FP8"):
        load_pretrained(checkpoint)
    # with a quantization_config but still no scales
    cfg = json.loads((checkpoint / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]}
    (checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=rf"'{KEY}' is float8_e4m3fn but its scales '{KEY}_scale_inv' are missing"):
        load_pretrained(checkpoint)
    # scales next to a weight that is not FP8 would be dropped silently
    rewrite_tensors(checkpoint, lambda t: t.update({KEY: fp8.float(), KEY + "_scale_inv": scale_inv}))
    with pytest.raises(ValueError, match="scales a weight that is missing or not float8_e4m3fn"):
        load_pretrained(checkpoint)
    # and with both, it loads
    rewrite_tensors(checkpoint, lambda t: t.update({KEY: fp8, KEY + "_scale_inv": scale_inv}))
    assert load_pretrained(checkpoint).layers[0].self_attn.o_proj.weight.dtype == torch.float32


def test_load_refuses_a_config_with_fewer_layers_than_the_checkpoint(checkpoint):
    cfg = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2}))
    with pytest.raises(ValueError, match=r"do not match config.json \(num_hidden_layers=2\).*unexpected \['layers.2"):
        load_pretrained(checkpoint)
    # declared multi-token-prediction layers after the last block are still skipped
    (checkpoint / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 2, "num_nextn_predict_layers": 1}))
    assert load_pretrained(checkpoint).config.num_hidden_layers == 2


def test_save_replaces_a_stale_sharded_checkpoint(tmp_path):
    old, new = small_model(seed=1), small_model(seed=2)
    # an earlier, sharded save into the same folder (as transformers writes big models)
    save_pretrained(old, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    keys = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, part in shards.items():
        save_file({k: tensors[k] for k in part}, tmp_path / name)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in shards.items() for k in part}}))
    assert torch.equal(load_pretrained(tmp_path).embed_tokens.weight, old.embed_tokens.weight)

    save_pretrained(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_pretrained(tmp_path).embed_tokens.weight, new.embed_tokens.weight)


def test_load_prefers_model_safetensors_and_checks_the_index(checkpoint):
    # a stale index written by another tool does not win over model.safetensors (as in transformers)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {KEY: "gone.safetensors"}}))
    load_pretrained(checkpoint)
    (checkpoint / "model.safetensors").rename(checkpoint / "whole.safetensors")
    with pytest.raises(FileNotFoundError, match=r"index.json lists shard\(s\) \['gone.safetensors'\]"):
        load_pretrained(checkpoint)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/ABS/outside.safetensors", "sub/../../outside.safetensors"])
def test_load_refuses_an_index_that_points_outside_the_folder(checkpoint, shard):
    # a downloaded index is data: it must not make us read a file elsewhere on the machine
    outside = checkpoint.parent / "outside.safetensors"
    (checkpoint / "model.safetensors").rename(outside)
    shard = shard.replace("/ABS", str(checkpoint.parent))
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {KEY: shard}}))
    with pytest.raises(ValueError, match=r"outside .*a weight_map value must be a plain file name"):
        load_pretrained(checkpoint)


@pytest.mark.parametrize("text,problem", [("{not json", "is not valid JSON"), ("[1, 2]", "must hold a JSON object"),
                                          ('"x"', "must hold a JSON object")])
def test_bad_json_names_the_file(checkpoint, text, problem):
    (checkpoint / "config.json").write_text(text)
    with pytest.raises(ValueError, match=rf"config.json {problem}"):
        load_pretrained(checkpoint)
    (checkpoint / "model.safetensors").rename(checkpoint / "model-00001-of-00001.safetensors")
    save_pretrained(small_model(), checkpoint / "fresh")
    (checkpoint / "config.json").write_text((checkpoint / "fresh" / "config.json").read_text())
    (checkpoint / "model.safetensors.index.json").write_text(text)
    with pytest.raises(ValueError, match=rf"model.safetensors.index.json {problem}"):
        load_pretrained(checkpoint)


def test_truncated_safetensors_names_the_file(checkpoint):
    data = (checkpoint / "model.safetensors").read_bytes()
    (checkpoint / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*model.safetensors \(truncated"):
        load_pretrained(checkpoint)


# ----------------------------------------------------------------------------------------------
# 6. Trainer checkpoints
# ----------------------------------------------------------------------------------------------

def _trainer_tools():
    from test_train import batches, losses, make  # the small LM and data of the trainer's own tests

    return make, batches, losses


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_crash_during_a_second_save_keeps_the_first_checkpoint_whole(tmp_path, monkeypatch):
    import safetensors.torch

    make, _, _ = _trainer_tools()
    model, trainer = make()
    trainer.fit(steps=3)
    at_step_3 = _weights(model)
    trainer.save_checkpoint(tmp_path / "ckpt")
    trainer.fit(steps=3)

    real_save_file = safetensors.torch.save_file

    def crash_on_optimizer(tensors, filename, metadata=None):
        if str(filename).endswith("optimizer.safetensors"):
            raise OSError("disk full")
        return real_save_file(tensors, filename, metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_checkpoint(tmp_path / "ckpt")  # model.safetensors of step 6 was written, then the crash
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"], "the failed save must not leave temporary folders"
    fresh_model, fresh = make(init_seed=5)
    fresh.load_checkpoint(tmp_path / "ckpt")
    assert fresh.step == 3 and _same(_weights(fresh_model), at_step_3), "step 3 must come with the step-3 weights"


def test_a_killed_save_is_cleaned_up_and_latest_checkpoint_skips_it(tmp_path):
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    from deepseek_mini.train import latest_checkpoint

    script = textwrap.dedent(f"""
        import os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import safetensors.torch
        from test_train import make
        _, trainer = make()
        trainer.fit(steps=2)
        trainer.save_checkpoint({str(tmp_path / "step-000002")!r})
        trainer.fit(steps=2)
        real = safetensors.torch.save_file
        def killed(tensors, filename, metadata=None):  # the process dies in the middle of the save
            if str(filename).endswith("optimizer.safetensors"):
                os._exit(3)
            return real(tensors, filename, metadata)
        safetensors.torch.save_file = killed
        trainer.save_checkpoint({str(tmp_path / "step-000004")!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 3, done.stderr
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert len(leftovers) == 1 and (leftovers[0] / "model.safetensors").is_file()  # the interrupted save's
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000002"

    make, _, _ = _trainer_tools()
    _, trainer = make()
    trainer.load_checkpoint(latest_checkpoint(tmp_path)).fit(steps=4)
    trainer.save_checkpoint(tmp_path / "step-000006")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000002", "step-000006"]
    assert latest_checkpoint(tmp_path) == tmp_path / "step-000006"


def test_latest_checkpoint_skips_damaged_folders(tmp_path):
    from deepseek_mini.train import latest_checkpoint

    make, _, _ = _trainer_tools()
    assert latest_checkpoint(tmp_path / "none") is None and latest_checkpoint(tmp_path) is None
    _, trainer = make()
    for name in ("a", "b", "c"):  # names do not order the steps; trainer_state.json does
        trainer.fit(steps=2)
        trainer.save_checkpoint(tmp_path / name)
    data = (tmp_path / "c" / "model.safetensors").read_bytes()
    (tmp_path / "c" / "model.safetensors").write_bytes(data[:100])  # e.g. written by a non-atomic tool
    (tmp_path / "notes").mkdir()
    assert latest_checkpoint(tmp_path) == tmp_path / "b"


def test_a_failed_load_leaves_the_model_and_trainer_unchanged(tmp_path):
    make, _, _ = _trainer_tools()
    _, trainer = make()
    trainer.fit(steps=2)
    trainer.save_checkpoint(tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    last = sorted(weights)[-1]  # a late tensor: the ones before it would already be copied
    weights[last] = torch.zeros(3, 3)
    save_file(weights, tmp_path / "ckpt" / "model.safetensors")

    model, other = make(init_seed=7)
    before = _weights(model)
    with pytest.raises(ValueError, match=rf"model.safetensors does not fit this model: \['{last}: torch.float32 \(3, 3\)"):
        other.load_checkpoint(tmp_path / "ckpt")
    assert _same(_weights(model), before) and other.step == 0 and not other.optimizer.state

    trainer.save_checkpoint(tmp_path / "ckpt")
    data = (tmp_path / "ckpt" / "optimizer.safetensors").read_bytes()
    (tmp_path / "ckpt" / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cannot read .*optimizer.safetensors \(truncated"):
        other.load_checkpoint(tmp_path / "ckpt")
    assert _same(_weights(model), before) and other.step == 0


@pytest.mark.parametrize("change", [{"seed": 1}, {"grad_accum_steps": 2}, {"lr": 1e-2}, {"max_steps": 20}])
def test_resume_with_other_training_settings_is_an_error_unless_allowed(tmp_path, change):
    make, _, _ = _trainer_tools()
    _, trainer = make()
    trainer.fit(steps=2)
    trainer.save_checkpoint(tmp_path / "ckpt")
    name, value = next(iter(change.items()))
    _, other = make(**change)
    with pytest.raises(ValueError, match=rf"other training settings \({name}: saved .*, now {value!r}\)"):
        other.load_checkpoint(tmp_path / "ckpt")
    assert other.step == 0
    assert other.load_checkpoint(tmp_path / "ckpt", allow_config_changes=True).step == 2
    # settings that do not change the steps may differ
    _, quiet = make(eval_every=5, progress=False, checkpoint_every=3, checkpoint_dir=str(tmp_path / "more"))
    assert quiet.load_checkpoint(tmp_path / "ckpt").step == 2


# ----------------------------------------------------------------------------------------------
# 10. Validation: DeepseekConfig, quantization, LoRA loading
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("field,value,expected", [
    ("intermediate_size", -4, "a positive int"),
    ("vocab_size", True, "a positive int"),
    ("vocab_size", 512.0, "a positive int"),
    ("moe_intermediate_size", 0, "a positive int"),
    ("rms_norm_eps", 0.0, "a finite number > 0"),
    ("rms_norm_eps", float("nan"), "a finite number > 0"),
    ("rope_theta", 0.0, "a finite number > 0"),
    ("rope_theta", -10000.0, "a finite number > 0"),
    ("routed_scaling_factor", -1.0, "a finite number > 0"),
    ("n_shared_experts", -1, "an int >= 0 or None"),
    ("n_routed_experts", -2, "an int >= 0 or None"),
    ("num_experts_per_tok", 1.5, "an int in"),
    ("aux_loss_alpha", float("inf"), "a finite number >= 0"),
    ("initializer_range", -0.02, "a finite number >= 0"),
    ("capacity_factor", 0, "a finite number > 0 or None"),
    ("norm_topk_prob", "yes", "True or False"),
    ("n_group", 0, "a positive int or None"),
])
def test_config_names_the_bad_field(field, value, expected):
    with pytest.raises(ValueError, match=rf"DeepseekConfig\.{field}=.*expected {expected}"):
        DeepseekConfig(**{**SMALL, field: value})


def test_config_accepts_the_real_sizes_and_plain_numbers():
    DeepseekConfig.deepseek_v3()
    DeepseekConfig.deepseek_v2_lite()
    DeepseekConfig(rope_theta=10000, rms_norm_eps=1e-5, routed_scaling_factor=2)  # ints from a JSON file
    DeepseekConfig(n_routed_experts=None, num_experts_per_tok=0)  # dense: the MoE fields do not matter


def test_quantize_model_refuses_a_zero_group_or_block_size():
    from torch import nn

    from deepseek_mini.quant import quantize_model

    model = nn.Sequential(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="group_size must be an even integer >= 2, got 0"):
        quantize_model(model, "int4", group_size=0)
    with pytest.raises(ValueError, match="block_size must be a positive integer, got 0"):
        quantize_model(model, "fp8", block_size=0)
    assert isinstance(model[0], nn.Linear), "nothing is replaced when the arguments are wrong"


@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int4", "fp8"])
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_quantized_layers_refuse_integer_inputs(scheme, dtype):
    from torch import nn

    from deepseek_mini.moe import Experts
    from deepseek_mini.quant import QuantExperts, QuantLinear

    layer = QuantLinear.from_linear(nn.Linear(8, 4), scheme, group_size=8)
    with pytest.raises(TypeError, match=rf"x must be a float16/bfloat16/float32 tensor .*got {dtype}"):
        layer(torch.ones(2, 8, dtype=dtype))  # used to return integers (all zeros)
    experts = QuantExperts(Experts(2, 8, 8), scheme, group_size=8)
    with pytest.raises(TypeError, match=rf"got {dtype}"):
        experts(torch.ones(3, 8, dtype=dtype), torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1))


def _lora_state(model):
    from deepseek_mini.lora import lora_layers

    return (sorted(lora_layers(model)), {n: p.requires_grad for n, p in model.named_parameters()},
            [type(m).__name__ for m in model.modules()])


@pytest.mark.parametrize("damage", ["shape", "dtype", "rank", "missing_B", "truncated"])
def test_a_failed_adapter_load_rolls_the_model_back(tmp_path, damage):
    from deepseek_mini.lora import inject_lora, load_lora, save_lora

    donor = small_model()
    inject_lora(donor, ["q_b_proj", "o_proj"], r=4, alpha=8)
    save_lora(donor, tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    key = sorted(k for k in tensors if k.endswith("o_proj.lora_B.weight"))[-1]  # the last one copied
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    if damage == "shape":
        tensors[key] = torch.zeros(3, 3)
    elif damage == "dtype":
        tensors[key] = tensors[key].to(torch.int64)
    elif damage == "missing_B":
        del tensors[key]
    elif damage == "rank":
        cfg["r"] = 0
    save_file(tensors, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    if damage == "truncated":
        data = (tmp_path / "adapter_model.safetensors").read_bytes()
        (tmp_path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])

    model = small_model()
    model.embed_tokens.weight.requires_grad_(False)  # the caller's own choices survive the rollback
    before, weights = _lora_state(model), _weights(model)
    with pytest.raises(ValueError):
        load_lora(model, tmp_path)
    assert _lora_state(model) == before, "no adapter may stay injected, no parameter frozen"
    assert _same(_weights(model), weights)


# ----------------------------------------------------------------------------------------------
# 7. pretrained() cache repair (a private DEEPSEEK_MINI_HOME, a seconds-long recipe)
# ----------------------------------------------------------------------------------------------

@pytest.fixture
def tiny_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_MINI_HOME", str(tmp_path))
    from test_pretrained import FAST

    return {**FAST, "steps": 2}


@pytest.mark.parametrize("damage", ["missing_file", "truncated_weights", "bad_json"])
def test_a_damaged_cache_entry_is_rebuilt(tiny_home, damage):
    from deepseek_mini.pretrained import DamagedCacheError, load, pretrained

    first = pretrained("tiny", **tiny_home)
    weights = _weights(first.model)
    if damage == "missing_file":
        (first.path / "history.json").unlink()
    elif damage == "truncated_weights":
        data = (first.path / "model.safetensors").read_bytes()
        (first.path / "model.safetensors").write_bytes(data[: len(data) // 3])
        with pytest.raises(DamagedCacheError, match=r"model.safetensors is damaged .*rebuild=True"):
            load(first.path)
    else:
        (first.path / "config.json").write_text("[1, 2")
        with pytest.raises(ValueError, match=r"config.json is damaged .*rebuild=True"):
            load(first.path)

    again = pretrained("tiny", **tiny_home)  # used to fail with "Directory not empty" / SafetensorError
    assert again.path == first.path and _same(_weights(again.model), weights), "the build is deterministic"
    assert pretrained("tiny", **tiny_home).path == first.path  # and the repaired entry loads from now on
    assert [p.name for p in first.path.parent.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock")] == []


# ----------------------------------------------------------------------------------------------
# 11. doctor
# ----------------------------------------------------------------------------------------------

def test_doctor_finds_the_built_tiny_model(tiny_home, capsys):
    from deepseek_mini import doctor, paths
    from deepseek_mini.pretrained import pretrained

    rows, problems = doctor.report()
    assert dict(rows)["tiny model cache"].endswith("(not built yet: first use builds it)") and not problems
    built = pretrained("tiny", **tiny_home).path
    assert built.name.startswith("tiny-") and built.parent == paths.models_dir()
    rows, problems = doctor.report()
    assert dict(rows)["tiny model cache"] == f"{built} (built)" and not problems


def test_doctor_reports_a_missing_deepseek_mini_home(tmp_path, monkeypatch, capsys):
    from deepseek_mini import doctor

    monkeypatch.setenv("DEEPSEEK_MINI_HOME", str(tmp_path / "nonexistent"))
    assert doctor.main([]) == 1
    out = capsys.readouterr().out
    assert f"DEEPSEEK_MINI_HOME={tmp_path / 'nonexistent'} is not an existing folder" in out
    assert "All set" not in out


def test_a_failed_injection_keeps_the_adapters_already_there():
    from deepseek_mini.lora import inject_lora

    model = small_model()
    inject_lora(model, ["o_proj"], r=4, alpha=8)
    before = _lora_state(model)
    with pytest.raises(ValueError, match="r \\(the rank\\) must be a positive integer"):
        inject_lora(model, ["q_b_proj"], r=0)
    assert _lora_state(model) == before
