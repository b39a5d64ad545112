"""Typical wrong answers to the graded exercises of 04_tiny_gpt (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_COUNT_PAIRS = """
def count_pairs(words):
    pairs = Counter()
    for word, n in words.items():
        for pair in zip(word, word[1:]):
            pairs[pair] += n
    return pairs
"""

_MERGE = """
def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
"""

_DECODE = """
def decode(ids, vocab):
    return b"".join(vocab[i] for i in ids).decode("utf-8", errors="replace")
"""

_ENCODE = """
def encode_word(word, merges):
    ids = list(word)
    while len(ids) > 1:
        present = [p for p in zip(ids, ids[1:]) if p in merges]
        if not present:
            break
        best = min(present, key=merges.get)
        ids = merge(ids, best, merges[best])
    return ids
"""

_MLP = """
def swiglu_mlp(x, gate_proj, up_proj, down_proj):
    return down_proj(F.silu(gate_proj(x)) * up_proj(x))
"""

_RMS = """
def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
"""

_LR = """
def learning_rate(step, max_steps, warmup_steps, lr, min_lr):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min((step - warmup_steps) / max(1, max_steps - warmup_steps), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
"""

_CLIP = """
def clip_gradients(params, max_norm):
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    if norm > max_norm:
        for g in grads:
            g.mul_(max_norm / norm)
    return norm
"""

_PROBS_HEAD = """
def next_token_probs(logits, temperature=1.0, top_k=None, top_p=None):
    if temperature == 0:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).to(logits.dtype)
"""

_TOP_K = """
    if top_k is not None:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
"""

WRONG_ANSWERS = {
    "bpe_train": {
        "ignores how often each word occurs": """
def count_pairs(words):
    pairs = Counter()
    for word in words:
        for pair in zip(word, word[1:]):
            pairs[pair] += 1
    return pairs
""" + _MERGE,
        "loop stops before the last token and drops it": _COUNT_PAIRS + """
def merge(ids, pair, new_id):
    out, i = [], 0
    while i < len(ids) - 1:
        if (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out
""",
        "overlapping merges: [7, 7, 7] becomes [8, 8]": _COUNT_PAIRS + """
def merge(ids, pair, new_id):
    out = []
    for i in range(len(ids)):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new_id)
        elif i > 0 and (ids[i - 1], ids[i]) == pair:
            continue
        else:
            out.append(ids[i])
    return out
""",
        "merges only the first occurrence": _COUNT_PAIRS + """
def merge(ids, pair, new_id):
    for i in range(len(ids) - 1):
        if (ids[i], ids[i + 1]) == pair:
            return ids[:i] + [new_id] + ids[i + 2:]
    return list(ids)
""",
    },
    "bpe_encode_decode": {
        "merges the leftmost pair that has a merge, not the earliest learned": """
def encode_word(word, merges):
    ids = list(word)
    while len(ids) > 1:
        present = [p for p in zip(ids, ids[1:]) if p in merges]
        if not present:
            break
        ids = merge(ids, present[0], merges[present[0]])
    return ids
""" + _DECODE,
        "decodes token by token": _ENCODE + """
def decode(ids, vocab):
    return "".join(vocab[i].decode("utf-8", errors="replace") for i in ids)
""",
        "applies the most recently learned merge first": """
def encode_word(word, merges):
    ids = list(word)
    while len(ids) > 1:
        present = [p for p in zip(ids, ids[1:]) if p in merges]
        if not present:
            break
        best = max(present, key=merges.get)
        ids = merge(ids, best, merges[best])
    return ids
""" + _DECODE,
    },
    "norm_and_mlp": {
        "subtracts the mean (LayerNorm, not RMSNorm)": """
def rms_norm(x, weight, eps=1e-6):
    x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight
""" + _MLP,
        "eps outside the square root": """
def rms_norm(x, weight, eps=1e-6):
    return x / (torch.sqrt(x.pow(2).mean(-1, keepdim=True)) + eps) * weight
""" + _MLP,
        "normalises over the first axis": """
def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(0, keepdim=True) + eps) * weight
""" + _MLP,
        "silu on the up projection instead of the gate": _RMS + """
def swiglu_mlp(x, gate_proj, up_proj, down_proj):
    return down_proj(gate_proj(x) * F.silu(up_proj(x)))
""",
        "sigmoid gate (GLU) instead of SiLU": _RMS + """
def swiglu_mlp(x, gate_proj, up_proj, down_proj):
    return down_proj(torch.sigmoid(gate_proj(x)) * up_proj(x))
""",
        "ignores the eps argument (a fixed 1e-6, the default)": """
def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
""" + _MLP,
        "one rms for the whole batch instead of one per vector": """
def rms_norm(x, weight, eps=1e-6):
    return x / torch.sqrt(x.pow(2).mean() + eps) * weight
""" + _MLP,
    },
    "schedule_and_clipping": {
        "warmup starts at 0 (step / warmup)": """
def learning_rate(step, max_steps, warmup_steps, lr, min_lr):
    if step < warmup_steps:
        return lr * step / warmup_steps
    progress = min((step - warmup_steps) / max(1, max_steps - warmup_steps), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
""" + _CLIP,
        "cosine over all steps, warmup included": """
def learning_rate(step, max_steps, warmup_steps, lr, min_lr):
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(step / max_steps, 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
""" + _CLIP,
        "clips each gradient by its own norm": _LR + """
def clip_gradients(params, max_norm):
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    for g in grads:
        norm = g.norm().item()
        if norm > max_norm:
            g.mul_(max_norm / norm)
    return total
""",
        "also scales small gradients up to max_norm": _LR + """
def clip_gradients(params, max_norm):
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.sqrt(sum((g ** 2).sum() for g in grads)).item()
    for g in grads:
        g.mul_(max_norm / norm)
    return norm
""",
        "floor division in the warmup: (step + 1) // warmup_steps": """
def learning_rate(step, max_steps, warmup_steps, lr, min_lr):
    if step < warmup_steps:
        return lr * ((step + 1) // warmup_steps)
    progress = min((step - warmup_steps) / max(1, max_steps - warmup_steps), 1.0)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))
""" + _CLIP,
    },
    "next_token_probs": {
        "multiplies by the temperature": _PROBS_HEAD + """
    scores = logits * temperature
""" + _TOP_K + """
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
""",
        "top-p drops the token that crosses p": _PROBS_HEAD + """
    scores = logits / temperature
""" + _TOP_K + """
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        drop = s.softmax(-1).cumsum(-1) > top_p
        drop[..., 0] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
""",
        "filters the probabilities without renormalising": _PROBS_HEAD + """
    probs = (logits / temperature).softmax(dim=-1)
    if top_k is not None:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = probs.masked_fill(probs < kth, 0.0)
    if top_p is not None:
        s, order = probs.sort(dim=-1, descending=True)
        drop = (s.cumsum(-1) - s) >= top_p
        probs = probs.masked_fill(drop.scatter(-1, order, drop), 0.0)
    return probs
""",
        "top-p on the probabilities before top-k": _PROBS_HEAD + """
    scores = logits / temperature
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
""" + _TOP_K + """
    return scores.softmax(dim=-1)
""",
        "top-p boundary: keeps one token more when the mass reaches p exactly (> instead of >=)": _PROBS_HEAD + """
    scores = logits / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) > top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
""",
        "top_k larger than the vocabulary: topk fails (no min(top_k, V))": _PROBS_HEAD + """
    scores = logits / temperature
""" + _TOP_K + """
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
""",
        "one top-k threshold for the whole batch (the lowest k-th best)": _PROBS_HEAD + """
    scores = logits / temperature
    if top_k is not None:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[..., -1].min()
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None:
        s, order = scores.sort(dim=-1, descending=True)
        p = s.softmax(-1)
        drop = (p.cumsum(-1) - p) >= top_p
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return scores.softmax(dim=-1)
""",
    },
}
