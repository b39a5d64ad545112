"""The fine-tuning recipe of assignments 08 and 09, measured: held-out exact match of the tiny
pretrained DeepSeek before and after full fine-tuning, LoRA and QLoRA on
`tasks.digit_string_task` (reverse 4-digit strings; test problems never trained on), what full
fine-tuning forgets of its pretraining text and how much EWC and replay keep, and distillation
into a half-depth student with few labels, over several seeds.

    PYTHONPATH=. python benchmarks/finetune_recipes.py            # everything (a few CPU minutes)
    PYTHONPATH=. python benchmarks/finetune_recipes.py --only methods

One torch thread, as the notebooks use on a CPU. Prints one table per part; the notebooks assert
ranges around these numbers.
"""

import argparse
import copy
import math
import time

import torch
import torch.nn.functional as F

from deepseek_mini.corpus import TokenBatches, encode_documents, stdlib_corpus
from deepseek_mini.lora import inject_lora
from deepseek_mini.pretrained import pretrained
from deepseek_mini.quant import quantize_model
from deepseek_mini.tasks import (Example, TaskBatches, digit_string_task, digit_tokenizer, evaluate_exact_match,
                                 greedy_complete)
from deepseek_mini.train import TrainConfig, Trainer, causal_lm_loss

# the recipe the notebooks use
TASK = dict(op="reverse", n_digits=4, n_train=4000, n_test=200, seed=0)
STEPS, BATCH = 300, 32
LR = {"full": 2e-3, "lora": 3e-3, "qlora": 3e-3}
LORA_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
NEW_TOKENS = TASK["n_digits"] + 2  # " ", the digits, "\n"


def prepare(base, method, init_seed=1):
    model = copy.deepcopy(base)
    if method == "qlora":
        quantize_model(model, "int4", group_size=32, skip=["lm_head"])
    if method != "full":
        torch.manual_seed(init_seed)  # the adapters' init; at 200 steps LoRA and QLoRA still depend on it (70-100%)
        inject_lora(model, LORA_TARGETS, r=16, alpha=32)
    return model


def fit(model, lr, batches, steps=STEPS, loss_fn=None, seed=0):
    trainer = Trainer(model, TrainConfig(max_steps=steps, lr=lr, warmup_steps=10, weight_decay=0.0, seed=seed,
                                         progress=False), batches, loss_fn=loss_fn)
    start = time.process_time()
    trainer.fit()
    return time.process_time() - start


def perplexity(model, batches):
    nll, n = 0.0, 0
    with torch.no_grad():
        for b in batches:
            logits = model(b["input_ids"])[:, :-1]
            targets = b["labels"][:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            n += (targets != -100).sum().item()
    return math.exp(nll / n)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", choices=["methods", "forgetting", "distillation"])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    tiny = pretrained("tiny", progress=False)
    tok = digit_tokenizer(tiny.tokenizer)
    task = digit_string_task(**TASK)
    batches = TaskBatches(tok, task.train, batch_size=BATCH, seed=0)
    em = lambda m, split=task.test: evaluate_exact_match(m, tok, split, max_new_tokens=NEW_TOKENS)  # noqa: E731
    print(f"task: {task.name}, {len(task.train)} train / {len(task.test)} held-out problems; {STEPS} steps of {BATCH}")
    print(f"base: held-out exact match {em(tiny.model):.1%}")

    models = {}
    if args.only in (None, "methods", "forgetting", "distillation"):
        methods = ("full", "lora", "qlora") if args.only in (None, "methods") else ("full",)
        print(f"\n{'method':>6} | {'held-out EM':>11} | {'train EM (200)':>14} | {'CPU s':>6}")
        for method in methods:
            model = prepare(tiny.model, method)
            cpu = fit(model, LR[method], batches)
            models[method] = model
            print(f"{method:>6} | {em(model):11.1%} | {em(model, task.train[:200]):14.1%} | {cpu:6.1f}")

    if args.only in (None, "forgetting"):
        recipe = tiny.recipe
        corpus = stdlib_corpus(max_chars=recipe.corpus_chars)
        pretrain_docs, heldout_docs = corpus.split(recipe.val_fraction, seed=recipe.seed)
        stream = TokenBatches(encode_documents(tiny.tokenizer, heldout_docs.documents), batch_size=8, seq_len=128, random=False)
        heldout = [stream(i) for i in range(len(stream))]
        old = TokenBatches(encode_documents(tiny.tokenizer, pretrain_docs.documents), batch_size=8, seq_len=128, seed=1)
        base_ppl = perplexity(tiny.model, heldout)
        print(f"\nheld-out pretraining perplexity: base {base_ppl:.1f} (its own tokenizer)")
        # EWC: empirical Fisher (squared batch gradients) of 8 old batches at the pretrained weights
        base = tiny.model
        fisher = {n: torch.zeros_like(p) for n, p in base.named_parameters()}
        for i in range(8):
            base.zero_grad(set_to_none=True)
            causal_lm_loss(base(old(i)["input_ids"]), old(i)["labels"]).backward()
            for n, p in base.named_parameters():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / 8
        base.zero_grad(set_to_none=True)
        anchor = {n: p.detach().clone() for n, p in base.named_parameters()}
        replay_stream = TokenBatches(encode_documents(tiny.tokenizer, pretrain_docs.documents), batch_size=2, seq_len=128, seed=2)
        rows = {"full": models["full"]}
        for lam in (1e3, 1e4):
            def ewc(model, batch, lam=lam):
                params = dict(model.named_parameters())
                penalty = sum((fisher[n] * (params[n] - anchor[n]) ** 2).sum() for n in fisher)
                return causal_lm_loss(model(batch["input_ids"]), batch["labels"]) + lam / 2 * penalty
            model = copy.deepcopy(base)
            fit(model, LR["full"], batches, loss_fn=ewc)
            rows[f"EWC {lam:g}"] = model
        step = {"i": 0}

        def replay(model, batch):
            old_batch = replay_stream(step["i"])
            step["i"] += 1
            return (causal_lm_loss(model(batch["input_ids"]), batch["labels"])
                    + causal_lm_loss(model(old_batch["input_ids"]), old_batch["labels"]))
        model = copy.deepcopy(base)
        fit(model, LR["full"], batches, loss_fn=replay)
        rows["replay"] = model
        print(f"{'model':>10} | {'held-out EM':>11} | {'old-text ppl':>12}")
        for name, model in rows.items():
            print(f"{name:>10} | {em(model):11.1%} | {perplexity(model, heldout):12.1f}")

    if args.only in (None, "distillation"):
        teacher = models["full"].eval().requires_grad_(False)
        keep = [0, 3]

        def student():
            config = tiny.model.config.replace(num_hidden_layers=len(keep))
            s = type(tiny.model)(config)
            state = {}
            for k, v in tiny.model.state_dict().items():
                if k.startswith("layers."):
                    _, i, rest = k.split(".", 2)
                    if int(i) in keep:
                        state[f"layers.{keep.index(int(i))}.{rest}"] = v
                else:
                    state[k] = v
            s.load_state_dict(state)
            return s

        n_labeled, n_transfer, steps = 50, 2000, 150
        unlabeled = task.train[n_labeled:n_labeled + n_transfer]
        answers = greedy_complete(teacher, tok, [ex.prompt for ex in unlabeled], max_new_tokens=NEW_TOKENS)
        transfer = [Example(ex.prompt, a) for ex, a in zip(unlabeled, answers)]  # the teacher's own answers

        def kd(model, batch):
            with torch.no_grad():
                t = teacher(batch["input_ids"])[:, :-1] / 2.0
            s = model(batch["input_ids"])[:, :-1] / 2.0
            mask = batch["labels"][:, 1:] != -100
            return 4.0 * F.kl_div(F.log_softmax(s[mask], -1), F.log_softmax(t[mask], -1), log_target=True,
                                  reduction="batchmean")
        print(f"\ndistillation: half-depth student, {n_labeled} labelled problems vs the teacher's soft targets "
              f"on {n_transfer} unlabelled prompts, {steps} steps")
        print(f"{'seed':>4} | {'labels only':>11} | {'distilled':>9}")
        for seed in range(args.seeds):
            torch.manual_seed(seed)
            a = student()
            fit(a, 3e-3, TaskBatches(tok, task.train[:n_labeled], batch_size=BATCH, seed=seed), steps=steps, seed=seed)
            b = student()
            fit(b, 3e-3, TaskBatches(tok, transfer, batch_size=BATCH, seed=seed), steps=steps, loss_fn=kd, seed=seed)
            print(f"{seed:>4} | {em(a):11.1%} | {em(b):9.1%}")


if __name__ == "__main__":
    main()
