"""Arithmetic fine-tuning task: disjoint deterministic splits, exact match, masked batches."""

import pytest
import torch

from deepseek_mini.tasks import (TaskBatches, arithmetic_task, encode_example, evaluate_exact_match,
                                 exact_match, greedy_complete)
from deepseek_mini.tokenizer import train_bpe_fast


@pytest.fixture(scope="module")
def task():
    return arithmetic_task(n_digits=2, ops="+-", n_train=500, n_test=100, seed=0)


@pytest.fixture(scope="module")
def tok(task):
    return train_bpe_fast([ex.text for ex in task.train], vocab_size=300)


def test_splits_do_not_overlap_and_are_deterministic(task):
    train, test = {ex.prompt for ex in task.train}, {ex.prompt for ex in task.test}
    assert len(train) == 500 and len(test) == 100, "no duplicates inside a split"
    assert not train & test
    again = arithmetic_task(n_digits=2, ops="+-", n_train=500, n_test=100, seed=0)
    assert again.train == task.train and again.test == task.test
    other = arithmetic_task(n_digits=2, ops="+-", n_train=500, n_test=100, seed=1)
    assert other.test != task.test
    # a larger train split keeps the same test-disjointness and the same leading order
    bigger = arithmetic_task(n_digits=2, ops="+-", n_train=600, n_test=100, seed=0)
    assert bigger.train[:500] == task.train and not {e.prompt for e in bigger.train} & {e.prompt for e in bigger.test}


def test_answers_are_correct(task):
    for ex in task.train + task.test:
        a, op, b = ex.prompt[:-1].partition("+") if "+" in ex.prompt else ex.prompt[:-1].partition("-")
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert ex.prompt.endswith("=") and ex.answer == f"{expected}\n"
        assert expected >= 0
    assert {ex.prompt[1:-1].strip("0123456789")[:1] for ex in task.train} >= {"+", "-"}


def test_bad_task_arguments():
    with pytest.raises(ValueError, match="n_digits must be an int in"):
        arithmetic_task(n_digits=0)
    with pytest.raises(ValueError, match="ops must be distinct characters"):
        arithmetic_task(ops="+/")
    with pytest.raises(ValueError, match="exceeds the 100 distinct problems"):
        arithmetic_task(n_digits=1, ops="+", n_train=90, n_test=20)


def test_exact_match():
    assert exact_match(["72\n", "5", "13"], ["72\n", "5\n", "12\n"]) == pytest.approx(2 / 3)
    assert exact_match(["72"], ["72\n"]) == 1.0
    assert exact_match(["721"], ["72\n"]) == 0.0
    with pytest.raises(ValueError, match="2 predictions for 1 answers"):
        exact_match(["1", "2"], ["1"])


def test_encoded_examples_mask_the_prompt(task, tok):
    ex = task.train[0]
    ids, labels = encode_example(tok, ex)
    n_prompt = len(tok.encode(ex.prompt))
    assert labels[:n_prompt] == [-100] * n_prompt and labels[n_prompt:] == ids[n_prompt:]
    assert tok.decode(ids) == ex.text
    assert tok.decode(ids[n_prompt:]) == ex.answer


def test_task_batches_pad_with_ignored_labels_and_cover_each_epoch(task, tok):
    examples = task.train[:40]
    batches = TaskBatches(tok, examples, batch_size=8, seed=0)
    seen = []
    for i in range(5):  # one epoch
        b = batches(i)
        x, y = b["input_ids"], b["labels"]
        assert x.shape == y.shape and x.shape[0] == 8
        pad = x == tok.eot_id
        assert torch.all(y[pad] == -100), "padding must not be learned"
        for row in x.tolist():
            seen.append(tok.decode([t for t in row if t != tok.eot_id]))
    assert sorted(seen) == sorted(ex.text for ex in examples)
    assert torch.equal(batches(7)["input_ids"], TaskBatches(tok, examples, 8, seed=0)(7)["input_ids"])
    assert not torch.equal(batches(5)["input_ids"], batches(0)["input_ids"]), "new order each epoch"
    with pytest.raises(ValueError, match="batch_size must be in"):
        TaskBatches(tok, examples, batch_size=41)


class LookupModel(torch.nn.Module):
    """A real (if tiny) model: logits from the last two tokens through a learned bigram-pair
    table. Enough to check that greedy completion feeds its own outputs back correctly."""

    def __init__(self, vocab):
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(vocab, vocab, vocab))

    def forward(self, input_ids):
        prev = torch.cat([input_ids[:, :1], input_ids[:, :-1]], dim=1)
        return self.table[prev, input_ids]


def test_greedy_complete_matches_step_by_step_argmax(task, tok):
    torch.manual_seed(0)
    model = LookupModel(tok.vocab_size)
    prompts = [ex.prompt for ex in task.test[:10]]
    out = greedy_complete(model, tok, prompts, max_new_tokens=4, stop="\n")
    for prompt, completion in zip(prompts, out):
        ids = tok.encode(prompt)
        for _ in range(4):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        expected = tok.decode(ids[len(tok.encode(prompt)):])
        expected = expected.split("\n")[0] + "\n" if "\n" in expected else expected
        assert completion == expected
    with pytest.raises(ValueError, match="max_new_tokens must be >= 1"):
        greedy_complete(model, tok, prompts, max_new_tokens=0)


def test_fine_tuning_a_deepseek_model_learns_the_answers():
    """End to end with the real pieces: tokenizer, task batches, Trainer, DeepseekModel, metric."""
    from deepseek_mini.model import DeepseekConfig, DeepseekModel
    from deepseek_mini.train import TrainConfig, Trainer

    task = arithmetic_task(n_digits=1, ops="+", n_train=16, n_test=16, seed=0)
    tok = train_bpe_fast([ex.text for ex in task.train + task.test], vocab_size=280)
    torch.manual_seed(0)
    model = DeepseekModel(DeepseekConfig(vocab_size=tok.vocab_size, hidden_size=48, num_hidden_layers=1,
                                         n_routed_experts=None, intermediate_size=64))
    assert evaluate_exact_match(model, tok, task.train, max_new_tokens=3) == 0.0
    # greedy_complete agrees with the model's own (KV-cache) greedy generation
    prompt = torch.tensor([tok.encode(task.train[0].prompt)])
    ours = greedy_complete(model, tok, [task.train[0].prompt], max_new_tokens=3, stop="\x00")[0]
    assert ours == tok.decode(model.generate(prompt, 3)[0, prompt.shape[1]:].tolist())

    config = TrainConfig(max_steps=80, lr=1e-2, warmup_steps=5, progress=False)
    Trainer(model, config, TaskBatches(tok, task.train, batch_size=16)).fit()
    assert evaluate_exact_match(model, tok, task.train, max_new_tokens=3) >= 0.9


# --- instruction_task: four verifiable instructions, held-out instances --------------------------

def _solve(prompt: str) -> str:
    """An independent solver for the four instruction kinds, from the prompt's words."""
    import re

    numbers = re.findall(r"\d+", prompt)
    if prompt.startswith("What is"):
        return str(int(numbers[0]) + int(numbers[1]))
    if prompt.startswith("Which is larger"):
        return str(max(int(numbers[0]), int(numbers[1])))
    if prompt.startswith("Reverse the digits of"):
        return numbers[0][::-1]
    digit, text = re.fullmatch(r"How many (\d)s are in (\d+)\?", prompt).groups()
    return str(text.count(digit))


def test_instruction_task_answers_splits_and_balance():
    from deepseek_mini.tasks import INSTRUCTIONS, instruction_task, kind_of

    task = instruction_task(n_train=800, n_test=200, seed=0)
    assert len(task.train) == 800 and len(task.test) == 200
    prompts = [ex.prompt for ex in task.train + task.test]
    assert len(set(prompts)) == 1000, "no problem twice, so the test set is never trained on"
    for ex in task.train + task.test:
        assert ex.answer == _solve(ex.prompt), ex
    for split in (task.train, task.test):
        counts = {k: sum(kind_of(ex) == k for ex in split) for k in INSTRUCTIONS}
        assert counts == {k: len(split) // 4 for k in INSTRUCTIONS}
    counts_answers = [ex.answer for ex in task.train if kind_of(ex) == "count"]
    assert "0" in counts_answers and len(set(counts_answers)) >= 3, "count answers vary, 0 included"
    assert any(len(ex.answer) == 3 for ex in task.train if kind_of(ex) == "add"), "carries into a third digit"
    # deterministic; another seed, other problems; a larger train split keeps the test split
    assert instruction_task(n_train=800, n_test=200, seed=0) == task
    assert instruction_task(n_train=800, n_test=200, seed=1).test != task.test
    bigger = instruction_task(n_train=1000, n_test=200, seed=0)
    assert bigger.test == task.test and bigger.train[:800] == task.train
    only = instruction_task(kinds=("reverse",), n_train=10, n_test=5)
    assert {kind_of(ex) for ex in only.train + only.test} == {"reverse"}


def test_instruction_task_bad_arguments():
    from deepseek_mini.tasks import instruction_task

    with pytest.raises(ValueError, match="kinds must be distinct names"):
        instruction_task(kinds=("add", "divide"))
    with pytest.raises(ValueError, match="n_digits must be an int in"):
        instruction_task(n_digits=5)
    with pytest.raises(ValueError, match="cannot draw 300 distinct problems"):
        instruction_task(kinds=("larger",), n_digits=1, n_train=250, n_test=50)  # only 90 exist


def test_digit_tokenizer_splits_every_number_into_digits(task):
    from deepseek_mini.tasks import digit_tokenizer

    # repeated numbers, so BPE learns digit merges for digit_tokenizer to undo
    tok = train_bpe_fast([ex.text for ex in task.train] + ["47 25 72 = 999"] * 50, vocab_size=300)
    digits = digit_tokenizer(tok)
    assert digits.vocab_size == tok.vocab_size and digits.merges == tok.merges
    assert any(len(tok.encode(n)) < len(n) for n in ("47", "25", "72")), "the fixture merges some digits"
    for text in ("47+25=", "72\n", "x = 1234567890", " 9 99 999"):
        ids = digits.encode(text)
        assert digits.decode(ids) == text
        assert [i for i in ids if chr(i).isdigit()] == [ord(c) for c in text if c.isdigit()]
        assert all(not any(c.isdigit() for c in digits.decode([i])) or i < 256 for i in ids)
    assert digits.encode("no digits here") == tok.encode("no digits here")
    with pytest.raises(TypeError, match="expected a ByteBPETokenizer"):
        digit_tokenizer("gpt2")


# --- digit_string_task: rules on digit strings, held-out strings never trained on ----------------

def test_digit_string_task_answers_and_disjoint_splits():
    from deepseek_mini.tasks import digit_string_task

    task = digit_string_task("reverse", n_digits=4, n_train=4000, n_test=200, seed=0)
    assert len(task.train) == 4000 and len(task.test) == 200
    prompts = [ex.prompt for ex in task.train + task.test]
    assert len(set(prompts)) == 4200, "no string twice: the held-out problems are never trained on"
    for ex in task.train + task.test:
        digits = ex.prompt.removeprefix("reverse ").removesuffix(" =")
        assert len(digits) == 4 and digits.isdigit(), ex
        assert ex.answer == f" {digits[::-1]}\n", ex
    assert any(ex.prompt.startswith("reverse 0") for ex in task.train), "leading zeros are strings too"
    for op, rule in (("sort", lambda s: "".join(sorted(s))), ("rotate", lambda s: s[1:] + s[0])):
        other = digit_string_task(op, n_digits=3, n_train=50, n_test=10, seed=1)
        for ex in other.train + other.test:
            digits = ex.prompt.removeprefix(f"{op} ").removesuffix(" =")
            assert ex.answer == f" {rule(digits)}\n", ex
    # deterministic; another seed, another split; a larger train split keeps the leading order
    assert digit_string_task(n_train=4000, n_test=200, seed=0) == task
    assert digit_string_task(n_train=4000, n_test=200, seed=1).test != task.test
    bigger = digit_string_task(n_train=4500, n_test=200, seed=0)
    assert bigger.train[:4000] == task.train and not {e.prompt for e in bigger.train} & {e.prompt for e in bigger.test}
    # all of the space can be used, and not one problem more
    every = digit_string_task(n_digits=2, n_train=90, n_test=10)
    assert len({ex.prompt for ex in every.train + every.test}) == 100


def test_digit_string_task_bad_arguments():
    from deepseek_mini.tasks import digit_string_task

    with pytest.raises(ValueError, match="op must be one of"):
        digit_string_task("shuffle")
    with pytest.raises(ValueError, match=r"n_digits must be an int in \[2, 6\]"):
        digit_string_task(n_digits=7)
    with pytest.raises(ValueError, match="exceeds the 100 distinct strings of 2 digits"):
        digit_string_task(n_digits=2, n_train=95, n_test=10)
    with pytest.raises(ValueError, match="n_train and n_test must be >= 1"):
        digit_string_task(n_test=0)


def test_digit_string_prompts_read_one_token_per_digit():
    from deepseek_mini.tasks import digit_string_task, digit_tokenizer

    # a BPE that learned merges of these very digits, so digit_tokenizer has something to undo
    bpe = train_bpe_fast(["reverse 1234 = 4321\n"] * 20 + ["0 1 2 3 4 5 6 7 8 9"], vocab_size=290)
    assert len(bpe.encode(" 4321")) < 5
    digits = digit_tokenizer(bpe)
    for ex in digit_string_task(n_train=20, n_test=5).train:
        ids, labels = encode_example(digits, ex)
        n_prompt = len(digits.encode(ex.prompt))
        answer_pieces = [digits.decode([i]) for i in ids[n_prompt:]]
        assert [p for p in answer_pieces if p.isdigit()] == list(ex.answer.strip()), answer_pieces
        assert digits.decode(ids) == ex.text and labels.count(-100) == n_prompt


def test_reword_keeps_the_instruction_and_answer():
    from deepseek_mini.tasks import Example, instruction_task, kind_of, reword

    task = instruction_task(n_train=40, n_test=8, seed=3)
    for ex in task.train + task.test:
        new = reword(ex)
        assert new.answer == ex.answer and new.prompt != ex.prompt and kind_of(new) == kind_of(ex)
        numbers = lambda text: [w.strip("?.,") for w in text.split() if w.strip("?.,").isdigit()]  # noqa: E731
        assert numbers(new.prompt) == numbers(ex.prompt) or kind_of(ex) == "count", (ex, new)
    assert reword(Example("What is 47 + 85?", "132")).prompt == "Add 47 and 85."
    assert reword(Example("Which is larger, 47 or 85?", "85")).prompt == "Of 47 and 85, which is bigger?"
    assert reword(Example("Reverse the digits of 0401.", "1040")).prompt == "Write 0401 backwards."
    assert reword(Example("How many 7s are in 37172?", "2")).prompt == "Count the 7s in 37172."
    with pytest.raises(ValueError, match="first wording"):
        reword(Example("What is 4 + ?", "4"))
