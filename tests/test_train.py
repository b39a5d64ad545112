"""Trainer: schedule, AdamW groups, clipping, accumulation, bf16, exact resume, determinism."""

import math

import pytest
import torch
from torch import nn

from deepseek_mini.train import TrainConfig, Trainer, causal_lm_loss, lr_at, param_groups, plot_history


VOCAB = 40


class TinyLM(nn.Module):
    """Embedding -> norm -> dropout -> linear head: small, but has every kind of parameter
    (matrices, norm weight, bias) and randomness (dropout)."""

    def __init__(self, dim=24, dropout=0.1):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, dim)
        self.mix = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(dim, VOCAB, bias=False)
        self.gradient_checkpointing = False

    def forward(self, input_ids, labels=None):  # a dict batch comes as keyword arguments; labels unused
        h = self.emb(input_ids)
        h = h + torch.relu(self.mix(h)).cumsum(1) / torch.arange(1, h.size(1) + 1).view(1, -1, 1)
        return self.head(self.drop(self.norm(h)))


class LMWithLoss(TinyLM):
    """Hugging Face style: forward(input_ids, labels) returns an object with .loss."""

    def forward(self, input_ids, labels=None):
        logits = super().forward(input_ids)
        return type("Out", (), {"loss": causal_lm_loss(logits, labels), "logits": logits})()


def batches(i, batch_size=4, seq=12):
    g = torch.Generator().manual_seed(1000 + i)
    x = torch.randint(0, VOCAB, (batch_size, seq), generator=g)
    x[:, 1::2] = (x[:, 0::2] * 7 + 3) % VOCAB  # learnable structure: odd tokens follow even ones
    return {"input_ids": x, "labels": x}


def make(seed=0, model_cls=TinyLM, data=batches, init_seed=None, **cfg):
    torch.manual_seed(seed if init_seed is None else init_seed)
    model = model_cls()
    cfg = {"max_steps": 12, "lr": 3e-3, "warmup_steps": 3, "progress": False, "seed": seed} | cfg
    return model, Trainer(model, TrainConfig(**cfg), data, eval_batches=batches)


def losses(trainer):
    return [r["loss"] for r in trainer.history]


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr=0.1, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear, peak at end
    assert all(b > a for a, b in zip(lrs[:10], lrs[1:10]))
    assert all(b <= a for a, b in zip(lrs[10:], lrs[11:]))  # then only down
    assert lr_at(60, cfg) == pytest.approx(0.55)  # cosine midpoint = (lr + min_lr) / 2
    assert lr_at(110, cfg) == pytest.approx(0.1)


def test_param_groups_no_decay_on_norms_and_biases_and_skip_frozen():
    model = TinyLM()
    model.emb.weight.requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps["params"]}  # noqa: E731
    assert ids(decay) == {id(model.mix.weight), id(model.head.weight)} and decay["weight_decay"] == 0.1
    assert ids(no_decay) == {id(model.mix.bias), id(model.norm.weight), id(model.norm.bias)}
    assert no_decay["weight_decay"] == 0.0
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no parameter with requires_grad=True"):
        param_groups(model, 0.1)


def test_training_reduces_loss_and_records_history():
    model, trainer = make(max_steps=25)
    before = trainer.evaluate()["val_loss"]
    trainer.fit()
    after = trainer.eval_history[-1]["val_loss"]
    assert after < before - 0.3, (before, after)
    h = trainer.history
    assert [r["step"] for r in h] == list(range(1, 26))
    assert h[-1]["tokens"] == 25 * 4 * 12
    assert all(math.isfinite(r["grad_norm"]) and r["lr"] > 0 for r in h)
    assert trainer.eval_history[-1]["val_ppl"] == pytest.approx(math.exp(after))


def test_two_runs_with_one_seed_are_identical_and_another_seed_differs():
    m1, t1 = make(seed=5)
    m2, t2 = make(seed=5)
    t1.fit()
    t2.fit()
    assert losses(t1) == losses(t2)
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)
    _, t3 = make(seed=6)
    t3.fit()
    assert losses(t3) != losses(t1)


@pytest.mark.parametrize("accum", [1, 3])
def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path, accum):
    m_full, full = make(grad_accum_steps=accum)
    full.fit()

    m_a, first = make(grad_accum_steps=accum)
    first.fit(steps=5)
    first.save_checkpoint(tmp_path / "ckpt")
    torch.manual_seed(123)  # disturb the global RNG: the checkpoint must restore it
    m_b, resumed = make(init_seed=99, grad_accum_steps=accum)  # different init: weights must be loaded
    resumed.load_checkpoint(tmp_path / "ckpt")
    assert resumed.step == 5 and losses(resumed) == losses(full)[:5]
    resumed.fit()
    assert losses(resumed) == losses(full), "resumed losses differ from the uninterrupted run"
    for p, q in zip(m_full.parameters(), m_b.parameters()):
        assert torch.equal(p, q)


def test_resume_with_an_iterable_of_batches(tmp_path):
    data = [batches(i) for i in range(5)]  # a plain iterator source, cycled
    make_it = lambda: make(data=iter_source(data))  # noqa: E731
    _, full = make_it()
    full.fit()
    _, first = make_it()
    first.fit(steps=7)
    first.save_checkpoint(tmp_path / "c")
    _, resumed = make_it()
    resumed.load_checkpoint(tmp_path / "c").fit()
    assert losses(resumed) == losses(full)


class iter_source:
    """Iterable without __len__/__getitem__ (like a DataLoader)."""

    def __init__(self, items):
        self.items = items

    def __iter__(self):
        return iter(self.items)


def test_gradient_accumulation_matches_one_big_batch():
    big = lambda i: batches(i, batch_size=4)  # noqa: E731
    half = lambda i: {k: v[(i % 2) * 2:(i % 2) * 2 + 2] for k, v in batches(i // 2, batch_size=4).items()}  # noqa: E731
    m1, t1 = make(data=big, max_steps=6)
    m2, t2 = make(data=half, max_steps=6, grad_accum_steps=2)
    m1.drop.p = m2.drop.p = 0.0
    t1.fit()
    t2.fit()
    assert losses(t1) == pytest.approx(losses(t2), rel=1e-5)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_gradients_are_clipped_before_the_optimizer_step():
    model, trainer = make(grad_clip=0.05, max_steps=3)
    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item())

    trainer.optimizer.register_step_pre_hook(record)
    trainer.fit()
    assert all(r["grad_norm"] > 0.05 for r in trainer.history), "test needs norms above the clip"
    assert seen == pytest.approx([0.05] * 3, rel=1e-4)


def test_bf16_autocast_on_cpu():
    dtypes = []

    def loss_fn(model, batch):
        logits = model(batch["input_ids"])
        dtypes.append(logits.dtype)
        return causal_lm_loss(logits, batch["labels"])

    torch.manual_seed(0)
    model = TinyLM()
    Trainer(model, TrainConfig(max_steps=2, precision="bf16", progress=False), batches, loss_fn=loss_fn).fit()
    assert dtypes == [torch.bfloat16] * 2
    assert all(p.dtype == torch.float32 for p in model.parameters()), "master weights stay fp32"
    # "auto" keeps fp32 on a CPU
    assert not Trainer(TinyLM(), TrainConfig(precision="auto"), batches).use_bf16


def test_model_returning_its_own_loss_and_tuple_batches():
    _, with_loss = make(model_cls=LMWithLoss)
    _, logits_only = make()
    with_loss.fit()
    logits_only.fit()
    assert losses(with_loss) == losses(logits_only)

    class TupleModel(TinyLM):
        def forward(self, x, y):
            return causal_lm_loss(super().forward(x), y)

    torch.manual_seed(0)
    t = Trainer(TupleModel(), TrainConfig(max_steps=2, progress=False), [tuple(batches(0).values())])
    assert len(t.fit()) == 2


def test_only_trainable_parameters_change_like_lora():
    model, trainer = make(max_steps=3)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("head"))
    trainer = Trainer(model, TrainConfig(max_steps=3, progress=False), batches)
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    head = model.head.weight.clone()
    trainer.fit()
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    assert not torch.equal(model.head.weight, head)
    assert sum(len(g["params"]) for g in trainer.optimizer.param_groups) == 1


def test_evaluation_does_not_change_the_training_run():
    _, plain = make()
    _, with_eval = make(eval_every=2)
    plain.fit()
    with_eval.fit()
    assert losses(plain) == losses(with_eval)
    assert [r["step"] for r in with_eval.eval_history] == [2, 4, 6, 8, 10, 12]


def test_gradient_checkpointing_switch_and_periodic_checkpoints(tmp_path):
    model, trainer = make(gradient_checkpointing=True, checkpoint_every=4, checkpoint_dir=str(tmp_path))
    assert model.gradient_checkpointing is True
    trainer.fit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000008", "step-000012"]
    with pytest.raises(ValueError, match="no gradient_checkpointing_enable"):
        Trainer(nn.Linear(2, 2), TrainConfig(gradient_checkpointing=True), batches)


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="warmup_steps must be in"):
        TrainConfig(max_steps=5, warmup_steps=6)
    with pytest.raises(ValueError, match="precision must be"):
        TrainConfig(precision="fp8")
    with pytest.raises(ValueError, match="checkpoint_every needs checkpoint_dir"):
        TrainConfig(checkpoint_every=2)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        Trainer(lambda x: x, TrainConfig(), batches)
    with pytest.raises(ValueError, match="could not get a loss"):
        Trainer(nn.Linear(12, 3), TrainConfig(progress=False), [torch.ones(2, 12)]).fit()
    nan_loss = lambda model, batch: model(batch["input_ids"]).sum() * float("nan")  # noqa: E731
    with pytest.raises(FloatingPointError, match="loss is nan at step 0"):
        Trainer(TinyLM(), TrainConfig(progress=False), batches, loss_fn=nan_loss).fit()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        make()[1].load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"logits must be \[batch, seq, vocab\]"):
        causal_lm_loss(torch.zeros(2, 5), torch.zeros(2, 5, dtype=torch.long))


def test_progress_bar_and_plot(capsys):
    import matplotlib

    matplotlib.use("Agg")
    _, trainer = make(progress=True, max_steps=3)
    trainer.fit()
    assert "train" in capsys.readouterr().err  # tqdm writes its bar to stderr outside notebooks
    ax = plot_history(trainer)
    assert len(ax.lines) == 2 and ax.lines[0].get_ydata().tolist() == losses(trainer)


def test_deepseek_model_with_gradient_checkpointing_and_bf16():
    """The trainer drives our DeepseekModel (MLA + MoE): recomputing activations in the backward
    pass changes nothing, and bf16 autocast stays close to fp32."""
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    def run(**cfg):
        torch.manual_seed(0)
        model = DeepseekModel(DeepseekConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2))
        trainer = Trainer(model, TrainConfig(max_steps=3, progress=False, **cfg), batches)
        trainer.fit()
        return model, losses(trainer)

    _, plain = run()
    model, checkpointed = run(gradient_checkpointing=True)
    assert model.gradient_checkpointing is True
    assert checkpointed == pytest.approx(plain, rel=1e-6)
    _, bf16 = run(precision="bf16")
    assert bf16 == pytest.approx(plain, rel=2e-2) and bf16 != plain


def test_lora_fine_tuning_uses_the_same_trainer_and_resumes_exactly(tmp_path):
    """inject_lora freezes the base: only adapters reach AdamW, the base weights stay
    bit-identical, the loss goes down, and a checkpoint resumes to the same losses."""
    from deepseek_mini.lora import inject_lora
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    def lora_trainer():
        torch.manual_seed(0)
        model = DeepseekModel(DeepseekConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2))
        inject_lora(model, ["q_b_proj", "kv_b_proj", "o_proj"], r=4, alpha=8)
        return model, Trainer(model, TrainConfig(max_steps=8, lr=1e-2, progress=False), batches)

    model, full = lora_trainer()
    base = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    optimized = [p for g in full.optimizer.param_groups for p in g["params"]]
    assert {id(p) for p in optimized} == {id(p) for n, p in model.named_parameters() if "lora_" in n}
    full.fit()
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)
    assert losses(full)[-1] < losses(full)[0]

    _, first = lora_trainer()
    first.fit(steps=3)
    first.save_checkpoint(tmp_path / "lora")
    _, resumed = lora_trainer()
    resumed.load_checkpoint(tmp_path / "lora").fit()
    assert losses(resumed) == losses(full)
