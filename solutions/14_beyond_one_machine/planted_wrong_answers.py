"""Typical wrong answers to the graded exercises of 14_beyond_one_machine (never released).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_MEMORY = '''
def training_memory_per_rank(n_params, world_size, stage):
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    params, grads, optimizer = 2.0 * n_params, 2.0 * n_params, OPTIMIZER_BYTES * n_params
    optimizer /= world_size if stage >= 1 else 1
    grads /= world_size if stage >= GRAD_STAGE else 1
    params /= world_size if stage >= PARAM_STAGE else 1
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
'''

_RING = '''
def ring_allreduce(tensors):
    n = len(tensors)
    chunks = [[c.clone() for c in torch.tensor_split(t, n)] for t in tensors]
    sent = [0] * n
    for s in range(REDUCE_STEPS):
        outgoing = [(r, (r - s) % n, chunks[r][(r - s) % n].clone()) for r in range(n)]
        for r, i, data in outgoing:
            chunks[(r + 1) % n][i] += data
            sent[r] += data.numel()
    for s in range(GATHER_STEPS):
        outgoing = [(r, (r + 1 - s) % n, chunks[r][(r + 1 - s) % n].clone()) for r in range(n)]
        for r, i, data in outgoing:
            chunks[(r + 1) % n][i] = data
            COUNT_GATHER
    return [torch.cat(c) for c in chunks], sent
'''

WRONG_ANSWERS = {
    "training_memory_per_rank": {
        "forgets the fp32 master weights: 8 bytes of optimizer state instead of 12":
            _MEMORY.replace("OPTIMIZER_BYTES", "8.0").replace("GRAD_STAGE", "2").replace("PARAM_STAGE", "3"),
        "stage 2 also shards the parameters (that is stage 3)":
            _MEMORY.replace("OPTIMIZER_BYTES", "12.0").replace("GRAD_STAGE", "2").replace("PARAM_STAGE", "2"),
        "stage 1 already shards the gradients":
            _MEMORY.replace("OPTIMIZER_BYTES", "12.0").replace("GRAD_STAGE", "1").replace("PARAM_STAGE", "3"),
        "floor division: bytes per rank rounded down when the ranks do not divide them evenly": '''
def training_memory_per_rank(n_params, world_size, stage):
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    params, grads, optimizer = 2.0 * n_params, 2.0 * n_params, 12.0 * n_params
    optimizer //= world_size if stage >= 1 else 1
    grads //= world_size if stage >= 2 else 1
    params //= world_size if stage >= 3 else 1
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
''',
        "returns ints for int inputs (no float conversion)": '''
def training_memory_per_rank(n_params, world_size, stage):
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shard = lambda needed: world_size if stage >= needed else 1
    params, grads, optimizer = 2 * n_params, 2 * n_params, 12 * n_params
    params, grads, optimizer = [x / shard(s) if shard(s) > 1 else x for x, s in ((params, 3), (grads, 2), (optimizer, 1))]
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
''',
        "checks a range, so a stage of 1.5 is accepted": '''
def training_memory_per_rank(n_params, world_size, stage):
    if not 0 <= stage <= 3:
        raise ValueError(f"stage must be 0-3, got {stage}")
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    shard = lambda needed: world_size if stage >= needed else 1
    params, grads, optimizer = 2.0 * n_params / shard(3), 2.0 * n_params / shard(2), 12.0 * n_params / shard(1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
''',
        "no world_size check: raises only by accident (ZeroDivisionError) when a stage divides by 0": '''
def training_memory_per_rank(n_params, world_size, stage):
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0-3, got {stage}")
    shard = lambda needed: world_size if stage >= needed else 1
    params, grads, optimizer = 2.0 * n_params / shard(3), 2.0 * n_params / shard(2), 12.0 * n_params / shard(1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
''',
        "no input checks: a stage of 4 is treated like stage 3": '''
def training_memory_per_rank(n_params, world_size, stage):
    shard = lambda needed: world_size if stage >= needed else 1
    params, grads, optimizer = 2.0 * n_params / shard(3), 2.0 * n_params / shard(2), 12.0 * n_params / shard(1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "total": params + grads + optimizer}
''',
    },
    "ring_allreduce": {
        "reduce-scatter runs N steps instead of N-1: one chunk is added twice":
            _RING.replace("REDUCE_STEPS", "n").replace("GATHER_STEPS", "n - 1")
                 .replace("COUNT_GATHER", "sent[r] += data.numel()"),
        "stops after reduce-scatter: each rank holds only one complete chunk":
            _RING.replace("REDUCE_STEPS", "n - 1").replace("GATHER_STEPS", "0")
                 .replace("COUNT_GATHER", "sent[r] += data.numel()"),
        "counts only the reduce-scatter traffic":
            _RING.replace("REDUCE_STEPS", "n - 1").replace("GATHER_STEPS", "n - 1").replace("COUNT_GATHER", "pass"),
        "all-gather adds the received chunk instead of overwriting it":
            _RING.replace("REDUCE_STEPS", "n - 1").replace("GATHER_STEPS", "n - 1")
                 .replace("chunks[(r + 1) % n][i] = data", "chunks[(r + 1) % n][i] += data")
                 .replace("COUNT_GATHER", "sent[r] += data.numel()"),
        "cuts with torch.chunk instead of tensor_split: chunk sizes differ when N does not divide L":
            _RING.replace("REDUCE_STEPS", "n - 1").replace("GATHER_STEPS", "n - 1")
                 .replace("torch.tensor_split(t, n)", "torch.chunk(t, n)")
                 .replace("COUNT_GATHER", "sent[r] += data.numel()"),
        "sums every tensor on every rank without the ring, and reports the naive traffic": '''
def ring_allreduce(tensors):
    n = len(tensors)
    total = torch.stack(tensors).sum(0)
    return [total.clone() for _ in range(n)], [len(t) * (n - 1) for t in tensors]
''',
    },
    "combine_rank_gradients": {
        "plain average of the rank gradients (what DDP does)": '''
def combine_rank_gradients(grads, n_tokens):
    if len(grads) != len(n_tokens):
        raise ValueError("one gradient and one token count per rank")
    if sum(n_tokens) <= 0:
        raise ValueError("no tokens")
    return sum(grads) / len(grads)
''',
        "weights by token counts but forgets to divide by the total": '''
def combine_rank_gradients(grads, n_tokens):
    if len(grads) != len(n_tokens):
        raise ValueError("one gradient and one token count per rank")
    if sum(n_tokens) <= 0:
        raise ValueError("no tokens")
    return sum(g * n for g, n in zip(grads, n_tokens)) / len(grads)
''',
        "rejects a rank with no tokens (only padding), which is allowed": '''
def combine_rank_gradients(grads, n_tokens):
    if len(grads) != len(n_tokens):
        raise ValueError("one gradient and one token count per rank")
    if min(n_tokens) <= 0:
        raise ValueError(f"every rank needs tokens, got {n_tokens}")
    total = sum(n_tokens)
    return sum(g * (n / total) for g, n in zip(grads, n_tokens))
''',
        "checks the lengths but not the total: 0 tokens everywhere raises only by accident (ZeroDivisionError)": '''
def combine_rank_gradients(grads, n_tokens):
    if len(grads) != len(n_tokens):
        raise ValueError("one gradient and one token count per rank")
    total = sum(n_tokens)
    return sum(g * (n / total) for g, n in zip(grads, n_tokens))
''',
        "scales the callers' gradients in place (mul_)": '''
def combine_rank_gradients(grads, n_tokens):
    if len(grads) != len(n_tokens):
        raise ValueError("one gradient and one token count per rank")
    total = sum(n_tokens)
    if total <= 0:
        raise ValueError("no tokens")
    out = torch.zeros_like(grads[0])
    for g, n in zip(grads, n_tokens):
        out += g.mul_(n / total)
    return out
''',
        "token-weighted but no input checks: zip silently drops a rank": '''
def combine_rank_gradients(grads, n_tokens):
    total = sum(n_tokens)
    return sum(g * (n / total) for g, n in zip(grads, n_tokens)) if total else torch.zeros_like(grads[0])
''',
    },
    "dispatch_plan": {
        "round-robin expert placement (expert % world_size) instead of contiguous blocks": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.reshape(-1) % world_size
    return torch.argsort(dest, stable=True), torch.bincount(dest, minlength=world_size)
''',
        "divides the expert id by world_size instead of by experts per rank": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = (topk_idx.reshape(-1) // world_size).clamp(max=world_size - 1)
    return torch.argsort(dest, stable=True), torch.bincount(dest, minlength=world_size)
''',
        "numbers the pairs column-major (choice-major)": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.t().reshape(-1) // (n_experts // world_size)
    return torch.argsort(dest, stable=True), torch.bincount(dest, minlength=world_size)
''',
        "argsort without stable=True: pairs inside a rank's group lose their order on long inputs": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.reshape(-1) // (n_experts // world_size)
    return torch.argsort(dest), torch.bincount(dest, minlength=world_size)
''',
        "bincount without minlength: ranks after the last busy one get no count": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.reshape(-1) // (n_experts // world_size)
    return torch.argsort(dest, stable=True), torch.bincount(dest)
''',
        "no divisibility check: more ranks than experts fails only by accident (division by zero)": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    per_rank = n_experts // world_size
    if per_rank * world_size != n_experts and per_rank:
        raise ValueError("experts must split evenly")
    dest = topk_idx.reshape(-1) // per_rank
    return torch.argsort(dest, stable=True), torch.bincount(dest, minlength=world_size)
''',
        "floor-divides topk_idx in place through a view": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.view(-1)
    dest //= n_experts // world_size
    return torch.argsort(dest, stable=True), torch.bincount(dest, minlength=world_size)
''',
        "counts pairs per expert instead of per rank": '''
def dispatch_plan(topk_idx, n_experts, world_size):
    if n_experts % world_size:
        raise ValueError("experts must split evenly")
    dest = topk_idx.reshape(-1) // (n_experts // world_size)
    return torch.argsort(dest, stable=True), torch.bincount(topk_idx.reshape(-1), minlength=n_experts)
''',
    },
    "form_batches": {
        "ignores prompt lengths: cuts the queue into chunks of max_batch": '''
def form_batches(lengths, max_batch):
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    return [list(range(i, min(i + max_batch, len(lengths)))) for i in range(0, len(lengths), max_batch)]
''',
        "groups by length but never splits a group at max_batch": '''
def form_batches(lengths, max_batch):
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return sorted(groups.values(), key=lambda b: b[0])
''',
        "no max_batch check: range() refuses a step of 0 by accident, but -2 and an empty queue pass": '''
def form_batches(lengths, max_batch):
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    batches = [group[j:j + max_batch] for group in by_length.values() for j in range(0, len(group), max_batch)]
    return sorted(batches, key=lambda batch: batch[0])
''',
        "checks max_batch only when requests are queued": '''
def form_batches(lengths, max_batch):
    if not lengths:
        return []
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    by_length = {}
    for i, n in enumerate(lengths):
        by_length.setdefault(n, []).append(i)
    batches = [group[j:j + max_batch] for group in by_length.values() for j in range(0, len(group), max_batch)]
    return sorted(batches, key=lambda batch: batch[0])
''',
        "consumes the caller's list of lengths as a queue (pop)": '''
def form_batches(lengths, max_batch):
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    by_length, i = {}, 0
    while lengths:
        by_length.setdefault(lengths.pop(0), []).append(i)
        i += 1
    batches = [group[j:j + max_batch] for group in by_length.values() for j in range(0, len(group), max_batch)]
    return sorted(batches, key=lambda batch: batch[0])
''',
        "orders batches by prompt length instead of by the oldest request": '''
def form_batches(lengths, max_batch):
    if max_batch < 1:
        raise ValueError("max_batch must be >= 1")
    groups = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [g[j:j + max_batch] for n in sorted(groups) for g in [groups[n]] for j in range(0, len(g), max_batch)]
''',
    },
}
