"""Typical wrong answers to the graded exercises of 09_finetuning (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_PPL_HEAD = """
def heldout_perplexity(model, batches):
    device = next(model.parameters()).device
"""

_BYTES_HEAD = """
def training_bytes(method, n_base, n_adapter=0, group_size=64):
    if method not in ("full", "lora", "qlora"):
        raise ValueError(method)
"""

_FISHER_HEAD = """
def fisher_diagonal(model, batches):
    device = next(model.parameters()).device
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
"""

_EWC_HEAD = """
def ewc_penalty(model, fisher, anchor, lam):
    params = dict(model.named_parameters())
"""

_KD_HEAD = """
def distillation_loss(student_logits, teacher_logits, labels, temperature=2.0, alpha=0.5):
    T = temperature
    targets = labels[:, 1:]
    keep = targets != -100
"""

_KD_CE = """
    return alpha * kd + (1 - alpha) * causal_lm_loss(student_logits, labels)
"""

WRONG_ANSWERS = {
    "heldout_perplexity": {
        "mean of the per-batch perplexities": _PPL_HEAD + """
    values = []
    with torch.no_grad():
        for batch in batches:
            loss = causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device))
            values.append(math.exp(loss.item()))
    return sum(values) / len(values)
""",
        "exp of the mean of per-batch losses (batches weighted equally, not tokens)": _PPL_HEAD + """
    losses = []
    with torch.no_grad():
        for batch in batches:
            losses.append(causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).item())
    return math.exp(sum(losses) / len(losses))
""",
        "no causal shift: logits at t scored against the label at t": _PPL_HEAD + """
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(device))
            labels = batch["labels"].to(device)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            count += (labels != -100).sum().item()
    return math.exp(nll / count)
""",
        "ignored positions counted in the denominator": _PPL_HEAD + """
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(device))[:, :-1]
            labels = batch["labels"].to(device)[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            count += labels.numel()
    return math.exp(nll / count)
""",
    },
    "training_bytes": {
        "AdamW counted with one state per weight (4 bytes instead of 8)": _BYTES_HEAD + """
    trainable = n_base if method == "full" else n_adapter
    if method == "qlora":
        weights = n_base // 2 + 4 * (n_base // group_size) + 4 * n_adapter
    else:
        weights = 4 * n_base + 4 * n_adapter
    out = {"weights": weights, "gradients": 4 * trainable, "optimizer": 4 * trainable}
    out["total"] = sum(out.values())
    return out
""",
        "LoRA: gradients for every weight, frozen ones too": _BYTES_HEAD + """
    trainable = n_base if method == "full" else n_adapter
    if method == "qlora":
        weights = n_base // 2 + 4 * (n_base // group_size) + 4 * n_adapter
    else:
        weights = 4 * n_base + 4 * n_adapter
    gradients = 4 * (n_base + n_adapter) if method != "full" else 4 * n_base
    out = {"weights": weights, "gradients": gradients, "optimizer": 8 * trainable}
    out["total"] = sum(out.values())
    return out
""",
        "QLoRA: the group scales forgotten": _BYTES_HEAD + """
    trainable = n_base if method == "full" else n_adapter
    if method == "qlora":
        weights = n_base // 2 + 4 * n_adapter
    else:
        weights = 4 * n_base + 4 * n_adapter
    out = {"weights": weights, "gradients": 4 * trainable, "optimizer": 8 * trainable}
    out["total"] = sum(out.values())
    return out
""",
        "QLoRA: one byte per 4-bit code (no packing)": _BYTES_HEAD + """
    trainable = n_base if method == "full" else n_adapter
    if method == "qlora":
        weights = n_base + 4 * (n_base // group_size) + 4 * n_adapter
    else:
        weights = 4 * n_base + 4 * n_adapter
    out = {"weights": weights, "gradients": 4 * trainable, "optimizer": 8 * trainable}
    out["total"] = sum(out.values())
    return out
""",
        "LoRA: the adapters' own storage left out of the weights": _BYTES_HEAD + """
    trainable = n_base if method == "full" else n_adapter
    weights = n_base // 2 + 4 * (n_base // group_size) if method == "qlora" else 4 * n_base
    out = {"weights": weights, "gradients": 4 * trainable, "optimizer": 8 * trainable}
    out["total"] = sum(out.values())
    return out
""",
    },
    "fisher_diagonal": {
        "zeroes the gradients only after each batch: stale .grad from training leaks into the first": _FISHER_HEAD + """
    for batch in batches:
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in params.items():
            fisher[name] += p.grad.detach() ** 2
        model.zero_grad(set_to_none=True)
    return {name: f / len(batches) for name, f in fisher.items()}
""",
        "squares the averaged gradient instead of averaging the squares": _FISHER_HEAD + """
    mean_grad = {name: torch.zeros_like(p) for name, p in params.items()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in params.items():
            mean_grad[name] += p.grad.detach() / len(batches)
    model.zero_grad(set_to_none=True)
    return {name: g ** 2 for name, g in mean_grad.items()}
""",
        "gradients not zeroed between batches (they accumulate)": _FISHER_HEAD + """
    model.zero_grad(set_to_none=True)
    for batch in batches:
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in params.items():
            fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(batches) for name, f in fisher.items()}
""",
        "sums over the batches instead of averaging": _FISHER_HEAD + """
    for batch in batches:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in params.items():
            fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return fisher
""",
        "absolute gradient instead of its square": _FISHER_HEAD + """
    for batch in batches:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in params.items():
            fisher[name] += p.grad.detach().abs()
    model.zero_grad(set_to_none=True)
    return {name: f / len(batches) for name, f in fisher.items()}
""",
        "every parameter, frozen ones too (zeros for them)": """
def fisher_diagonal(model, batches):
    device = next(model.parameters()).device
    fisher = {name: torch.zeros_like(p) for name, p in model.named_parameters()}
    for batch in batches:
        model.zero_grad(set_to_none=True)
        causal_lm_loss(model(batch["input_ids"].to(device)), batch["labels"].to(device)).backward()
        for name, p in model.named_parameters():
            if p.grad is not None:
                fisher[name] += p.grad.detach() ** 2
    model.zero_grad(set_to_none=True)
    return {name: f / len(batches) for name, f in fisher.items()}
""",
    },
    "ewc_penalty": {
        "the factor 1/2 forgotten": _EWC_HEAD + """
    return lam * sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
""",
        "plain L2 to the anchor: the Fisher weights left out": _EWC_HEAD + """
    return 0.5 * lam * sum(((params[n] - anchor[n]) ** 2).sum() for n in fisher)
""",
        "Fisher times the absolute difference (not squared)": _EWC_HEAD + """
    return 0.5 * lam * sum((fisher[n] * (params[n] - anchor[n]).abs()).sum() for n in fisher)
""",
        "current weights detached: the penalty has the right value but no gradient": _EWC_HEAD + """
    return 0.5 * lam * sum((fisher[n] * (params[n].detach() - anchor[n]) ** 2).sum() for n in fisher)
""",
    },
    "distillation_loss": {
        "no T^2 factor on the soft term": _KD_HEAD + """
    s, t = student_logits[:, :-1][keep] / T, teacher_logits[:, :-1][keep].detach() / T
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
""" + _KD_CE,
        "KL the wrong way round: KL(student || teacher)": _KD_HEAD + """
    s, t = student_logits[:, :-1][keep] / T, teacher_logits[:, :-1][keep].detach() / T
    kd = F.kl_div(F.log_softmax(t, -1), F.log_softmax(s, -1), log_target=True, reduction="batchmean") * T ** 2
""" + _KD_CE,
        "F.kl_div with reduction='mean' (also divides by the vocabulary)": _KD_HEAD + """
    s, t = student_logits[:, :-1][keep] / T, teacher_logits[:, :-1][keep].detach() / T
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="mean") * T ** 2
""" + _KD_CE,
        "soft term over every position, ignored ones included": _KD_HEAD + """
    s, t = student_logits[:, :-1] / T, teacher_logits[:, :-1].detach() / T
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="sum") / keep.numel() * T ** 2
""" + _KD_CE,
        "teacher not softened by the temperature": _KD_HEAD + """
    s, t = student_logits[:, :-1][keep] / T, teacher_logits[:, :-1][keep].detach()
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * T ** 2
""" + _KD_CE,
        "teacher not detached: gradients flow into the teacher": _KD_HEAD + """
    s, t = student_logits[:, :-1][keep] / T, teacher_logits[:, :-1][keep] / T
    kd = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean") * T ** 2
""" + _KD_CE,
    },
}
