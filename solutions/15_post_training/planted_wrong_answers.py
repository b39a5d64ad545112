"""Typical wrong answers to the graded exercises of 15_post_training (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_LABELS_HEAD = """
def assistant_labels(tokenizer, messages):
    ids, labels = [], []

    def add(text, learn):
        new = tokenizer.encode(text)
        ids.extend(new)
        labels.extend(new if learn else [-100] * len(new))

    add(BOS, False)
"""

_ADV_HEAD = """
def group_advantages(rewards, eps=1e-4):
"""

_KL_HEAD = """
def k3_kl(logp, ref_logp):
"""

_LOSS_HEAD = """
def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps=0.2, kl_coef=0.04):
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    a = advantages[:, None]
"""

WRONG_ANSWERS = {
    "assistant_labels": {
        "the EOS that closes a reply is not learned (the model never learns to stop)": _LABELS_HEAD + """
    for m in messages:
        if m["role"] == "system":
            add(m["content"], False)
        elif m["role"] == "user":
            add(USER + m["content"], False)
        else:
            add(ASSISTANT, False)
            add(m["content"], True)
            add(EOS, False)
    return ids, labels
""",
        "the <｜Assistant｜> marker is learned as part of the reply": _LABELS_HEAD + """
    for m in messages:
        if m["role"] == "system":
            add(m["content"], False)
        elif m["role"] == "user":
            add(USER + m["content"], False)
        else:
            add(ASSISTANT + m["content"] + EOS, True)
    return ids, labels
""",
        "only the last assistant turn is learned": """
def assistant_labels(tokenizer, messages):
    last = max(k for k, m in enumerate(messages) if m["role"] == "assistant")
    ids = tokenizer.encode(render(messages[:last]) + ASSISTANT)
    labels = [-100] * len(ids)
    reply = tokenizer.encode(messages[last]["content"] + EOS)
    return ids + reply, labels + reply
""",
        "every token is learned (no mask: the model also learns to write the user's questions)": """
def assistant_labels(tokenizer, messages):
    ids = tokenizer.encode(render(messages))
    return ids, list(ids)
""",
        "labels shifted by one (the model already shifts them: HF convention)": _LABELS_HEAD + """
    for m in messages:
        if m["role"] == "system":
            add(m["content"], False)
        elif m["role"] == "user":
            add(USER + m["content"], False)
        else:
            add(ASSISTANT, False)
            add(m["content"] + EOS, True)
    shifted = [-100] + labels[:-1]
    return ids, shifted
""",
        "the system prompt is learned": _LABELS_HEAD + """
    for m in messages:
        if m["role"] == "system":
            add(m["content"], True)
        elif m["role"] == "user":
            add(USER + m["content"], False)
        else:
            add(ASSISTANT, False)
            add(m["content"] + EOS, True)
    return ids, labels
""",
    },
    "exact_reward": {
        "accepts any completion that starts with the answer (rambling pays)": """
def exact_reward(completion, answer):
    return float(completion.startswith(answer))
""",
        "accepts the answer anywhere in the reply (listing guesses pays)": """
def exact_reward(completion, answer):
    return float(answer in completion)
""",
        "accepts a prefix of the answer": """
def exact_reward(completion, answer):
    text = completion.removesuffix(EOS)
    return float(len(text) > 0 and answer.startswith(text))
""",
        "does not require the EOS (a reply that never stops is paid)": """
def exact_reward(completion, answer):
    return float(completion.removesuffix(EOS) == answer)
""",
        "strips whitespace (the format is part of the task)": """
def exact_reward(completion, answer):
    return float(completion.strip() == answer + EOS)
""",
    },
    "group_advantages": {
        "mean and std over the whole batch instead of each group": _ADV_HEAD + """
    return (rewards - rewards.mean()) / (rewards.std(correction=0) + eps)
""",
        "std over the whole batch, mean per group": _ADV_HEAD + """
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(correction=0) + eps)
""",
        "no eps: zero-variance groups divide 0 by 0 (NaN)": _ADV_HEAD + """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / rewards.std(dim=1, correction=0, keepdim=True)
""",
        "sample std (divide by G - 1) instead of the population std": _ADV_HEAD + """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, keepdim=True) + eps)
""",
        "eps under the square root": _ADV_HEAD + """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / torch.sqrt(rewards.var(dim=1, correction=0, keepdim=True) + eps)
""",
        "the default eps instead of the one given": _ADV_HEAD + """
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, correction=0, keepdim=True) + 1e-4)
""",
        "not centred: rewards divided by the std": _ADV_HEAD + """
    return rewards / (rewards.std(dim=1, correction=0, keepdim=True) + eps)
""",
    },
    "k3_kl": {
        "the ratio the other way round, x = pi / pi_ref": _KL_HEAD + """
    log_x = logp - ref_logp
    return torch.exp(log_x) - log_x - 1
""",
        "the plain log-ratio (k1): can be negative per token": _KL_HEAD + """
    return logp - ref_logp
""",
        "forgets the -1": _KL_HEAD + """
    log_x = ref_logp - logp
    return torch.exp(log_x) - log_x
""",
        "the k2 estimator, half the squared log-ratio (biased)": _KL_HEAD + """
    return 0.5 * (logp - ref_logp) ** 2
""",
    },
    "grpo_loss": {
        "max instead of min (the optimistic bound: no trust region)": _LOSS_HEAD + """
    objective = torch.maximum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "only the clipped term, no min with the unclipped one": _LOSS_HEAD + """
    objective = ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "KL penalty with the wrong sign (rewards drifting from the reference)": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective + kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "KL direction swapped (k3 of pi / pi_ref)": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(ref_logp, logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "mean over every position, padding and prompt included": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return per_token.mean()
""",
        "masked sum divided by the full length T": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.shape[1]).mean()
""",
        "one mean over all tokens of the batch (long completions weigh more)": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return (per_token * mask).sum() / mask.sum()
""",
        "returns the objective to maximise, not the loss": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = objective - kl_coef * k3_kl(logp, ref_logp)
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "ratio as a difference of log-probabilities, not its exponential": _LOSS_HEAD + """
    ratio = 1 + logp - old_logp
    objective = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "clip_eps and kl_coef ignored (defaults hard-coded)": _LOSS_HEAD + """
    objective = torch.minimum(ratio * a, ratio.clamp(0.8, 1.2) * a)
    per_token = -(objective - 0.04 * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
        "clipping written with a hard cut that kills the gradient everywhere outside the region": _LOSS_HEAD + """
    inside = ((ratio > 1 - clip_eps) & (ratio < 1 + clip_eps)).to(logp.dtype)
    objective = ratio * a * inside + ratio.detach() * a * (1 - inside)
    per_token = -(objective - kl_coef * k3_kl(logp, ref_logp))
    return ((per_token * mask).sum(dim=1) / mask.sum(dim=1)).mean()
""",
    },
}
