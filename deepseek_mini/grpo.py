"""GRPO (Group Relative Policy Optimization) from scratch, as in DeepSeekMath and DeepSeek-R1.

Reinforcement learning with a verifiable reward: no reward model and no value network.
One step:
  1. take a few prompts; for each, sample a GROUP of G completions from the current policy;
  2. score each completion with a rule (here: 1 if the reply is exactly the right answer and
     ends with "<｜end▁of▁sentence｜>", else 0);
  3. advantage of completion i = (r_i - mean of its group) / (std of its group): better than
     its siblings -> pushed up, worse -> pushed down. The group mean replaces PPO's learned
     value baseline. A group whose rewards are all equal (all right or all wrong) has
     advantage 0 everywhere and teaches nothing: the "zero-variance group" problem;
  4. loss per completion token t (PPO's clipped objective, minus a KL penalty):
        ratio_t = pi(o_t) / pi_old(o_t)
        - min(ratio_t * A, clip(ratio_t, 1 - eps, 1 + eps) * A) + beta * KL_t
     where KL_t is the "k3" estimate of KL(pi || pi_ref) against the frozen starting model:
        KL_t = pi_ref(o_t) / pi(o_t) - log(pi_ref(o_t) / pi(o_t)) - 1   (>= 0, = 0 when equal)
     averaged over each completion's tokens, then over the completions.
pi_old is the policy that sampled the batch: with one update per batch (updates_per_batch=1,
the default) the ratio is exactly 1 and the clipping only matters on later updates of the
same samples.

Run the whole recipe (base -> SFT -> GRPO on `tasks.instruction_task`, GRPO on prompts in a
wording SFT never saw, of the kinds where the SFT model's groups carry signal, as in assignment 15) with
    python -m deepseek_mini.grpo [--seed N] [--rl-kinds larger,count]
"""

import copy
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .chat import EOS, chat_example
from .tasks import Example


# ----------------------------------------------------------------------------------------------
# The pieces of the objective
# ----------------------------------------------------------------------------------------------

def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """rewards [prompts, G] -> advantages [prompts, G]: (r - group mean) / (group std + eps).
    The std is the population std (divide by G); a group with equal rewards gets all zeros."""
    if rewards.dim() != 2 or rewards.shape[1] < 2:
        raise ValueError(f"group_advantages: rewards must be [prompts, G] with G >= 2, got {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    return centred / (rewards.std(dim=1, unbiased=False, keepdim=True) + eps)


def clipped_objective(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor,
                      clip_eps: float = 0.2) -> torch.Tensor:
    """PPO's per-token objective (to MAXIMISE): min(ratio * A, clip(ratio, 1-eps, 1+eps) * A),
    ratio = exp(logp - old_logp). The min makes it pessimistic: once the ratio has moved
    past 1 +- eps in the direction A rewards, the gradient is zero."""
    ratio = torch.exp(logp - old_logp)
    return torch.minimum(ratio * advantages, ratio.clamp(1 - clip_eps, 1 + clip_eps) * advantages)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from tokens sampled from pi (Schulman's "k3"):
    x - log x - 1 with x = pi_ref / pi. Unbiased, never negative, 0 where the two agree."""
    log_x = ref_logp - logp
    return torch.exp(log_x) - log_x - 1


def grpo_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps: float = 0.2, kl_coef: float = 0.04):
    """The GRPO loss to MINIMISE, and its parts for logging.

    logp, old_logp, ref_logp, mask: [batch, T] (per completion token; mask 1 on tokens the
    policy wrote, 0 on prompt and padding); advantages: [batch], one per completion."""
    if not (logp.shape == old_logp.shape == ref_logp.shape == mask.shape) or advantages.shape != logp.shape[:1]:
        raise ValueError(f"grpo_loss: logp/old_logp/ref_logp/mask must share [batch, T] and advantages be [batch]; got "
                         f"{tuple(logp.shape)}, {tuple(old_logp.shape)}, {tuple(ref_logp.shape)}, {tuple(mask.shape)}, "
                         f"{tuple(advantages.shape)}")
    mask = mask.to(logp.dtype)
    lengths = mask.sum(dim=1)
    if (lengths == 0).any():
        raise ValueError("grpo_loss: a completion has no token in mask")
    objective = clipped_objective(logp, old_logp, advantages[:, None], clip_eps)
    kl = k3_kl(logp, ref_logp)
    per_token = -(objective - kl_coef * kl)
    loss = ((per_token * mask).sum(dim=1) / lengths).mean()
    with torch.no_grad():
        ratio = torch.exp(logp - old_logp)
        clipped = ((ratio - 1).abs() > clip_eps) & (mask > 0)
        stats = {"kl": ((kl * mask).sum(dim=1) / lengths).mean().item(),
                 "clip_fraction": (clipped.sum() / mask.sum()).item()}
    return loss, stats


# ----------------------------------------------------------------------------------------------
# Sampling and scoring
# ----------------------------------------------------------------------------------------------

def exact_reward(completion: str, answer: str) -> float:
    """Rule-based reward: 1.0 when the completion is the answer followed by EOS (a reply that
    rambles on, or never ends, earns nothing), else 0.0."""
    return float(completion == answer + EOS)


def token_logprobs(model, input_ids: torch.Tensor) -> torch.Tensor:
    """log p(input_ids[:, t+1] | input_ids[:, :t+1]) for every t: [batch, seq - 1]."""
    logits = model(input_ids)
    logits = getattr(logits, "logits", logits)[:, :-1].float()
    return torch.gather(F.log_softmax(logits, dim=-1), 2, input_ids[:, 1:, None])[..., 0]


@torch.no_grad()
def sample_groups(model, tokenizer, prompts: list[str], group_size: int, max_new_tokens: int,
                  temperature: float = 1.0, generator: torch.Generator | None = None):
    """G sampled completions of each prompt (prompts in chat format, ending in "<｜Assistant｜>").

    Returns (input_ids [P*G, S], mask [P*G, S-1], texts): each row is prompt + completion,
    right-padded; mask marks the completion's tokens (up to and including the first EOS) in
    the positions of `token_logprobs`. Rows of prompt p are rows p*G .. p*G+G-1."""
    was_training = model.training
    model.eval()
    eos_id = tokenizer.token_id(EOS)
    device = next(model.parameters()).device
    rows, texts = [], []
    try:
        for prompt in prompts:
            ids = torch.tensor([tokenizer.encode(prompt)], device=device).repeat(group_size, 1)
            out = model.generate(ids, max_new_tokens, temperature=temperature, eos_token_id=eos_id,
                                 generator=generator)
            for row in out.tolist():
                new = row[ids.shape[1]:]
                if eos_id in new:
                    new = new[:new.index(eos_id) + 1]
                rows.append((ids.shape[1], row[:ids.shape[1]] + new))
                texts.append(tokenizer.decode(new))
    finally:
        model.train(was_training)
    width = max(len(r) for _, r in rows)
    input_ids = torch.full((len(rows), width), tokenizer.eot_id, dtype=torch.long, device=device)
    mask = torch.zeros(len(rows), width - 1, dtype=torch.bool, device=device)
    for k, (n_prompt, row) in enumerate(rows):
        input_ids[k, :len(row)] = torch.tensor(row)
        mask[k, n_prompt - 1:len(row) - 1] = True  # position t scores token t + 1
    return input_ids, mask, texts


# ----------------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------------

@dataclass
class GRPOConfig:
    steps: int = 60
    prompts_per_step: int = 8
    group_size: int = 8  # G
    max_new_tokens: int = 8
    temperature: float = 1.0
    lr: float = 3e-4
    clip_eps: float = 0.2
    kl_coef: float = 0.04  # beta (DeepSeekMath's value)
    updates_per_batch: int = 1  # optimizer steps on each sampled batch (ratio != 1 from the 2nd on)
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self):
        checks = [(self.steps >= 1, "steps must be >= 1"), (self.prompts_per_step >= 1, "prompts_per_step must be >= 1"),
                  (self.group_size >= 2, "group_size must be >= 2 (advantages compare within a group)"),
                  (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
                  (self.temperature > 0, "temperature must be > 0 (greedy samples would all be equal)"),
                  (self.lr > 0 and self.clip_eps > 0 and self.kl_coef >= 0, "need lr > 0, clip_eps > 0, kl_coef >= 0"),
                  (self.updates_per_batch >= 1, "updates_per_batch must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"GRPOConfig: {message} (got {self})")


class GRPOTrainer:
    """GRPO on prompt/answer examples (plain, e.g. from `tasks.instruction_task`; the chat
    template is applied here). The reference model is a frozen copy of the policy as given.

    The three pieces of the method can be swapped for your own versions with the same signatures
    (assignment 15 trains with the learner's): `reward_fn(completion, answer) -> float`,
    `advantage_fn(rewards [prompts, G]) -> [prompts, G]` and
    `loss_fn(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef) -> (loss, stats)`
    (stats may be empty; missing "kl" / "clip_fraction" are then measured here)."""

    def __init__(self, model, tokenizer, examples: list[Example], config: GRPOConfig, reward_fn=exact_reward,
                 advantage_fn=group_advantages, loss_fn=grpo_loss):
        if len(examples) < config.prompts_per_step:
            raise ValueError(f"GRPOTrainer: {len(examples)} examples, fewer than prompts_per_step={config.prompts_per_step}")
        self.model, self.tokenizer, self.config, self.reward_fn = model, tokenizer, config, reward_fn
        self.advantage_fn, self.loss_fn = advantage_fn, loss_fn
        self.examples = examples
        self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.generator = torch.Generator().manual_seed(config.seed)
        self.step, self.history = 0, []

    def train_step(self) -> dict:
        cfg, model = self.config, self.model
        pick = torch.randint(len(self.examples), (cfg.prompts_per_step,), generator=self.generator).tolist()
        batch = [self.examples[i] for i in pick]
        prompts = [chat_example(ex).prompt for ex in batch]
        input_ids, mask, texts = sample_groups(model, self.tokenizer, prompts, cfg.group_size, cfg.max_new_tokens,
                                               cfg.temperature, self.generator)
        answers = [ex.answer for ex in batch for _ in range(cfg.group_size)]
        rewards = torch.tensor([self.reward_fn(t, a) for t, a in zip(texts, answers)]).view(-1, cfg.group_size)
        advantages = self.advantage_fn(rewards).flatten()
        with torch.no_grad():
            old_logp = token_logprobs(model, input_ids)
            ref_logp = token_logprobs(self.reference, input_ids)
        model.train()
        for _ in range(cfg.updates_per_batch):
            logp = token_logprobs(model, input_ids)
            loss, stats = self.loss_fn(logp, old_logp, ref_logp, advantages, mask, cfg.clip_eps, cfg.kl_coef)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]], cfg.grad_clip)
            self.optimizer.step()
        self.step += 1
        # measured here too, so a custom loss_fn may return no stats; mean per completion over its tokens
        with torch.no_grad():
            m = mask.float()
            kl = ((k3_kl(logp.detach(), ref_logp) * m).sum(dim=1) / m.sum(dim=1)).mean().item()
            clipped = (((logp.detach() - old_logp).exp() - 1).abs() > cfg.clip_eps) & mask
        record = {"step": self.step, "loss": loss.item(), "reward": rewards.mean().item(),
                  "zero_variance_groups": (rewards.std(dim=1) == 0).float().mean().item(),
                  "completion_tokens": mask.sum(dim=1).float().mean().item(),
                  "kl": kl, "clip_fraction": (clipped.sum() / mask.sum()).item(), **stats,
                  "examples": pick, "group_rewards": rewards.tolist()}  # which prompts, and each group's rewards
        self.history.append(record)
        return record

    def fit(self, progress: bool = True) -> "GRPOTrainer":
        from tqdm.auto import tqdm

        bar = tqdm(range(self.step, self.config.steps), desc="GRPO", disable=not progress)
        for _ in bar:
            r = self.train_step()
            bar.set_postfix(reward=f"{r['reward']:.2f}", kl=f"{r['kl']:.3f}")
        return self


# ----------------------------------------------------------------------------------------------
# The whole recipe, as evidence: base -> SFT -> GRPO, held-out exact match after each stage
# ----------------------------------------------------------------------------------------------

def main(argv=None):
    """Assignment 15's recipe without Jupyter: SFT on 4,000 demonstrations in the first wording,
    then GRPO on other prompts in the second wording (`tasks.reword`), which SFT never saw, of the
    kinds in --rl-kinds only (by default larger and count: on add and reverse nearly every group
    of the SFT model is all wrong, so GRPO steps on them would carry no signal)."""
    import argparse

    from .chat import add_token_embeddings, chat_examples, chat_tokenizer, evaluate_chat
    from .pretrained import pretrained
    from .tasks import TaskBatches, instruction_task, kind_of, reword
    from .train import TrainConfig, Trainer

    parser = argparse.ArgumentParser(description="base -> SFT -> GRPO on the instruction task, on a CPU")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=3e-3)
    parser.add_argument("--grpo-steps", type=int, default=GRPOConfig.steps)
    parser.add_argument("--grpo-lr", type=float, default=4e-4)
    parser.add_argument("--kl-coef", type=float, default=GRPOConfig.kl_coef)
    parser.add_argument("--rl-kinds", default="larger,count", help="comma-separated kinds GRPO trains on")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    kinds = ("add", "larger", "reverse", "count")
    rl_kinds = tuple(dict.fromkeys(args.rl_kinds.split(",")))  # in order, once each
    if not rl_kinds or not set(rl_kinds) <= set(kinds):
        parser.error(f"--rl-kinds: expected a comma-separated subset of {kinds}, got {args.rl_kinds!r}")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    tiny = pretrained("tiny")
    tok = chat_tokenizer(tiny.tokenizer)
    model = add_token_embeddings(tiny.model, tok.vocab_size)
    task = instruction_task(n_train=8000, n_test=800, seed=args.seed)  # 200 held-out prompts per kind
    sft_data = task.train[:4000]
    rl_prompts = [reword(ex) for ex in task.train[4000:] if kind_of(ex) in rl_kinds]
    test = {k: [ex for ex in task.test if kind_of(ex) == k] for k in kinds}

    def report(stage, seconds):
        # answers have at most 5 digits: 6 tokens with EOS, 7 leaves room to see a rambling reply
        scores = {}
        for wording, reworded in (("first", False), ("second", True)):
            scores[wording] = {k: evaluate_chat(model, tok, [reword(e) if reworded else e for e in test[k]], max_new_tokens=7)
                               for k in kinds}
            print(f"{stage:<5} held-out exact match, {wording:<6} wording: " +
                  "  ".join(f"{k} {v:4.0%}" for k, v in scores[wording].items()) +
                  f"  | mean {sum(scores[wording].values()) / 4:4.0%}   ({seconds:.0f} s)", flush=True)
        return scores

    started = time.perf_counter()
    scores = {"base": report("base", 0)}
    t = time.perf_counter()
    sft = TrainConfig(max_steps=args.sft_steps, lr=args.sft_lr, min_lr=args.sft_lr / 10, warmup_steps=args.sft_steps // 10,
                      weight_decay=0.0, seed=args.seed, progress=False)
    Trainer(model, sft, TaskBatches(tok, chat_examples(sft_data), batch_size=32, seed=args.seed)).fit()
    scores["sft"] = report("SFT", time.perf_counter() - t)
    t = time.perf_counter()
    trainer = GRPOTrainer(model, tok, rl_prompts, GRPOConfig(steps=args.grpo_steps, lr=args.grpo_lr, max_new_tokens=7,
                                                             kl_coef=args.kl_coef, seed=args.seed))
    trainer.fit(progress=False)
    scores["grpo"] = report("GRPO", time.perf_counter() - t)
    h = trainer.history
    k = max(1, len(h) // 5)
    mean = lambda key, rows: sum(r[key] for r in rows) / len(rows)  # noqa: E731
    print(f"GRPO sampled reward {mean('reward', h[:k]):.2f} (first {k} steps) -> {mean('reward', h[-k:]):.2f} (last {k}); "
          f"zero-variance groups {mean('zero_variance_groups', h[:k]):.0%} -> {mean('zero_variance_groups', h[-k:]):.0%}; "
          f"KL to reference {mean('kl', h[-k:]):.4f} (last {k})")
    gain = {k: round(100 * (scores["grpo"]["second"][k] - scores["sft"]["second"][k])) for k in kinds}
    rl_mean = {stage: sum(scores[stage]["second"][k] for k in rl_kinds) / len(rl_kinds) for stage in ("sft", "grpo")}
    print(f"GRPO gain in the second wording (points): {gain}; on the RL task ({'+'.join(rl_kinds)}) "
          f"{rl_mean['sft']:.1%} -> {rl_mean['grpo']:.1%}: {100 * (rl_mean['grpo'] - rl_mean['sft']):+.1f} points; "
          f"total wall time {time.perf_counter() - started:.0f} s on {args.threads} thread(s)")
    return scores


if __name__ == "__main__":
    main()
