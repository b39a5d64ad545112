"""Typical wrong answers to the graded exercises of 08_lora (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_LORA_HEAD = """
class LoRALinear(nn.Module):
    def __init__(self, base, r, alpha, dropout=0.0):
        super().__init__()
        self.base, self.r, self.alpha = base, r, alpha
        self.in_features, self.out_features = base.in_features, base.out_features
        self.merged = False
"""

_FREEZE = """
        base.requires_grad_(False)
"""

_PARAMS = """
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
"""

_DROPOUT = """
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
"""

_FORWARD_HEAD = """
    def forward(self, x):
        if self.merged:
            return self.base(x)
"""

_FORWARD = _FORWARD_HEAD + """
        return self.base(x) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
"""

_INJECT_HEAD = """
def inject_lora(model, target_modules, r=16, alpha=32, dropout=0.0, layer_cls=None):
    layer_cls = LoRALinear if layer_cls is None else layer_cls
"""

_REPLACE = """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    return names
"""

_MATCH = """
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and any(n == t or n.endswith("." + t) for t in target_modules)]
"""

_UNMERGE = """
@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    layer.base.weight -= (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = False
"""

_MERGE = """
@torch.no_grad()
def merge(layer):
    if layer.merged:
        return
    layer.base.weight += (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = True
"""

_COUNT_HEAD = """
def lora_parameter_count(cfg, r, target_modules):
    H = cfg.num_attention_heads
"""

_STATE_HEAD = """
def adapter_state_dict(model):
    out = {}
    for name, m in model.named_modules():
        if isinstance(getattr(m, "lora_A", None), nn.Parameter):
"""

WRONG_ANSWERS = {
    "lora_linear": {
        "scaling = alpha (forgets to divide by r)": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha
""" + _PARAMS + _DROPOUT + _FORWARD,
        "scaling = r / alpha (upside down)": _LORA_HEAD + _FREEZE + """
        self.scaling = r / alpha
""" + _PARAMS + _DROPOUT + _FORWARD,
        "scaling = alpha // r (integer division: right only when r divides alpha)": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha // r
""" + _PARAMS + _DROPOUT + _FORWARD,
        "initialisation swapped: A zeros, B Kaiming (still starts as the base)": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.zeros(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, r, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_B, a=math.sqrt(5))
""" + _DROPOUT + _FORWARD,
        "A drawn from randn (std 1): far too large": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.randn(r, base.in_features, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, dtype=base.weight.dtype))
""" + _DROPOUT + _FORWARD,
        "dropout on the whole output (base path included)": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
""" + _PARAMS + _DROPOUT + _FORWARD_HEAD + """
        return self.dropout(self.base(x) + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling)
""",
        "F.dropout without training=self.training: dropout stays on in eval mode": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
        self.p = dropout
""" + _PARAMS + _FORWARD_HEAD + """
        return self.base(x) + (F.dropout(x, self.p) @ self.lora_A.T @ self.lora_B.T) * self.scaling
""",
        "base layer left trainable": _LORA_HEAD + """
        self.scaling = alpha / r
""" + _PARAMS + _DROPOUT + _FORWARD,
        "bias of the base layer dropped": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
""" + _PARAMS + _DROPOUT + _FORWARD_HEAD + """
        return F.linear(x, self.base.weight) + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scaling
""",
        "adapters always float32, whatever the base's dtype": _LORA_HEAD + _FREEZE + """
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
""" + _DROPOUT + _FORWARD_HEAD + """
        return self.base(x) + (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T).to(x.dtype) * self.scaling
""",
    },
    "inject_lora": {
        "substring match (`t in name`): 'proj' also catches q_proj": _INJECT_HEAD + """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(t in n for t in target_modules)]
    model.requires_grad_(False)
""" + _REPLACE,
        "suffix match without the dot (`name.endswith(t)`)": _INJECT_HEAD + """
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(n.endswith(t) for t in target_modules)]
    model.requires_grad_(False)
""" + _REPLACE,
        "only the replaced layers are frozen (embeddings, norms, other linears still train)": _INJECT_HEAD + _MATCH
        + _REPLACE,
        "freezes the whole model AFTER wrapping: the adapters are frozen too": _INJECT_HEAD + _MATCH + """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), r=r, alpha=alpha, dropout=dropout))
    model.requires_grad_(False)
    return names
""",
        "setattr on the model with the dotted name: nothing is replaced": _INJECT_HEAD + _MATCH + """
    model.requires_grad_(False)
    for name in names:
        setattr(model, name, layer_cls(model.get_submodule(name), r=r, alpha=alpha, dropout=dropout))
    return names
""",
        "r and alpha passed positionally in the wrong order": _INJECT_HEAD + _MATCH + """
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), int(alpha), r, dropout))
    return names
""",
        "dropout not passed on to the adapters": _INJECT_HEAD + _MATCH + """
    model.requires_grad_(False)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, layer_cls(getattr(parent, child), r=r, alpha=alpha))
    return names
""",
    },
    "merge_unmerge": {
        "update scaled by alpha // r (integer division) instead of layer.scaling": """
@torch.no_grad()
def merge(layer):
    if layer.merged:
        return
    layer.base.weight += (layer.lora_B @ layer.lora_A) * (layer.alpha // layer.r)
    layer.merged = True


@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    layer.base.weight -= (layer.lora_B @ layer.lora_A) * (layer.alpha // layer.r)
    layer.merged = False
""",
        "update not scaled by alpha / r": """
@torch.no_grad()
def merge(layer):
    if layer.merged:
        return
    layer.base.weight += layer.lora_B @ layer.lora_A
    layer.merged = True


@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    layer.base.weight -= layer.lora_B @ layer.lora_A
    layer.merged = False
""",
        "update transposed (A^T B^T): fits a square layer, but wrong": """
@torch.no_grad()
def merge(layer):
    if layer.merged:
        return
    delta = layer.lora_A.T @ layer.lora_B.T * layer.scaling
    layer.base.weight += delta if delta.shape == layer.base.weight.shape else delta.T
    layer.merged = True


@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    delta = layer.lora_A.T @ layer.lora_B.T * layer.scaling
    layer.base.weight -= delta if delta.shape == layer.base.weight.shape else delta.T
    layer.merged = False
""",
        "no guard: merging twice adds the update twice": """
@torch.no_grad()
def merge(layer):
    layer.base.weight += (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = True


@torch.no_grad()
def unmerge(layer):
    layer.base.weight -= (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = False
""",
        "unmerge adds the update again (sign)": _MERGE + """
@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    layer.base.weight += (layer.lora_B @ layer.lora_A) * layer.scaling
    layer.merged = False
""",
        "merge sets the flag but never changes the weight": """
@torch.no_grad()
def merge(layer):
    layer.merged = True
""" + _UNMERGE,
        "merge assigns a new nn.Parameter (trainable again)": """
@torch.no_grad()
def merge(layer):
    if layer.merged:
        return
    layer.base.weight = nn.Parameter(layer.base.weight + (layer.lora_B @ layer.lora_A) * layer.scaling)
    layer.merged = True
""" + _UNMERGE,
        "unmerge forgets to reset the flag": _MERGE + """
@torch.no_grad()
def unmerge(layer):
    if not layer.merged:
        return
    layer.base.weight -= (layer.lora_B @ layer.lora_A) * layer.scaling
""",
    },
    "count_trainable": {
        "counts state_dict() tensors (tied weight twice, nothing requires grad)": """
def count_trainable(model):
    tensors = model.state_dict().values()
    trainable = sum(t.numel() for t in tensors if t.requires_grad)
    total = sum(t.numel() for t in tensors)
    return trainable, total, 100 * trainable / total
""",
        "tied weights counted twice (remove_duplicate=False)": """
def count_trainable(model):
    params = [p for _, p in model.named_parameters(remove_duplicate=False)]
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    return trainable, total, 100 * trainable / total
""",
        "counts parameter tensors instead of numbers": """
def count_trainable(model):
    trainable = sum(1 for p in model.parameters() if p.requires_grad)
    total = sum(1 for p in model.parameters())
    return trainable, total, 100 * trainable / total
""",
        "a fraction, not a percentage": """
def count_trainable(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total, trainable / total
""",
        "total leaves out the trainable adapters": """
def count_trainable(model):
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters() if not p.requires_grad) or trainable
    return trainable, total, 100 * trainable / total
""",
    },
    "lora_parameter_count": {
        "kv_b_proj out = heads x v_head_dim (keys' part forgotten)": _COUNT_HEAD + """
    shapes = {"q_proj": (cfg.hidden_size, H * cfg.qk_head_dim), "q_a_proj": (cfg.hidden_size, cfg.q_lora_rank),
              "q_b_proj": (cfg.q_lora_rank, H * cfg.qk_head_dim),
              "kv_a_proj_with_mqa": (cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
              "kv_b_proj": (cfg.kv_lora_rank, H * cfg.v_head_dim), "o_proj": (H * cfg.v_head_dim, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules)
""",
        "queries without the rope part (heads x qk_nope_head_dim)": _COUNT_HEAD + """
    shapes = {"q_proj": (cfg.hidden_size, H * cfg.qk_nope_head_dim), "q_a_proj": (cfg.hidden_size, cfg.q_lora_rank),
              "q_b_proj": (cfg.q_lora_rank, H * cfg.qk_nope_head_dim),
              "kv_a_proj_with_mqa": (cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
              "kv_b_proj": (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
              "o_proj": (H * cfg.v_head_dim, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules)
""",
        "kv_a_proj_with_mqa out = kv_lora_rank (rope key forgotten)": _COUNT_HEAD + """
    shapes = {"q_proj": (cfg.hidden_size, H * cfg.qk_head_dim), "q_a_proj": (cfg.hidden_size, cfg.q_lora_rank),
              "q_b_proj": (cfg.q_lora_rank, H * cfg.qk_head_dim),
              "kv_a_proj_with_mqa": (cfg.hidden_size, cfg.kv_lora_rank),
              "kv_b_proj": (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
              "o_proj": (H * cfg.v_head_dim, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) for t in target_modules)
""",
        "one layer only": _COUNT_HEAD + """
    shapes = {"q_proj": (cfg.hidden_size, H * cfg.qk_head_dim), "q_a_proj": (cfg.hidden_size, cfg.q_lora_rank),
              "q_b_proj": (cfg.q_lora_rank, H * cfg.qk_head_dim),
              "kv_a_proj_with_mqa": (cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
              "kv_b_proj": (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
              "o_proj": (H * cfg.v_head_dim, cfg.hidden_size)}
    return sum(r * sum(shapes[t]) for t in target_modules)
""",
        "r * (in + out) + in * out (counts the frozen weight too)": _COUNT_HEAD + """
    shapes = {"q_proj": (cfg.hidden_size, H * cfg.qk_head_dim), "q_a_proj": (cfg.hidden_size, cfg.q_lora_rank),
              "q_b_proj": (cfg.q_lora_rank, H * cfg.qk_head_dim),
              "kv_a_proj_with_mqa": (cfg.hidden_size, cfg.kv_lora_rank + cfg.qk_rope_head_dim),
              "kv_b_proj": (cfg.kv_lora_rank, H * (cfg.qk_nope_head_dim + cfg.v_head_dim)),
              "o_proj": (H * cfg.v_head_dim, cfg.hidden_size)}
    return cfg.num_hidden_layers * sum(r * sum(shapes[t]) + shapes[t][0] * shapes[t][1] for t in target_modules)
""",
    },
    "adapter_state_dict": {
        "no 'base_model.model.' prefix": _STATE_HEAD + """
            out[f"{name}.lora_A.weight"] = m.lora_A.detach().clone()
            out[f"{name}.lora_B.weight"] = m.lora_B.detach().clone()
    return out
""",
        "peft's in-memory names (lora_A.default.weight)": _STATE_HEAD + """
            out[f"base_model.model.{name}.lora_A.default.weight"] = m.lora_A.detach().clone()
            out[f"base_model.model.{name}.lora_B.default.weight"] = m.lora_B.detach().clone()
    return out
""",
        "A and B swapped": _STATE_HEAD + """
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_B.detach().clone()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_A.detach().clone()
    return out
""",
        "the frozen base weights saved too": _STATE_HEAD + """
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().clone()
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.detach().clone()
            out[f"base_model.model.{name}.base_layer.weight"] = m.base.weight.detach().clone()
    return out
""",
        "tensors not detached (still parameters that require grad)": _STATE_HEAD + """
            out[f"base_model.model.{name}.lora_A.weight"] = m.lora_A
            out[f"base_model.model.{name}.lora_B.weight"] = m.lora_B
    return out
""",
    },
}
