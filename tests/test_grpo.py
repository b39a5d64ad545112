"""GRPO pieces: group advantages, PPO clipping, the k3 KL estimator, the loss's gradient, sampling
of groups, and a short run on a real model whose reward must rise."""

import math

import pytest
import torch

from deepseek_mini.chat import EOS, add_token_embeddings, chat_example, chat_tokenizer
from deepseek_mini.grpo import (GRPOConfig, GRPOTrainer, clipped_objective, exact_reward, group_advantages, grpo_loss,
                                k3_kl, sample_groups, token_logprobs)
from deepseek_mini.tasks import Example, instruction_task
from deepseek_mini.tokenizer import train_bpe_fast


def test_group_advantages_normalise_within_each_group_only():
    rewards = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [0.5, 0.5, 1.0, 0.0]])
    adv = group_advantages(rewards)
    std = math.sqrt(0.1875)  # population std of (1, 0, 0, 0)
    torch.testing.assert_close(adv[0], torch.tensor([0.75, -0.25, -0.25, -0.25]) / (std + 1e-4))
    assert torch.equal(adv[1], torch.zeros(4)) and torch.equal(adv[2], torch.zeros(4)), "zero-variance group -> 0"
    torch.testing.assert_close(adv.mean(dim=1), torch.zeros(4), atol=1e-6, rtol=0)
    # another group's rewards never change this group's advantages (no batch-wide normalisation)
    changed = rewards.clone()
    changed[3] = torch.tensor([5.0, -3, 2, 0])
    torch.testing.assert_close(group_advantages(changed)[:3], adv[:3])
    # scale-free: rewards of 0/10 give the same advantages as 0/1
    torch.testing.assert_close(group_advantages(10 * rewards[:1]), adv[:1], atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.ones(3, 1))
    with pytest.raises(ValueError, match=r"\[prompts, G\]"):
        group_advantages(torch.ones(8))


@pytest.mark.parametrize("advantage, ratio, value, moves", [
    (1.0, 1.5, 1.2, False),    # good sample already pushed past 1 + eps: clipped, no gradient
    (1.0, 1.1, 1.1, True),     # inside the trust region
    (1.0, 0.5, 0.5, True),     # good sample made LESS likely: always corrected
    (-1.0, 0.5, -0.8, False),  # bad sample already pushed below 1 - eps: clipped
    (-1.0, 0.9, -0.9, True),
    (-1.0, 1.5, -1.5, True),   # bad sample made MORE likely: always corrected
])
def test_clipped_objective(advantage, ratio, value, moves):
    old = torch.tensor([-2.0])
    logp = (old + math.log(ratio)).requires_grad_()
    out = clipped_objective(logp, old, torch.tensor([advantage]), clip_eps=0.2)
    torch.testing.assert_close(out, torch.tensor([value]))
    out.sum().backward()
    assert (logp.grad.abs() > 0).item() == moves


def test_k3_kl_is_non_negative_zero_when_equal_and_unbiased():
    torch.manual_seed(0)
    logp, ref = torch.randn(1000).clamp(max=0) - 1, torch.randn(1000).clamp(max=0) - 1
    assert (k3_kl(logp, ref) >= 0).all()
    assert torch.equal(k3_kl(logp, logp), torch.zeros(1000))
    # on tokens sampled from p, the mean of k3 is KL(p || q)
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = k3_kl(p.log()[tokens], q.log()[tokens]).mean()
    exact = (p * (p / q).log()).sum()
    assert abs(estimate - exact) < 0.01, (estimate, exact)


def test_grpo_loss_value_and_gradient_signs():
    logp = torch.full((2, 3), -1.0, requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    loss, stats = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, kl_coef=0.1)
    # ratio 1 and no KL: minus the mean over completions of each one's mean token advantage
    torch.testing.assert_close(loss, torch.tensor(0.0))
    assert stats == {"kl": 0.0, "clip_fraction": 0.0}
    loss.backward()
    g = logp.grad
    assert (g[0, :2] < 0).all(), "a descent step must raise the tokens of the better completion"
    assert g[1, 0] > 0, "and lower those of the worse one"
    assert g[0, 2] == 0 and (g[1, 1:] == 0).all(), "tokens outside the mask get no gradient"
    torch.testing.assert_close(g[0, :2], torch.tensor([-0.25, -0.25]))  # 1/2 completions x 1/2 tokens
    torch.testing.assert_close(g[1, 0], torch.tensor(0.5))  # 1/2 completions x 1/1 token

    # with zero advantage only the KL acts, and it pulls the policy back toward the reference
    logp = torch.tensor([[-0.5, -3.0]], requires_grad=True)
    ref = torch.tensor([[-1.0, -1.0]])
    loss, stats = grpo_loss(logp, logp.detach(), ref, torch.zeros(1), torch.ones(1, 2), kl_coef=0.5)
    assert loss > 0 and stats["kl"] > 0
    loss.backward()
    assert logp.grad[0, 0] > 0 and logp.grad[0, 1] < 0, "above the reference -> down, below -> up"
    with pytest.raises(ValueError, match="no token in mask"):
        grpo_loss(logp, logp, ref, torch.zeros(1), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="advantages be"):
        grpo_loss(logp, logp, ref, torch.zeros(2), torch.ones(1, 2))


def test_exact_reward():
    assert exact_reward("132" + EOS, "132") == 1.0
    assert exact_reward("132", "132") == 0.0, "a reply that never ended is not an answer"
    assert exact_reward("1320" + EOS, "132") == 0.0 and exact_reward(" 132" + EOS, "132") == 0.0


@pytest.fixture(scope="module")
def setup():
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    task = instruction_task(kinds=("larger",), n_digits=1, n_train=30, n_test=5, seed=0)
    base = train_bpe_fast([ex.prompt + " " + ex.answer for ex in task.train] * 3, vocab_size=300)
    tok = chat_tokenizer(base)
    torch.manual_seed(0)
    model = DeepseekModel(DeepseekConfig(vocab_size=base.vocab_size, hidden_size=32, num_hidden_layers=1,
                                         n_routed_experts=None, intermediate_size=48))
    add_token_embeddings(model, tok.vocab_size)
    return task, tok, model


def test_sample_groups_layout(setup):
    task, tok, model = setup
    prompts = [chat_example(ex).prompt for ex in task.train[:3]]
    G = 4
    ids, mask, texts = sample_groups(model, tok, prompts, group_size=G, max_new_tokens=5,
                                     generator=torch.Generator().manual_seed(0))
    assert ids.shape[0] == 3 * G and mask.shape == (3 * G, ids.shape[1] - 1) and len(texts) == 3 * G
    eos = tok.token_id(EOS)
    for k in range(3 * G):
        prompt = tok.encode(prompts[k // G])
        row = ids[k].tolist()
        assert row[:len(prompt)] == prompt, "row k belongs to prompt k // G"
        where = mask[k].nonzero()[:, 0].tolist()
        completion = [row[t + 1] for t in where]
        assert where == list(range(len(prompt) - 1, len(prompt) - 1 + len(completion)))
        assert 1 <= len(completion) <= 5 and tok.decode(completion) == texts[k]
        assert eos not in completion[:-1], "the completion ends at its first EOS"
        assert all(t == tok.eot_id for t in row[len(prompt) + len(completion):]), "then padding"
    # token_logprobs scores each next token under the model
    logp = token_logprobs(model, ids)
    manual = torch.log_softmax(model(ids[:1]), -1)[0, 3, ids[0, 4]]
    torch.testing.assert_close(logp[0, 3], manual)


def test_grpo_config_errors():
    with pytest.raises(ValueError, match="group_size must be >= 2"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="temperature must be > 0"):
        GRPOConfig(temperature=0)


def test_grpo_raises_a_verifiable_reward(setup):
    """A real GRPO run on a real (tiny, random) model: reward = the reply starts with a digit.
    Rare at first (a few % of samples), so most groups carry no signal; GRPO must still raise it."""
    task, tok, model = setup
    digit_first = lambda text, answer: float(text[:1].isdigit())  # noqa: E731
    config = GRPOConfig(steps=25, prompts_per_step=4, group_size=8, max_new_tokens=3, lr=1e-2, seed=0)
    trainer = GRPOTrainer(model, tok, task.train, config, reward_fn=digit_first)
    trainer.fit(progress=False)
    h = trainer.history
    first, last = sum(r["reward"] for r in h[:5]) / 5, sum(r["reward"] for r in h[-5:]) / 5
    assert first < 0.3 and last > first + 0.4, (first, last)
    assert h[-1]["kl"] > 0, "the policy moved away from the reference"
    assert any(r["zero_variance_groups"] > 0 for r in h), "all-equal groups were seen and measured"
    for r in h:
        assert 0 <= r["zero_variance_groups"] <= 1 and r["clip_fraction"] == 0.0  # one update per batch: ratio 1
    # the reference stayed where it started
    assert all(not p.requires_grad for p in trainer.reference.parameters())
    with pytest.raises(ValueError, match="fewer than prompts_per_step"):
        GRPOTrainer(model, tok, task.train[:2], config)


def test_trainer_uses_the_pieces_it_is_given(setup):
    """reward_fn, advantage_fn and loss_fn are the ones the trainer calls (assignment 15 trains with
    the learner's), and the history says which prompts were drawn and what each group scored."""
    import copy

    task, tok, model = setup
    model = copy.deepcopy(model)
    before = [p.detach().clone() for p in model.parameters()]
    calls = {"advantage": 0, "loss": 0}

    def advantage_fn(rewards):
        calls["advantage"] += 1
        return group_advantages(rewards)

    def no_op_loss(logp, old_logp, ref_logp, advantages, mask, clip_eps, kl_coef):
        calls["loss"] += 1
        assert (clip_eps, kl_coef) == (0.3, 0.5), "the config's clip_eps and kl_coef are passed on"
        return (logp * mask).sum() * 0.0, {}  # no gradient signal and no stats

    config = GRPOConfig(steps=2, prompts_per_step=3, group_size=4, max_new_tokens=3, lr=1e-2, clip_eps=0.3,
                        kl_coef=0.5, seed=1)
    trainer = GRPOTrainer(model, tok, task.train, config, reward_fn=lambda text, answer: float(len(text) % 2),
                          advantage_fn=advantage_fn, loss_fn=no_op_loss).fit(progress=False)
    assert calls == {"advantage": 2, "loss": 2}
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "a zero loss must not move the model"
    for record in trainer.history:
        assert len(record["examples"]) == 3 and all(0 <= i < len(task.train) for i in record["examples"])
        rewards = torch.tensor(record["group_rewards"])
        assert rewards.shape == (3, 4) and abs(rewards.mean().item() - record["reward"]) < 1e-6
        assert record["zero_variance_groups"] == (rewards.std(dim=1) == 0).float().mean().item()
        assert record["kl"] == 0.0 and record["clip_fraction"] == 0.0, "measured by the trainer: policy == reference"


@pytest.mark.parametrize("kinds", ["sum", "larger,sum", ""])
def test_recipe_rejects_unknown_rl_kinds(kinds, capsys):
    from deepseek_mini.grpo import main

    with pytest.raises(SystemExit):  # argparse's error, before any model is built
        main(["--rl-kinds", kinds])
    assert "--rl-kinds" in capsys.readouterr().err
