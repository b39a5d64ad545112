"""Typical wrong answers to the graded exercises of 13_visualization (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_HEAD = '''
def head_attention(q, k, scale=None):
    S, T = q.shape[-2], k.shape[-2]
'''

_TOKEN_CATEGORY = '''
def token_category(piece):
    word = piece.strip()
    if not word:
        return "whitespace"
    if keyword.iskeyword(word):
        return "keyword"
    if word.isidentifier():
        return "identifier"
    if word.isdigit():
        return "number"
    return "punctuation"
'''

_ROUTING_HEAD = '''
def routing_by_category(categories, expert_ids, n_experts):
    shares = torch.zeros(len(CATEGORIES), n_experts)
'''

_ROUTING_RIGHT = _ROUTING_HEAD + '''
    for row, name in enumerate(CATEGORIES):
        tokens = [i for i, c in enumerate(categories) if c == name]
        if tokens:
            slots = torch.bincount(expert_ids[tokens].flatten(), minlength=n_experts).float()
            shares[row] = slots / slots.sum()
    return shares
'''

_LENS_HEAD = '''
def logit_lens(model, hidden, input_ids):
'''

_SHAPLEY_HEAD = '''
def shapley_values(value_fn, n_players):
    n = n_players
    codes = torch.arange(2 ** n)
    masks = (codes[:, None] >> torch.arange(n)) & 1 == 1
    values = torch.as_tensor(np.asarray(value_fn(masks), dtype=np.float64)).reshape(-1)
    sizes = masks.sum(dim=1)
    phi = torch.zeros(n, dtype=torch.float64)
'''

WRONG_ANSWERS = {
    "head_attention": {
        "no 1/sqrt(D) scale": _HEAD + '''
    scores = q @ k.transpose(-2, -1)
    visible = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
''',
        "scale 1/D instead of 1/sqrt(D)": _HEAD + '''
    scale = 1.0 / q.shape[-1] if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
''',
        "causal mask on the main diagonal even when the queries come after a cache": _HEAD + '''
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(S, T, dtype=torch.bool).tril()
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
''',
        "softmax over the queries (dim=-2)": _HEAD + '''
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-2).nan_to_num(0.0)
''',
        "hand-written softmax without subtracting the maximum: overflows": _HEAD + '''
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    visible = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
    e = scores.exp() * visible
    return e / e.sum(dim=-1, keepdim=True)
''',
    },
    "attention_entropy": {
        "p * log(p) with p = 0 gives nan": '''
def attention_entropy(weights):
    return -(weights * weights.log()).sum(dim=-1)
''',
        "log base 2 (bits, not nats)": '''
def attention_entropy(weights):
    return -torch.special.xlogy(weights, weights).sum(dim=-1) / math.log(2)
''',
        "mean over the keys instead of the sum": '''
def attention_entropy(weights):
    return -torch.special.xlogy(weights, weights).mean(dim=-1)
''',
        "sums over the queries (dim=-2)": '''
def attention_entropy(weights):
    return -torch.special.xlogy(weights, weights).sum(dim=-2)
''',
        "forgot the minus sign": '''
def attention_entropy(weights):
    return torch.special.xlogy(weights, weights).sum(dim=-1)
''',
    },
    "routing_by_category": {
        "identifier tested before keyword: no token is ever a keyword": '''
def token_category(piece):
    word = piece.strip()
    if not word:
        return "whitespace"
    if word.isidentifier():
        return "identifier"
    if keyword.iskeyword(word):
        return "keyword"
    if word.isdigit():
        return "number"
    return "punctuation"
''' + _ROUTING_RIGHT,
        "no strip: ' def' (with its space) is not recognised": '''
def token_category(piece):
    if not piece.strip():
        return "whitespace"
    if keyword.iskeyword(piece):
        return "keyword"
    if piece.isidentifier():
        return "identifier"
    if piece.isdigit():
        return "number"
    return "punctuation"
''' + _ROUTING_RIGHT,
        "counts only each token's first expert": _TOKEN_CATEGORY + _ROUTING_HEAD + '''
    for row, name in enumerate(CATEGORIES):
        tokens = [i for i, c in enumerate(categories) if c == name]
        if tokens:
            slots = torch.bincount(expert_ids[tokens, 0], minlength=n_experts).float()
            shares[row] = slots / slots.sum()
    return shares
''',
        "divides by the number of tokens, not slots: rows sum to k": _TOKEN_CATEGORY + _ROUTING_HEAD + '''
    for row, name in enumerate(CATEGORIES):
        tokens = [i for i, c in enumerate(categories) if c == name]
        if tokens:
            shares[row] = torch.bincount(expert_ids[tokens].flatten(), minlength=n_experts).float() / len(tokens)
    return shares
''',
        "divides by all slots of all categories": _TOKEN_CATEGORY + _ROUTING_HEAD + '''
    for row, name in enumerate(CATEGORIES):
        tokens = [i for i, c in enumerate(categories) if c == name]
        if tokens:
            shares[row] = torch.bincount(expert_ids[tokens].flatten(), minlength=n_experts).float() / expert_ids.numel()
    return shares
''',
        "0/0 = nan for a category without tokens": _TOKEN_CATEGORY + _ROUTING_HEAD + '''
    for row, name in enumerate(CATEGORIES):
        tokens = [i for i, c in enumerate(categories) if c == name]
        slots = torch.bincount(expert_ids[tokens].flatten(), minlength=n_experts).float()
        shares[row] = slots / slots.sum()
    return shares
''',
    },
    "logit_lens": {
        "no final norm: the LM head on the raw residual stream": _LENS_HEAD + '''
    logits = model.lm_head(hidden)
    target = logits[:, :-1].gather(-1, input_ids[1:].expand(logits.shape[0], -1)[..., None])
    return logits.argmax(-1), (logits[:, :-1] > target).sum(-1)
''',
        "ranks the current token instead of the next one": _LENS_HEAD + '''
    logits = model.lm_head(model.norm(hidden))
    target = logits[:, :-1].gather(-1, input_ids[:-1].expand(logits.shape[0], -1)[..., None])
    return logits.argmax(-1), (logits[:, :-1] > target).sum(-1)
''',
        "ranks start at 1 (>= counts the token itself)": _LENS_HEAD + '''
    logits = model.lm_head(model.norm(hidden))
    target = logits[:, :-1].gather(-1, input_ids[1:].expand(logits.shape[0], -1)[..., None])
    return logits.argmax(-1), (logits[:, :-1] >= target).sum(-1)
''',
        "RMSNorm without its learned weight": _LENS_HEAD + '''
    normed = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    logits = model.lm_head(normed)
    target = logits[:, :-1].gather(-1, input_ids[1:].expand(logits.shape[0], -1)[..., None])
    return logits.argmax(-1), (logits[:, :-1] > target).sum(-1)
''',
        "skips the embedding row (only the blocks' outputs)": _LENS_HEAD + '''
    logits = model.lm_head(model.norm(hidden[1:]))
    target = logits[:, :-1].gather(-1, input_ids[1:].expand(logits.shape[0], -1)[..., None])
    return logits.argmax(-1), (logits[:, :-1] > target).sum(-1)
''',
    },
    "pca_2d": {
        "no centring": '''
def pca_2d(x):
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:2].T, vh[:2], s[:2] ** 2 / (s ** 2).sum()
''',
        "explained variance from the singular values, not their squares": '''
def pca_2d(x):
    c = x - x.mean(0)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    return c @ vh[:2].T, vh[:2], s[:2] / s.sum()
''',
        "columns of Vh instead of rows": '''
def pca_2d(x):
    c = x - x.mean(0)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    components = vh[:, :2].T
    return c @ components.T, components, s[:2] ** 2 / (s ** 2).sum()
''',
        "the two smallest directions": '''
def pca_2d(x):
    c = x - x.mean(0)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    return c @ vh[-2:].T, vh[-2:], s[-2:] ** 2 / (s ** 2).sum()
''',
        "explained variance over the two kept directions only": '''
def pca_2d(x):
    c = x - x.mean(0)
    _, s, vh = torch.linalg.svd(c, full_matrices=False)
    return c @ vh[:2].T, vh[:2], s[:2] ** 2 / (s[:2] ** 2).sum()
''',
    },
    "shapley_values": {
        "Banzhaf values: every coalition weighted 1 / 2^(n-1)": _SHAPLEY_HEAD + '''
    for i in range(n):
        without = codes[~masks[:, i]]
        phi[i] = (values[without + 2 ** i] - values[without]).mean()
    return phi
''',
        "Banzhaf values rescaled to add up to v(N) - v(empty)": _SHAPLEY_HEAD + '''
    for i in range(n):
        without = codes[~masks[:, i]]
        phi[i] = (values[without + 2 ** i] - values[without]).mean()
    return phi * (values[-1] - values[0]) / phi.sum()
''',
        "leave one out: v(N) - v(N without i)": _SHAPLEY_HEAD + '''
    for i in range(n):
        phi[i] = values[-1] - values[2 ** n - 1 - 2 ** i]
    return phi
''',
        "alone: v({i}) - v(empty)": _SHAPLEY_HEAD + '''
    for i in range(n):
        phi[i] = values[2 ** i] - values[0]
    return phi
''',
        "weights |S|! (n - |S|)! / n! (off by one)": _SHAPLEY_HEAD + '''
    weight = torch.tensor([math.factorial(s) * math.factorial(n - s) / math.factorial(n) for s in range(n)],
                          dtype=torch.float64)
    for i in range(n):
        without = codes[~masks[:, i]]
        phi[i] = (weight[sizes[without]] * (values[without + 2 ** i] - values[without])).sum()
    return phi
''',
        "a sample of 20 random orders instead of all coalitions": '''
def shapley_values(value_fn, n_players):
    g = torch.Generator().manual_seed(0)
    phi = torch.zeros(n_players, dtype=torch.float64)
    for _ in range(20):
        mask = torch.zeros(1, n_players, dtype=torch.bool)
        before = float(np.asarray(value_fn(mask)).reshape(-1)[0])
        for player in torch.randperm(n_players, generator=g).tolist():
            mask = mask.clone()
            mask[0, player] = True
            after = float(np.asarray(value_fn(mask)).reshape(-1)[0])
            phi[player] += after - before
            before = after
    return phi / 20
''',
    },
}
