"""Hugging Face checkpoints <-> DeepseekModel.

A Hugging Face DeepSeek-V3 / V2 checkpoint is a folder with `config.json` and one or more
`*.safetensors` files whose keys look like `model.layers.3.mlp.experts.17.up_proj.weight`.
Our module names are the same except that
  * there is no leading `model.` (our DeepseekModel is the whole causal LM), and
  * the routed experts are stacked: `layers.3.mlp.experts.up_proj` is [n_experts, inter, dim].

    load_pretrained(path, dtype=torch.float32) -> DeepseekModel
    save_pretrained(model, path)               -> writes config.json + model.safetensors

Multi-token-prediction (MTP) layers (DeepSeek-V3's `model.layers.{num_hidden_layers + k}`, see
`deepseek_mini.mtp`) are skipped on load, as transformers' DeepseekV3ForCausalLM skips them, with
a warning; `load_pretrained(path, mtp=True)` loads them into `model.mtp`, and `save_pretrained`
writes a model's MTP modules under those names (with config.json's `num_nextn_predict_layers`).

Both refuse what they cannot represent exactly (an unknown config field, an FP8 checkpoint, a
missing tensor, ...) with an error naming it, instead of producing a subtly different model.
Where transformers itself departs from DeepSeek's original code, we follow transformers (the
reference our tests compare with) and say so in a warning.
"""

import json
import os
import re
import warnings
from pathlib import Path

import torch

from deepseek_mini.model import DeepseekConfig, DeepseekModel
from deepseek_mini.rope import rope_type

# transformers 5.23 defaults, used for fields a config.json leaves out
_DEFAULTS = {
    "deepseek_v3": dict(
        vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        num_hidden_layers=61, num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, v_head_dim=128,
        qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3,
        norm_topk_prob=True, hidden_act="silu", max_position_embeddings=4096, initializer_range=0.02,
        rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1, pad_token_id=None, tie_word_embeddings=False,
        rope_interleave=True, attention_bias=False, attention_dropout=0.0,
        scoring_func="sigmoid", topk_method="noaux_tc"),
    "deepseek_v2": dict(
        vocab_size=102400, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
        num_attention_heads=32, hidden_act="silu", max_position_embeddings=2048, initializer_range=0.02,
        rms_norm_eps=1e-6, bos_token_id=1, eos_token_id=2, pad_token_id=None, tie_word_embeddings=False,
        attention_bias=False, attention_dropout=0.0, first_k_dense_replace=0, kv_lora_rank=512,
        q_lora_rank=1536, n_group=None, n_routed_experts=64, n_shared_experts=2, qk_nope_head_dim=128,
        qk_rope_head_dim=64, routed_scaling_factor=1.0, topk_group=None, topk_method="greedy",
        norm_topk_prob=False, v_head_dim=128, num_experts_per_tok=None, moe_intermediate_size=1407,
        scoring_func="softmax", rope_interleave=True),
}

# config.json fields that do not change the forward pass (bookkeeping, generation, training-only)
_IGNORED = {
    "architectures", "auto_map", "transformers_version", "dtype", "torch_dtype", "_name_or_path", "model_type",
    "use_cache", "output_router_logits", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "problem_type", "is_encoder_decoder", "chunk_size_feed_forward", "tokenizer_class",
    "initializer_range", "pretraining_tp", "ep_size", "num_nextn_predict_layers", "num_mtp_layers", "seq_aux",
    "aux_loss_alpha", "router_aux_loss_coef", "head_dim", "qk_head_dim", "num_key_value_heads",
    "tie_encoder_decoder", "use_return_dict", "quantization_config", "bos_token_id", "eos_token_id", "pad_token_id",
    # generic fields older transformers versions wrote into every config.json
    "_attn_implementation_autoset", "_attn_implementation", "attn_implementation", "use_bfloat16", "torchscript",
    "tf_legacy_loss", "pruned_heads", "is_decoder", "add_cross_attention", "cross_attention_hidden_size",
    "finetuning_task", "task_specific_params", "prefix", "sep_token_id", "decoder_start_token_id",
    "max_length", "min_length", "do_sample", "early_stopping", "num_beams", "num_beam_groups", "diversity_penalty",
    "temperature", "top_k", "top_p", "typical_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size", "bad_words_ids", "num_return_sequences", "output_scores",
    "return_dict_in_generate", "forced_bos_token_id", "forced_eos_token_id", "remove_invalid_values",
    "exponential_decay_length_penalty", "suppress_tokens", "begin_suppress_tokens",
}
# fields we take over one to one
_COPIED = {
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "num_attention_heads", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
    "n_routed_experts", "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "scoring_func",
    "topk_method", "norm_topk_prob", "routed_scaling_factor", "first_k_dense_replace", "moe_layer_freq",
    "max_position_embeddings", "rope_interleave", "rms_norm_eps", "hidden_act", "attention_bias",
    "attention_dropout", "tie_word_embeddings",
}
_ROPE_FIELDS = {"rope_parameters", "rope_scaling", "rope_theta"}
_V2_ONLY = {"mlp_bias"}


def config_from_hf(hf: dict) -> DeepseekConfig:
    """Our config from a Hugging Face DeepSeek-V3/V2 config.json dict."""
    model_type = hf.get("model_type")
    if model_type not in _DEFAULTS:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported; expected 'deepseek_v3' or 'deepseek_v2'")
    unknown = set(hf) - _IGNORED - _COPIED - _ROPE_FIELDS - _V2_ONLY
    if unknown:
        raise ValueError(f"config.json: unsupported field(s) {sorted(unknown)} (they may change the model's math)")
    fp8_block_size(hf)  # an FP8 release is dequantized on load; any other quantization is refused
    if hf.get("mlp_bias"):
        raise ValueError("config.json: mlp_bias=true is not supported (DeepSeek MLPs have no bias)")
    cfg = dict(_DEFAULTS[model_type])
    cfg.update({k: v for k, v in hf.items() if k in _COPIED})

    if model_type == "deepseek_v3":
        # transformers' DeepseekV3 always routes with sigmoid scores + bias + group top-2 sums
        for name, required in (("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")):
            if cfg[name] != required:
                raise ValueError(f"config.json: deepseek_v3 with {name}={cfg[name]!r} is not supported "
                                 f"(transformers' DeepseekV3 implements {name}={required!r})")
        cfg["n_group"] = cfg["n_group"] or 1
        cfg["topk_group"] = cfg["topk_group"] or 1
    else:
        if cfg["scoring_func"] != "softmax":
            raise ValueError(f"config.json: deepseek_v2 with scoring_func={cfg['scoring_func']!r} is not supported "
                             "(transformers' DeepseekV2 uses softmax)")
        if cfg["topk_method"] not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"config.json: deepseek_v2 topk_method={cfg['topk_method']!r} is not supported; "
                             "expected 'greedy' or 'group_limited_greedy'")
        if cfg["topk_method"] == "group_limited_greedy" and not (cfg["n_group"] and cfg["topk_group"]):
            raise ValueError("config.json: topk_method='group_limited_greedy' needs n_group and topk_group")
        if cfg["norm_topk_prob"]:
            warnings.warn("config.json: deepseek_v2 with norm_topk_prob=true: transformers' DeepseekV2 does not "
                          "renormalise the top-k weights, and this library follows transformers", stacklevel=3)
            cfg["norm_topk_prob"] = False
        cfg["rope_interleave"] = True  # V2 always rotates interleaved pairs
        cfg["n_group"] = cfg["n_group"] or 1
        cfg["topk_group"] = cfg["topk_group"] or 1
    if cfg["num_experts_per_tok"] is None:
        raise ValueError("config.json: num_experts_per_tok is required")
    if cfg["q_lora_rank"] == 0:
        cfg["q_lora_rank"] = None

    # RoPE: transformers 5 writes `rope_parameters`; older files `rope_theta` + `rope_scaling`.
    rope = dict(hf.get("rope_parameters") or {})
    if hf.get("rope_scaling"):
        rope = {**hf["rope_scaling"], **rope}
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    if kind not in ("default", "yarn"):
        raise ValueError(f"config.json: rope type {kind!r} is not supported; expected 'default' or 'yarn'")
    scaling = None
    if kind == "yarn":
        scaling = {"rope_type": "yarn", **rope}
        scaling.setdefault("original_max_position_embeddings", cfg["max_position_embeddings"])
        if scaling.get("factor") is None:  # as transformers: the extension ratio
            scaling["factor"] = cfg["max_position_embeddings"] / scaling["original_max_position_embeddings"]
    elif rope:
        raise ValueError(f"config.json: rope fields {sorted(rope)} given for the default rope type")
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        cfg[name] = hf.get(name, cfg[name])
    return DeepseekConfig(**cfg, rope_theta=float(theta), rope_scaling=scaling)


def hf_model_type(config: DeepseekConfig) -> str:
    """Which transformers architecture reproduces this config exactly (or a ValueError saying why none)."""
    if config.capacity_factor is not None:
        raise ValueError("save_pretrained: capacity_factor (dropping tokens) has no transformers equivalent")
    if not config.n_routed_experts or (config.scoring_func, config.topk_method) == ("sigmoid", "noaux_tc"):
        return "deepseek_v3"
    if config.scoring_func == "softmax" and config.topk_method in ("greedy", "group_limited_greedy"):
        if config.norm_topk_prob:
            raise ValueError("save_pretrained: a softmax gate with norm_topk_prob=True has no transformers "
                             "equivalent (DeepseekV2 never renormalises)")
        if not config.rope_interleave:
            raise ValueError("save_pretrained: a softmax (V2) gate with rope_interleave=False has no transformers "
                             "equivalent (DeepseekV2 always uses interleaved RoPE)")
        return "deepseek_v2"
    raise ValueError(f"save_pretrained: scoring_func={config.scoring_func!r} with topk_method={config.topk_method!r} "
                     "has no transformers equivalent (V3: sigmoid + noaux_tc; V2: softmax + greedy/group_limited_greedy)")


def config_to_hf(config: DeepseekConfig) -> dict:
    """The config.json dict for `config` (transformers 5 format)."""
    model_type = hf_model_type(config)
    out = {name: getattr(config, name) for name in sorted(_COPIED)}
    out.update(model_type=model_type, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
               pad_token_id=config.pad_token_id, initializer_range=config.initializer_range,
               num_key_value_heads=config.num_attention_heads, head_dim=config.qk_rope_head_dim,
               architectures=["DeepseekV3ForCausalLM" if model_type == "deepseek_v3" else "DeepseekV2ForCausalLM"])
    out["n_group"], out["topk_group"] = config.n_group or 1, config.topk_group or 1
    scaling = {k: v for k, v in (config.rope_scaling or {}).items() if k not in ("type", "rope_type")}
    out["rope_parameters"] = {"rope_type": rope_type(config.rope_scaling), "rope_theta": config.rope_theta, **scaling}
    if not config.n_routed_experts:  # an all-dense model: every layer is one of the "first k dense"
        out.update(n_routed_experts=1, num_experts_per_tok=1, n_group=1, topk_group=1,
                   first_k_dense_replace=config.num_hidden_layers)
    if model_type == "deepseek_v2":
        out.pop("rope_interleave")
        out.pop("scoring_func")
        out["mlp_bias"] = False
    else:
        out.pop("topk_method")
        out.pop("scoring_func")
    out.pop("moe_layer_freq")
    if model_type == "deepseek_v3":  # transformers' default is 1 (num_mtp_layers): say how many there are
        out["num_nextn_predict_layers"] = config.num_nextn_predict_layers
    elif config.num_nextn_predict_layers:
        raise ValueError("save_pretrained: multi-token prediction is a DeepSeek-V3 feature; a softmax (V2) gate "
                         "with num_nextn_predict_layers > 0 has no transformers equivalent")
    return out


# ----------------------------------------------------------------------------------------------
# Tensors
# ----------------------------------------------------------------------------------------------

_EXPERT_KEY = re.compile(r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.")
_MTP_KEY = re.compile(r"^mtp\.layers\.(\d+)\.")
# copies of the main model's shared tensors that DeepSeek's release stores in each MTP layer
_MTP_SHARED_COPIES = {"embed_tokens.weight": "embed_tokens.weight", "shared_head.head.weight": "lm_head.weight"}


def _mtp_to_checkpoint_names(state: dict, config: DeepseekConfig) -> dict:
    """`mtp.layers.{k}.x` -> `layers.{num_hidden_layers + k}.x`, plus the shared copies of each MTP layer."""
    out = {}
    for name, t in state.items():
        m = _MTP_KEY.match(name)
        out[f"layers.{config.num_hidden_layers + int(m.group(1))}.{name[m.end():]}" if m else name] = t
    for k in range(config.num_nextn_predict_layers):
        for copy_name, main_name in _MTP_SHARED_COPIES.items():
            out[f"layers.{config.num_hidden_layers + k}.{copy_name}"] = state[main_name]
    return out


def _mtp_from_checkpoint_names(state: dict, config: DeepseekConfig) -> dict:
    """The inverse of `_mtp_to_checkpoint_names`; the shared copies must equal the main model's
    tensors (DeepSeek-V3 shares them, and this library keeps one copy)."""
    out = {}
    for name, t in state.items():
        m = _LAYER_KEY.match(name)
        k = int(m.group(1)) - config.num_hidden_layers if m else -1
        if not 0 <= k < config.num_nextn_predict_layers:
            out[name] = t
            continue
        rest = name[m.end():]
        if rest in _MTP_SHARED_COPIES:
            main = state.get(_MTP_SHARED_COPIES[rest])
            if main is None and rest == "shared_head.head.weight" and config.tie_word_embeddings:
                main = state.get("embed_tokens.weight")
            if main is not None and (main.shape != t.shape or not torch.equal(main, t.to(main.dtype))):
                raise ValueError(f"load_pretrained: MTP tensor {name!r} differs from the main model's "
                                 f"{_MTP_SHARED_COPIES[rest]!r}; DeepSeek-V3 shares them and this library keeps one")
            continue
        out[f"mtp.layers.{k}.{rest}"] = t
    return out


def fp8_block_size(hf: dict) -> int | None:
    """Block size of an FP8 checkpoint (DeepSeek-V3's own release: e4m3, 128x128 blocks), or None.

    Such a checkpoint stores each linear weight as float8_e4m3fn plus a `weight_scale_inv` per
    block; load_pretrained dequantizes them (deepseek_mini.quant) into the requested dtype.
    """
    qc = hf.get("quantization_config")
    if not qc:
        return None
    block = qc.get("weight_block_size", [128, 128])
    if qc.get("quant_method") != "fp8" or qc.get("fmt", "e4m3") != "e4m3" or len(block) != 2 or block[0] != block[1]:
        raise ValueError(f"config.json: quantization_config {qc} is not supported; only DeepSeek-V3's FP8 "
                         "format (quant_method 'fp8', fmt 'e4m3', square weight_block_size) is")
    return int(block[0])


def _read_json(file: Path, what: str) -> dict:
    """A JSON object from `file`, or a ValueError naming the file."""
    try:
        data = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"load_pretrained: {file} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"load_pretrained: {file} must hold a JSON object ({what}), got a {type(data).__name__}")
    return data


def _checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint folder. Like transformers, a single
    model.safetensors wins over a sharded index; an index must name shards that exist."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():  # a sharded checkpoint lists its files
        weight_map = _read_json(index, "with a 'weight_map'").get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise ValueError(f"load_pretrained: {index} needs a 'weight_map' object of tensor name -> file name")
        outside = sorted({name for name in weight_map.values() if Path(name).name != name or name in ("", ".", "..")})
        if outside:  # a shard is a file in this folder, never a path that reaches out of it
            raise ValueError(f"load_pretrained: {index} names shard(s) {outside} outside {path}: "
                             "a weight_map value must be a plain file name")
        files = sorted({path / name for name in weight_map.values()})
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"load_pretrained: {index} lists shard(s) {missing} that are not in {path}")
        return files
    return sorted(path.glob("*.safetensors"))


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """All tensors of a checkpoint folder, and the file name each one came from."""
    from safetensors.torch import load_file

    files = _checkpoint_files(path)
    if not files:
        raise FileNotFoundError(f"load_pretrained: no *.safetensors file in {path}")
    tensors, origin = {}, {}
    for f in files:
        try:
            shard = load_file(f)
        except Exception as e:  # safetensors' own error names neither the file nor the cause plainly
            raise ValueError(f"load_pretrained: cannot read {f} (truncated or not a safetensors file?): {e}") from None
        for key in shard:
            if key in origin:
                raise ValueError(f"load_pretrained: tensor {key!r} is in both {origin[key]} and {f.name}")
            origin[key] = f.name
        tensors.update(shard)
    return tensors, origin


_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_dtypes(tensors: dict[str, torch.Tensor], origin: dict[str, str], fp8_block: int | None) -> None:
    """Every tensor must be a real float, or an FP8 weight with its scales; an integer or bool
    tensor of the right shape would otherwise load as a silently different model."""
    for key, t in tensors.items():
        where = f"load_pretrained: {origin[key]}: tensor {key!r}"
        if t.dtype == torch.float8_e4m3fn:
            if fp8_block is None:
                raise ValueError(f"{where} is float8_e4m3fn but config.json has no FP8 quantization_config "
                                 "saying how to apply its FP8 scales")
            if key + "_scale_inv" not in tensors:
                raise ValueError(f"{where} is float8_e4m3fn but its scales {key + '_scale_inv'!r} are missing")
        elif key.endswith("weight_scale_inv") and tensors.get(key[:-len("_scale_inv")], t).dtype != torch.float8_e4m3fn:
            raise ValueError(f"{where} scales a weight that is missing or not float8_e4m3fn")
        elif t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{where} has dtype {t.dtype}; expected float32, float16 or bfloat16"
                             + (" (or float8_e4m3fn with weight_scale_inv)" if fp8_block else ""))


def state_dict_from_hf(tensors: dict[str, torch.Tensor], config: DeepseekConfig,
                       fp8_block: int | None = None, mtp_layers: int = 0) -> dict[str, torch.Tensor]:
    """Rename Hugging Face keys to ours and stack per-expert weights into [E, ...] tensors.

    `fp8_block`: the block size from an FP8 checkpoint's quantization_config; its float8 weights
    and their `weight_scale_inv` are dequantized to float32 first. `mtp_layers`: how many
    multi-token-prediction layers follow the last block (config.json's num_nextn_predict_layers);
    they are skipped unless `config.num_nextn_predict_layers` asks for them (then they come back
    as `mtp.layers.{k}.*`); any other layer past the config's num_hidden_layers is an error."""
    fp8 = [k for k in tensors if k.endswith("weight_scale_inv")]
    if fp8 and fp8_block is None:
        raise ValueError(f"load_pretrained: found FP8 scales ({fp8[0]!r}, ...) but config.json has no FP8 "
                         "quantization_config saying how they are laid out")
    if fp8:
        from deepseek_mini.quant import dequantize_fp8_state_dict

        tensors = dequantize_fp8_state_dict(tensors, block_size=fp8_block, dtype=torch.float32)
    out, experts, unexpected = {}, {}, []
    kept = config.num_hidden_layers + config.num_nextn_predict_layers
    for key, t in tensors.items():
        name = key.removeprefix("model.")
        layer = _LAYER_KEY.match(name)
        if layer and kept <= int(layer.group(1)) < config.num_hidden_layers + mtp_layers:
            continue  # multi-token-prediction layers not asked for: transformers skips them too
        if name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed from the config
        if not config.n_shared_experts and ".shared_experts." in name and t.numel() == 0:
            continue  # transformers builds, and saves, 0-wide shared experts for n_shared_experts=0
        m = _EXPERT_KEY.match(name)
        if m:
            experts[(int(m.group(1)), m.group(3), int(m.group(2)))] = t
        elif name.endswith("mlp.experts.gate_up_proj"):  # transformers' in-memory fused layout
            out[name[: -len("gate_up_proj")] + "gate_proj"], out[name[: -len("gate_up_proj")] + "up_proj"] = t.chunk(2, dim=1)
        elif not key.startswith("model.") and key != "lm_head.weight":
            unexpected.append(key)
        else:
            out[name] = t
    if unexpected:
        raise ValueError(f"load_pretrained: unexpected tensor(s) {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    for layer in sorted({lay for lay, _, _ in experts}):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            ids = [e for e in range(config.n_routed_experts or 0) if (layer, proj, e) in experts]
            if len(ids) != config.n_routed_experts:
                missing = sorted(set(range(config.n_routed_experts)) - set(ids))
                raise ValueError(f"load_pretrained: layer {layer} is missing {proj} of expert(s) {missing[:10]}")
            out[f"layers.{layer}.mlp.experts.{proj}"] = torch.stack([experts[(layer, proj, e)] for e in ids])
    return _mtp_from_checkpoint_names(out, config)


def load_pretrained(path, dtype: torch.dtype | str = torch.float32, device="cpu", mtp: bool = False) -> DeepseekModel:
    """Load a Hugging Face DeepSeek-V3 / V2 checkpoint folder into a DeepseekModel (eval mode).

    mtp=False: the main model only; multi-token-prediction layers in the checkpoint are skipped
    (with a warning saying so), as transformers' DeepseekV3ForCausalLM does. mtp=True: also the
    config.json's num_nextn_predict_layers MTP layers, into `model.mtp` (an error if absent)."""
    if isinstance(dtype, str):  # "bfloat16", "float32", ...
        dtype = getattr(torch, dtype.removeprefix("torch."))
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"load_pretrained: {config_file} does not exist")
    hf_config = _read_json(config_file, "the model's config")
    config = config_from_hf(hf_config)
    fp8_block = fp8_block_size(hf_config)
    mtp_layers = hf_config.get("num_nextn_predict_layers", hf_config.get("num_mtp_layers")) or 0
    if not isinstance(mtp_layers, int) or isinstance(mtp_layers, bool) or mtp_layers < 0:
        raise ValueError(f"config.json: num_nextn_predict_layers={mtp_layers!r}: expected an int >= 0")
    if mtp:
        if not mtp_layers:
            raise ValueError(f"load_pretrained(mtp=True): {config_file} declares no multi-token-prediction layers "
                             "(num_nextn_predict_layers is 0 or absent)")
        config = config.replace(num_nextn_predict_layers=mtp_layers)
    tensors, origin = _read_safetensors(path)
    _check_dtypes(tensors, origin, fp8_block)
    if not mtp:
        skipped = sorted({int(m.group(1)) for k in tensors if (m := _LAYER_KEY.match(k.removeprefix("model.")))
                          and config.num_hidden_layers <= int(m.group(1)) < config.num_hidden_layers + mtp_layers})
        if skipped:
            warnings.warn(f"load_pretrained: skipped the multi-token-prediction layer(s) {skipped} of {path} "
                          "(the model predicts the next token only); load_pretrained(..., mtp=True) keeps them",
                          stacklevel=2)
    state = state_dict_from_hf(tensors, config, fp8_block=fp8_block, mtp_layers=mtp_layers)
    model = DeepseekModel(config)
    expected = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    extra = sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"load_pretrained: the tensors in {path} do not match {config_file.name} "
                         f"(num_hidden_layers={config.num_hidden_layers}): missing {missing[:10]}"
                         f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}{' ...' if len(extra) > 10 else ''}")
    wrong = [f"{k}: {tuple(state[k].shape)} instead of {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise ValueError(f"load_pretrained: tensor shape(s) in {path} do not match config.json: {wrong[:5]}")
    model.load_state_dict(state, strict=not config.tie_word_embeddings)
    return model.to(device=device, dtype=dtype).eval()


def save_pretrained(model: DeepseekModel, path) -> None:
    """Write `model` as a Hugging Face checkpoint folder that transformers' from_pretrained loads."""
    from safetensors.torch import save_file

    hf_config = config_to_hf(model.config)  # raises first if transformers cannot represent the model
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, t in _mtp_to_checkpoint_names(model.state_dict(), model.config).items():
        if name == "lm_head.weight":
            if not model.config.tie_word_embeddings:
                tensors[name] = t.detach().clone().contiguous()
            continue
        if re.search(r"\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", name):
            prefix, proj = name.rsplit(".", 1)
            for e in range(t.shape[0]):
                tensors[f"model.{prefix}.{e}.{proj}.weight"] = t[e].detach().clone().contiguous()
        else:
            tensors[f"model.{name}"] = t.detach().clone().contiguous()
    hf_config["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    # each file is written aside and renamed into place, so a crash never leaves half a file
    tmp = path / ".model.safetensors.partial"
    save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path / "model.safetensors")
    tmp = path / ".config.json.partial"
    tmp.write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path / "config.json")
    _remove_stale_shards(path)


def _remove_stale_shards(path: Path) -> None:
    """Delete a sharded index and its shards left by an earlier save into the same folder:
    model.safetensors now holds every tensor, and a stale shard must never be read again."""
    index = path / "model.safetensors.index.json"
    stale = set(path.glob("model-*-of-*.safetensors"))
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            stale |= {path / Path(name).name for name in weight_map.values() if isinstance(name, str)}
        except (ValueError, AttributeError):
            pass  # unreadable: the index goes anyway
        stale.add(index)
    for f in stale:
        if f.name != "model.safetensors":
            f.unlink(missing_ok=True)
