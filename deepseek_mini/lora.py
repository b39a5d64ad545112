"""LoRA: train a low-rank update next to a frozen weight.

A frozen linear layer y = x W^T + b gets two small trainable matrices, A [r, in] and B [out, r]:

    y = x W^T + b + scaling * (dropout(x) A^T) B^T,     scaling = alpha / r  (rsLoRA: alpha / sqrt(r))

B starts at zero, so the adapted model starts exactly where the base model is. Only r * (in + out)
numbers per layer train. After training, `merge` folds the update into W (W += scaling * B A)
so inference costs nothing extra; `unmerge` takes it out again.

The adapters are saved in the format Hugging Face peft uses (adapter_config.json +
adapter_model.safetensors with keys `base_model.model.<module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained(base, path)` loads ours and `load_lora` loads peft's.
QLoRA is the same LoRALinear over a frozen `QuantLinear` base (see quant.py).
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek_mini import ops
from deepseek_mini.quant import QuantLinear
from deepseek_mini.surgery import check_names, find_modules, name_matches, replace_module

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # peft's PeftModel -> LoraModel -> your model


def lora_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """x W^T + b + scaling * (x A^T) B^T, never forming the [out, in] product B A: the reference,
    whatever the device (`ops.lora_linear` picks the fused kernel on CUDA)."""
    check_lora_linear(weight, lora_A, lora_B)
    return lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling)


def check_lora_linear(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor):
    if lora_A.shape[1] != weight.shape[1] or lora_B.shape[0] != weight.shape[0] or lora_B.shape[1] != lora_A.shape[0]:
        raise ValueError(f"lora_A must be [r, in={weight.shape[1]}] and lora_B [out={weight.shape[0]}, r], "
                         f"got lora_A {tuple(lora_A.shape)} and lora_B {tuple(lora_B.shape)}")


def lora_linear_reference(x, weight, bias, lora_A, lora_B, scaling: float) -> torch.Tensor:
    return F.linear(x, weight, bias) + F.linear(F.linear(x, lora_A), lora_B) * scaling


class LoRALinear(nn.Module):
    """A frozen `base` (nn.Linear, or QuantLinear for QLoRA) plus a trainable low-rank update."""

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        if not isinstance(base, (nn.Linear, QuantLinear)):
            raise TypeError(f"base must be an nn.Linear or QuantLinear, got {type(base).__name__}")
        if not isinstance(r, int) or r < 1:
            raise ValueError(f"r (the rank) must be a positive integer, got {r!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.base = base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.use_rslora = r, alpha, use_rslora
        self.scaling = alpha / math.sqrt(r) if use_rslora else alpha / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # adapters live where the base lives, in its float dtype (float32 over a quantized base)
        ref = base.weight if base.weight.is_floating_point() and base.weight.itemsize > 1 else None
        factory = dict(device=base.weight.device, dtype=ref.dtype if ref is not None else torch.float32)
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, **factory))
        # A like nn.Linear's default init (uniform, bound 1/sqrt(in)), B = 0: starts as the base
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False
        self.weight_is_shared = False  # set by inject_lora when W is tied to another module

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (code that reads `layer.weight.dtype` keeps working after injection)."""
        return self.base.weight

    @property
    def bias(self):
        return self.base.bias

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to W: scaling * B A, shape [out, in]."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        # QLoRA (the quantized base runs its own matmul) and dropout (only on the adapter path)
        # need the two paths apart; otherwise one lora_linear call (fused on a GPU)
        if isinstance(self.base, QuantLinear) or (isinstance(self.dropout, nn.Dropout) and self.training):
            return self.base(x) + F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B) * self.scaling
        return ops.lora_linear(x, self.base.weight, self.base.bias, self.lora_A, self.lora_B, self.scaling)

    def _check_mergeable(self, action: str):
        if isinstance(self.base, QuantLinear):
            raise TypeError(f"cannot {action} into a quantized base exactly (the sum would be re-quantized); "
                            "dequantize the base into an nn.Linear first")
        if self.weight_is_shared:
            raise RuntimeError(f"cannot {action}: this layer's weight is tied to another module (e.g. lm_head "
                               "and embed_tokens), which would change too; keep the adapter unmerged")

    @torch.no_grad()
    def merge(self):
        """W += scaling * B A; forward then runs the base layer alone."""
        self._check_mergeable("merge")
        if self.merged:
            raise RuntimeError("this LoRALinear is already merged")
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """W -= scaling * B A: the base weight is back to what it was (up to float rounding)."""
        self._check_mergeable("unmerge")
        if not self.merged:
            raise RuntimeError("this LoRALinear is not merged")
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, scaling={self.scaling:g}, merged={self.merged}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by module name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject_lora(model: nn.Module, target_modules, r: int = 8, alpha: float = 16, dropout: float = 0.0,
                use_rslora: bool = False) -> nn.Module:
    """Wrap each nn.Linear / QuantLinear whose name equals or ends with one of `target_modules`
    (e.g. ["q_b_proj", "kv_b_proj", "o_proj"], as in peft) in a LoRALinear, in place, and freeze
    every other parameter of the model. Returns the model."""
    targets = check_names("target_modules", target_modules)
    if not targets:
        raise ValueError("target_modules is empty; name the linear layers to adapt, e.g. ['o_proj']")
    matches = find_modules(model, lambda name, m: name_matches(name, targets))
    if not matches:
        raise ValueError(f"no module of the model matches target_modules={targets}")
    for name, m in matches:
        if isinstance(m, LoRALinear):
            raise ValueError(f"module {name!r} already has a LoRA adapter")
        if not isinstance(m, (nn.Linear, QuantLinear)):
            raise TypeError(f"module {name!r} matches target_modules but is a {type(m).__name__}; "
                            "LoRA here adapts nn.Linear and QuantLinear layers only")
    uses = {}  # how many modules hold each parameter (tied weights are held by two)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    before = _requires_grad(model)
    try:
        model.requires_grad_(False)
        for name, m in matches:
            layer = LoRALinear(m, r, alpha, dropout, use_rslora)
            layer.weight_is_shared = isinstance(m.weight, nn.Parameter) and uses[id(m.weight)] > 1
            replace_module(model, name, layer)
    except BaseException:
        _remove_adapters(model, [name for name, _ in matches], before)  # e.g. a bad r: the model is as it was
        raise
    return model


def _requires_grad(model: nn.Module) -> dict:
    return {name: p.requires_grad for name, p in model.named_parameters(remove_duplicate=False)}


def _remove_adapters(model: nn.Module, names, requires_grad: dict) -> None:
    """Undo inject_lora on `names`: put their base layers back and every requires_grad flag as it was."""
    for name, layer in lora_layers(model).items():
        if name in names:
            replace_module(model, name, layer.base)
    for name, p in model.named_parameters(remove_duplicate=False):
        p.requires_grad_(requires_grad.get(name, p.requires_grad))


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts. A QuantLinear's packed weight counts as the
    in * out weights it stands for, so QLoRA totals compare with the unquantized model."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    total += sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, QuantLinear))
    return trainable, total


def merge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module):
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the plain base layer back (in place)."""
    for name, layer in lora_layers(model).items():
        if not layer.merged:
            layer.merge()
        replace_module(model, name, layer.base)
    return model


def _config_of(layers: dict[str, LoRALinear]) -> dict:
    settings = {(m.r, m.alpha, m.use_rslora, getattr(m.dropout, "p", 0.0)) for m in layers.values()}
    if len(settings) != 1:
        raise ValueError(f"save_lora needs one (r, alpha, use_rslora, dropout) for all adapters, found {settings}")
    (r, alpha, use_rslora, dropout), = settings
    # the fields peft 0.21 reads for a plain LoRA adapter; the rest take peft's defaults
    return {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": None,
        "r": r, "lora_alpha": alpha, "lora_dropout": dropout, "use_rslora": use_rslora,
        "target_modules": sorted(layers), "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": False, "lora_bias": False,
    }


def save_lora(model: nn.Module, path) -> Path:
    """Write the adapters to a folder peft can load: adapter_config.json + adapter_model.safetensors."""
    layers = lora_layers(model)
    if not layers:
        raise ValueError("model has no LoRA adapters to save; call inject_lora first")
    if any(m.merged for m in layers.values()):
        raise RuntimeError("unmerge the adapters before saving (merged weights would be counted twice on load)")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, m in layers.items():
        tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"] = m.lora_A.detach().contiguous()
        tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"] = m.lora_B.detach().contiguous()
    save_file(tensors, path / WEIGHTS_NAME, metadata={"format": "pt"})
    (path / CONFIG_NAME).write_text(json.dumps(_config_of(layers), indent=2) + "\n")
    return path


def load_lora(model: nn.Module, path) -> nn.Module:
    """Load adapters saved by `save_lora` or by peft into `model` (in place). A plain base model
    gets adapters injected into the modules named in the file; a model that already has them
    just gets their weights. Returns the model."""
    path = Path(path)
    for f in (CONFIG_NAME, WEIGHTS_NAME):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} not found; a LoRA adapter folder holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        config = json.loads((path / CONFIG_NAME).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path / CONFIG_NAME} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path / CONFIG_NAME} must hold a JSON object, got a {type(config).__name__}")
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{path / CONFIG_NAME} describes a {config.get('peft_type')!r} adapter, expected 'LORA'")
    unsupported = {k: config[k] for k in ("rank_pattern", "alpha_pattern", "use_dora", "lora_bias",
                                          "fan_in_fan_out", "modules_to_save") if config.get(k)}
    if unsupported:
        raise ValueError(f"adapter uses peft options load_lora does not support: {unsupported}")
    missing = [k for k in ("r", "lora_alpha") if k not in config]
    if missing:
        raise ValueError(f"{path / CONFIG_NAME} lacks {missing}")
    try:
        tensors = load_file(path / WEIGHTS_NAME)
    except Exception as e:  # safetensors' error does not name the file
        raise ValueError(f"cannot read {path / WEIGHTS_NAME} (truncated or not a safetensors file?): {e}") from None
    weights = {}  # module name -> {"lora_A": ..., "lora_B": ...}
    for key, value in tensors.items():
        if not key.startswith(PEFT_PREFIX) or not key.endswith((".lora_A.weight", ".lora_B.weight")):
            raise ValueError(f"unexpected key {key!r} in {path / WEIGHTS_NAME}; expected "
                             f"'{PEFT_PREFIX}<module>.lora_A.weight' / '.lora_B.weight'")
        module, which, _ = key[len(PEFT_PREFIX):].rsplit(".", 2)
        weights.setdefault(module, {})[which] = value
    # a plain base model gets adapters injected here; if anything below fails they are removed
    # again, so a failed load leaves the model exactly as it was (no adapters, nothing frozen)
    inject = not lora_layers(model)
    before = _requires_grad(model)
    try:
        if inject:
            inject_lora(model, sorted(weights), r=config["r"], alpha=config["lora_alpha"],
                        dropout=config.get("lora_dropout", 0.0), use_rslora=config.get("use_rslora", False))
        _copy_adapter_weights(lora_layers(model), weights, config)
    except BaseException:
        if inject:
            _remove_adapters(model, sorted(weights), before)
        raise
    return model


def _copy_adapter_weights(layers: dict[str, LoRALinear], weights: dict, config: dict) -> None:
    """Check every adapter tensor against the model's LoRA layers, then copy them all."""
    if set(layers) != set(weights):
        raise ValueError(f"adapter modules {sorted(weights)} do not match the model's LoRA layers {sorted(layers)}")
    saved = (config["lora_alpha"], config.get("use_rslora", False))
    for name, layer in layers.items():  # same weights with another alpha would compute something else
        if (layer.alpha, layer.use_rslora) != saved:
            raise ValueError(f"{name}: the model's adapter has (alpha, use_rslora) = {(layer.alpha, layer.use_rslora)} "
                             f"but the saved one has {saved}")
    for name, layer in layers.items():
        for which in ("lora_A", "lora_B"):
            target, value = getattr(layer, which), weights[name].get(which)
            if value is None or value.shape != target.shape:
                raise ValueError(f"{name}.{which}: expected shape {tuple(target.shape)}, got "
                                 f"{None if value is None else tuple(value.shape)}")
            if not value.is_floating_point():
                raise ValueError(f"{name}.{which}: expected a floating-point tensor, got {value.dtype}")
    with torch.no_grad():
        for name, layer in layers.items():
            for which in ("lora_A", "lora_B"):
                getattr(layer, which).copy_(weights[name][which])
