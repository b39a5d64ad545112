"""Typical wrong answers to the graded exercises of 06_deepseek_moe (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_GATING_HEAD = """
def topk_gating(logits, k, scoring_func="softmax", bias=None, norm_topk_prob=False, routed_scaling_factor=1.0):
"""

_GATING_TAIL = """
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weight * routed_scaling_factor
"""

_CAPACITY_HEAD = """
def apply_capacity(topk_idx, topk_weight, n_experts, capacity_factor):
"""

_MOE_HEAD = """
def moe_forward(moe, x):
    flat = x.reshape(-1, x.shape[-1])
    topk_idx, topk_weight = moe.gate(flat)
    experts = moe.experts
    y = torch.zeros_like(flat)
"""

_MOE_CAPACITY = """
    if moe.capacity_factor is not None:
        topk_weight, _ = apply_capacity(topk_idx, topk_weight, moe.gate.n_experts, moe.capacity_factor)
"""

_SWIGLU = "F.linear(F.silu(F.linear(h, experts.gate_proj[e])) * F.linear(h, experts.up_proj[e]), experts.down_proj[e])"

_MOE_TAIL = """
    y = y.view(x.shape)
    if moe.shared_experts is not None:
        y = y + moe.shared_experts(x)
    return y
"""

WRONG_ANSWERS = {
    "topk_gating": {
        "softmax over the tokens (dim=0) instead of the experts": _GATING_HEAD + """
    scores = logits.softmax(dim=0) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    topk_idx = choice.topk(k, dim=-1).indices
    topk_weight = scores.gather(-1, topk_idx)
""" + _GATING_TAIL,
        "the weights come from the biased scores (bias added to the weights too)": _GATING_HEAD + """
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    if bias is not None:
        scores = scores + bias
    topk_weight, topk_idx = scores.topk(k, dim=-1)
""" + _GATING_TAIL,
        "the bias is ignored: plain top-k of the scores": _GATING_HEAD + """
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    topk_weight, topk_idx = scores.topk(k, dim=-1)
""" + _GATING_TAIL,
        "routed_scaling_factor applied before the renormalisation (it cancels out)": _GATING_HEAD + """
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    topk_idx = choice.topk(k, dim=-1).indices
    topk_weight = scores.gather(-1, topk_idx) * routed_scaling_factor
    if norm_topk_prob:
        topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx, topk_weight
""",
        "always renormalises the k weights (ignores norm_topk_prob=False)": _GATING_HEAD + """
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    topk_idx = choice.topk(k, dim=-1).indices
    topk_weight = scores.gather(-1, topk_idx)
    topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)
    return topk_idx, topk_weight * routed_scaling_factor
""",
        "sigmoid weights normalised over all experts instead of the chosen k": _GATING_HEAD + """
    scores = logits.softmax(dim=-1) if scoring_func == "softmax" else logits.sigmoid()
    choice = scores if bias is None else scores + bias
    topk_idx = choice.topk(k, dim=-1).indices
    topk_weight = scores.gather(-1, topk_idx)
    if norm_topk_prob:
        topk_weight = topk_weight / scores.sum(dim=-1, keepdim=True)
    return topk_idx, topk_weight * routed_scaling_factor
""",
    },
    "apply_capacity": {
        "capacity as int(x) + 1: one slot too many whenever x is whole": _CAPACITY_HEAD + """
    capacity = int(capacity_factor * topk_idx.numel() / n_experts) + 1
    flat = topk_idx.flatten()
    dropped = torch.zeros(flat.shape, dtype=torch.bool)
    for e in range(n_experts):
        dropped[torch.where(flat == e)[0][capacity:]] = True
    dropped = dropped.view(topk_idx.shape)
    return topk_weight.masked_fill(dropped, 0.0), dropped
""",
        "capacity rounded down (floor instead of ceil)": _CAPACITY_HEAD + """
    capacity = math.floor(capacity_factor * topk_idx.numel() / n_experts)
    flat = topk_idx.flatten()
    dropped = torch.zeros(flat.shape, dtype=torch.bool)
    for e in range(n_experts):
        dropped[torch.where(flat == e)[0][capacity:]] = True
    dropped = dropped.view(topk_idx.shape)
    return topk_weight.masked_fill(dropped, 0.0), dropped
""",
        "capacity counts tokens, not the N*K routed slots": _CAPACITY_HEAD + """
    capacity = math.ceil(capacity_factor * topk_idx.shape[0] / n_experts)
    flat = topk_idx.flatten()
    dropped = torch.zeros(flat.shape, dtype=torch.bool)
    for e in range(n_experts):
        dropped[torch.where(flat == e)[0][capacity:]] = True
    dropped = dropped.view(topk_idx.shape)
    return topk_weight.masked_fill(dropped, 0.0), dropped
""",
        "serves slot 0 of every token first, then slot 1 (column order)": _CAPACITY_HEAD + """
    capacity = math.ceil(capacity_factor * topk_idx.numel() / n_experts)
    flat = topk_idx.t().flatten()
    dropped = torch.zeros(flat.shape, dtype=torch.bool)
    for e in range(n_experts):
        dropped[torch.where(flat == e)[0][capacity:]] = True
    dropped = dropped.view(topk_idx.shape[1], topk_idx.shape[0]).t()
    return topk_weight.masked_fill(dropped, 0.0), dropped
""",
        "off by one: keeps capacity + 1 slots (position > capacity)": _CAPACITY_HEAD + """
    capacity = math.ceil(capacity_factor * topk_idx.numel() / n_experts)
    onehot = F.one_hot(topk_idx.flatten(), n_experts)
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1
    dropped = (position > capacity).view(topk_idx.shape)
    return topk_weight.masked_fill(dropped, 0.0), dropped
""",
        "zeroes the dropped weights in place (the caller's topk_weight changes)": _CAPACITY_HEAD + """
    capacity = math.ceil(capacity_factor * topk_idx.numel() / n_experts)
    flat = topk_idx.flatten()
    dropped = torch.zeros(flat.shape, dtype=torch.bool)
    for e in range(n_experts):
        dropped[torch.where(flat == e)[0][capacity:]] = True
    dropped = dropped.view(topk_idx.shape)
    return topk_weight.masked_fill_(dropped, 0.0), dropped
""",
    },
    "moe_forward": {
        "forgets the shared experts": _MOE_HEAD + _MOE_CAPACITY + f"""
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token]
        y = y.index_add(0, token, {_SWIGLU} * topk_weight[token, slot, None])
    return y.view(x.shape)
""",
        "routed outputs not weighted by the gate": _MOE_HEAD + _MOE_CAPACITY + f"""
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token]
        y = y.index_add(0, token, {_SWIGLU})
""" + _MOE_TAIL,
        "silu on the up projection instead of the gate projection": _MOE_HEAD + _MOE_CAPACITY + """
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token]
        out = F.linear(F.linear(h, experts.gate_proj[e]) * F.silu(F.linear(h, experts.up_proj[e])), experts.down_proj[e])
        y = y.index_add(0, token, out * topk_weight[token, slot, None])
""" + _MOE_TAIL,
        "gate weight multiplied into the expert's input (experts are not linear)": _MOE_HEAD + _MOE_CAPACITY + f"""
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token] * topk_weight[token, slot, None]
        y = y.index_add(0, token, {_SWIGLU})
""" + _MOE_TAIL,
        "ignores the capacity factor (no token ever dropped)": _MOE_HEAD + f"""
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token]
        y = y.index_add(0, token, {_SWIGLU} * topk_weight[token, slot, None])
""" + _MOE_TAIL,
        "assigns instead of adding: a token keeps only its last expert": _MOE_HEAD + _MOE_CAPACITY + f"""
    for e in range(moe.gate.n_experts):
        token, slot = torch.where(topk_idx == e)
        h = flat[token]
        y[token] = {_SWIGLU} * topk_weight[token, slot, None]
""" + _MOE_TAIL,
    },
    "balance_loss": {
        "f_i divided by the number of tokens, not of slots (K times too large)": """
def balance_loss(scores, topk_idx, n_experts):
    probs = scores / scores.sum(dim=-1, keepdim=True)
    f = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(probs.dtype) / topk_idx.shape[0]
    return n_experts * (f * probs.mean(dim=0)).sum()
""",
        "no factor E (an even load gives 1/E, not 1)": """
def balance_loss(scores, topk_idx, n_experts):
    probs = scores / scores.sum(dim=-1, keepdim=True)
    f = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(probs.dtype) / topk_idx.numel()
    return (f * probs.mean(dim=0)).sum()
""",
        "sigmoid scores used without normalising them per token": """
def balance_loss(scores, topk_idx, n_experts):
    f = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(scores.dtype) / topk_idx.numel()
    return n_experts * (f * scores.mean(dim=0)).sum()
""",
        "P_i from detached scores: the loss has no gradient": """
def balance_loss(scores, topk_idx, n_experts):
    probs = scores.detach() / scores.detach().sum(dim=-1, keepdim=True)
    f = torch.bincount(topk_idx.flatten(), minlength=n_experts).to(probs.dtype) / topk_idx.numel()
    return n_experts * (f * probs.mean(dim=0)).sum()
""",
        "f_i counts only each token's first choice": """
def balance_loss(scores, topk_idx, n_experts):
    probs = scores / scores.sum(dim=-1, keepdim=True)
    f = torch.bincount(topk_idx[:, 0], minlength=n_experts).to(probs.dtype) / topk_idx.shape[0]
    return n_experts * (f * probs.mean(dim=0)).sum()
""",
    },
    "update_bias": {
        "sign reversed: busy experts become even more attractive": """
def update_bias(bias, load, gamma):
    load = load.to(bias.dtype)
    return bias + gamma * torch.sign(load - load.mean())
""",
        "a step proportional to the gap instead of its sign": """
def update_bias(bias, load, gamma):
    load = load.to(bias.dtype)
    return bias + gamma * (load.mean() - load)
""",
        "updates the bias in place": """
def update_bias(bias, load, gamma):
    bias += gamma * torch.sign(load.to(bias.dtype).mean() - load.to(bias.dtype))
    return bias
""",
        "integer mean (sum // n): a load just under a fractional mean does not move": """
def update_bias(bias, load, gamma):
    mean = load.sum() // load.numel()
    return bias + gamma * torch.sign(mean - load).to(bias.dtype)
""",
        "gap clamped to [-1, 1] instead of its sign: fractional gaps give a partial step": """
def update_bias(bias, load, gamma):
    load = load.to(bias.dtype)
    return bias + gamma * (load.mean() - load).clamp(-1, 1)
""",
    },
}
