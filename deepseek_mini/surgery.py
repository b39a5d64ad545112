"""Module surgery: find a model's layers by name or type and swap them for others, in place.

LoRA (wrap linear layers in adapters) and quantization (swap them for quantized ones) both do
this; here is the one copy of it. Names follow peft's rule for a list of target modules: a
pattern matches a module whose full name equals it or ends with "." + pattern, so "o_proj"
matches "layers.0.self_attn.o_proj".
"""

from torch import nn


def check_names(arg: str, names) -> list:
    """`names` as a list of strings, or a TypeError naming the argument `arg`."""
    if isinstance(names, str) or not all(isinstance(p, str) for p in names):
        raise TypeError(f"{arg} must be a list of module names or name suffixes, e.g. ['q_proj', 'o_proj'], "
                        f"got {names!r}")
    return list(names)


def name_matches(name: str, patterns) -> bool:
    """True when a module name equals one of the patterns or ends with '.' + pattern (peft's
    rule for a list of target modules): 'o_proj' matches 'layers.0.self_attn.o_proj'."""
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_modules(model: nn.Module, predicate) -> list[tuple[str, nn.Module]]:
    """(name, module) for every submodule (not the model itself) for which predicate(name, module)."""
    return [(name, m) for name, m in model.named_modules() if name and predicate(name, m)]


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where the submodule `name` (e.g. 'layers.0.mlp.up_proj') is; returns the old one."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
