"""Fine-tuning tasks with an exact metric: synthetic arithmetic ("47+25=" -> "72") and rules on
digit strings ("reverse 2633 =" -> " 3362").

Why these tasks: the answer is either right or wrong (exact match, no judge needed) and a
code-pretrained tiny model starts near 0%. `digit_string_task` is the one a tiny model
*generalises* on within a few hundred steps on a CPU (assignments 08 and 09: 90% or more on
strings never trained on, measured by benchmarks/finetune_recipes.py); on the 100 one-digit sums
they used before, it memorised the training problems and got 5% of the held-out ones.

Every problem in a task's space (all a op b with n-digit operands, where for "-" a >= b so answers
are never negative; or all strings of n digits) is shuffled once under a seed, then the first
n_train go to train and the next n_test to test: the splits never share a problem.

Fine-tuning batches mask the prompt (labels -100), so the loss is on the answer tokens only,
and use the Hugging Face causal-LM label convention of `deepseek_mini.train`.

`instruction_task` is a family of four verifiable instructions on numbers (add, larger of two,
reverse the digits, count a digit), written in words, for chat fine-tuning (`chat.py`) and
RL with a rule-based reward (`grpo.py`); `reword` writes the same instruction in a second wording
("Add 47 and 85."), to test a model on phrasings it was not fine-tuned on. Numbers are read digit by digit: `digit_tokenizer`
keeps a BPE tokenizer's merges but splits every number into single digits (as DeepSeek LLM and
LLaMA do), so "385" is always the three tokens 3, 8, 5 instead of whatever merges the corpus
happened to learn ("12", "00", "64", ...): the same digit always looks the same to the model.
"""

import random
import re
from dataclasses import dataclass

import torch

from .tokenizer import GPT2_PATTERN, ByteBPETokenizer

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@dataclass(frozen=True)
class Example:
    prompt: str  # e.g. "47+25="
    answer: str  # e.g. "72\n" (the newline tells generation where to stop)

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass
class Task:
    name: str
    train: list[Example]
    test: list[Example]


def arithmetic_task(n_digits: int = 2, ops: str = "+-", n_train: int = 2000, n_test: int = 200,
                    seed: int = 0) -> Task:
    """Problems "a{op}b=" with answer "{result}\\n", operands in [0, 10**n_digits)."""
    if not isinstance(n_digits, int) or not 1 <= n_digits <= 4:
        raise ValueError(f"arithmetic_task: n_digits must be an int in [1, 4], got {n_digits!r}")
    if not ops or any(op not in OPS for op in ops) or len(set(ops)) != len(ops):
        raise ValueError(f"arithmetic_task: ops must be distinct characters from {''.join(OPS)!r}, got {ops!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"arithmetic_task: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    n = 10**n_digits
    space = [(a, op, b) for op in ops for a in range(n) for b in range(n) if op != "-" or a >= b]
    if n_train + n_test > len(space):
        raise ValueError(f"arithmetic_task: n_train + n_test = {n_train + n_test} exceeds the "
                         f"{len(space)} distinct problems with n_digits={n_digits}, ops={ops!r}")
    make = lambda p: Example(f"{p[0]}{p[1]}{p[2]}=", f"{OPS[p[1]](p[0], p[2])}\n")  # noqa: E731
    return _split(f"arithmetic {n_digits}-digit {ops} (seed {seed})", space, make, n_train, n_test, seed)


def _split(name: str, space: list, make, n_train: int, n_test: int, seed: int) -> Task:
    """Shuffle every problem of `space` once under `seed`: the first n_train train, the next
    n_test test, so the two splits never share a problem."""
    order = torch.randperm(len(space), generator=torch.Generator().manual_seed(seed)).tolist()
    return Task(name, [make(space[i]) for i in order[:n_train]],
                [make(space[i]) for i in order[n_train:n_train + n_test]])


DIGIT_OPS = {
    "reverse": lambda s: s[::-1],  # 2633 -> 3362
    "sort": lambda s: "".join(sorted(s)),  # 2633 -> 2336
    "rotate": lambda s: s[1:] + s[0],  # 2633 -> 6332 (first digit to the end)
}


def digit_string_task(op: str = "reverse", n_digits: int = 4, n_train: int = 4000, n_test: int = 200,
                      seed: int = 0) -> Task:
    """Problems "{op} {digits} =" with answer " {op(digits)}\\n", e.g. "reverse 2633 =" -> " 3362".

    A task a tiny model can *generalise* on, not only memorise: every answer digit is a copy of
    one prompt digit at a position fixed by the rule, which attention learns as a pattern over
    positions (read with `digit_tokenizer`, one token per digit). There are 10**n_digits strings
    (leading zeros included), so thousands of distinct problems; they are shuffled once under
    `seed`, the first n_train train and the next n_test are held out: never trained on."""
    if op not in DIGIT_OPS:
        raise ValueError(f"digit_string_task: op must be one of {list(DIGIT_OPS)}, got {op!r}")
    if not isinstance(n_digits, int) or not 2 <= n_digits <= 6:
        raise ValueError(f"digit_string_task: n_digits must be an int in [2, 6], got {n_digits!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"digit_string_task: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    if n_train + n_test > 10**n_digits:
        raise ValueError(f"digit_string_task: n_train + n_test = {n_train + n_test} exceeds the "
                         f"{10**n_digits} distinct strings of {n_digits} digits")
    space = [f"{i:0{n_digits}d}" for i in range(10**n_digits)]
    make = lambda s: Example(f"{op} {s} =", f" {DIGIT_OPS[op](s)}\n")  # noqa: E731
    return _split(f"{op} {n_digits}-digit strings (seed {seed})", space, make, n_train, n_test, seed)


# GPT-2's pattern with ` ?\p{N}+` (a number, with its leading space) replaced by `\p{N}` (one digit)
DIGIT_PATTERN = GPT2_PATTERN.replace(r" ?\p{N}+", r"\p{N}")
assert DIGIT_PATTERN != GPT2_PATTERN


def digit_tokenizer(tokenizer: ByteBPETokenizer) -> ByteBPETokenizer:
    """The same merges and special tokens, with every digit its own token (a merge such as "12"
    can never apply, since the pre-tokenizer never puts two digits in one word)."""
    if not isinstance(tokenizer, ByteBPETokenizer):
        raise TypeError(f"digit_tokenizer: expected a ByteBPETokenizer, got {type(tokenizer).__name__}")
    return type(tokenizer)(tokenizer.merges, special_tokens=tuple(tokenizer.special_tokens), pattern=DIGIT_PATTERN)


def _add(rng, n_digits):
    a, b = rng.randrange(10**n_digits), rng.randrange(10**n_digits)
    return f"What is {a} + {b}?", str(a + b)


def _larger(rng, n_digits):
    a, b = rng.sample(range(10**n_digits), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b))


def _reverse(rng, n_digits):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(3, n_digits + 3)))
    return f"Reverse the digits of {s}.", s[::-1]


def _count(rng, n_digits):
    s = "".join(rng.choice("0123456789") for _ in range(rng.randint(4, n_digits + 5)))
    d = rng.choice(s) if rng.random() < 0.8 else rng.choice("0123456789")  # sometimes absent: answer 0
    return f"How many {d}s are in {s}?", str(s.count(d))


INSTRUCTIONS = {"add": _add, "larger": _larger, "reverse": _reverse, "count": _count}


def instruction_task(kinds=tuple(INSTRUCTIONS), n_digits: int = 2, n_train: int = 4000, n_test: int = 200,
                     seed: int = 0) -> Task:
    """Instructions in words with one exact answer, e.g. "What is 47 + 85?" -> "132",
    "Which is larger, 47 or 85?" -> "85", "Reverse the digits of 4071." -> "1704",
    "How many 7s are in 37172?" -> "2". Answers carry no end marker: the chat template adds one.

    Kinds take turns (add, larger, reverse, count, add, ...), so every split has an equal share
    of each; instances are drawn under `seed` and a prompt never appears twice, so the test set
    holds problems never trained on. `n_digits` sizes the numbers (operands below 10**n_digits;
    strings of 3 to n_digits + 3 digits to reverse, 4 to n_digits + 5 to count in)."""
    kinds = tuple(kinds)
    if not kinds or any(k not in INSTRUCTIONS for k in kinds) or len(set(kinds)) != len(kinds):
        raise ValueError(f"instruction_task: kinds must be distinct names from {list(INSTRUCTIONS)}, got {kinds!r}")
    if not isinstance(n_digits, int) or not 1 <= n_digits <= 4:
        raise ValueError(f"instruction_task: n_digits must be an int in [1, 4], got {n_digits!r}")
    if n_train < 1 or n_test < 1:
        raise ValueError(f"instruction_task: n_train and n_test must be >= 1, got {n_train}, {n_test}")
    rng = random.Random(seed)
    wanted = n_train + n_test
    seen, examples = set(), []
    misses = 0
    while len(examples) < wanted:
        prompt, answer = INSTRUCTIONS[kinds[len(examples) % len(kinds)]](rng, n_digits)
        if prompt in seen:
            misses += 1
            if misses > 20 * wanted:  # the space of one kind is nearly used up
                raise ValueError(f"instruction_task: cannot draw {wanted} distinct problems of kinds {kinds} "
                                 f"with n_digits={n_digits}; ask for fewer or raise n_digits")
            continue
        seen.add(prompt)
        examples.append(Example(prompt, answer))
    # test first, so a larger n_train keeps the same test set
    return Task(f"instructions {'/'.join(kinds)} {n_digits}-digit (seed {seed})", examples[n_test:], examples[:n_test])


def kind_of(example: Example) -> str:
    """Which instruction an `instruction_task` example is, in either wording (its first word tells)."""
    return {"What": "add", "Which": "larger", "Reverse": "reverse", "How": "count",
            "Add": "add", "Of": "larger", "Write": "reverse", "Count": "count"}[example.prompt.split()[0]]


# A second wording of each instruction: the same request as users might phrase it, for measuring
# what a model trained on the first wording does with another (assignment 15).
REWORDINGS = {
    "add": (re.compile(r"What is (\d+) \+ (\d+)\?"), "Add {} and {}."),
    "larger": (re.compile(r"Which is larger, (\d+) or (\d+)\?"), "Of {} and {}, which is bigger?"),
    "reverse": (re.compile(r"Reverse the digits of (\d+)\."), "Write {} backwards."),
    "count": (re.compile(r"How many (\d)s are in (\d+)\?"), "Count the {}s in {}."),
}


def reword(example: Example) -> Example:
    """The same instruction and answer in the second wording: "What is 47 + 85?" -> "Add 47 and 85.",
    "Which is larger, 47 or 85?" -> "Of 47 and 85, which is bigger?", "Reverse the digits of 4071."
    -> "Write 4071 backwards.", "How many 7s are in 37172?" -> "Count the 7s in 37172."."""
    pattern, template = REWORDINGS[kind_of(example)]
    match = pattern.fullmatch(example.prompt)
    if match is None:
        raise ValueError(f"reword: not an instruction_task prompt in the first wording: {example.prompt!r}")
    return Example(template.format(*match.groups()), example.answer)


def exact_match(predictions, answers) -> float:
    """Fraction of predictions equal to their answer (surrounding whitespace ignored)."""
    predictions, answers = list(predictions), list(answers)
    if len(predictions) != len(answers):
        raise ValueError(f"exact_match: {len(predictions)} predictions for {len(answers)} answers")
    if not answers:
        raise ValueError("exact_match: no answers to compare with")
    return sum(p.strip() == a.strip() for p, a in zip(predictions, answers)) / len(answers)


def encode_example(tokenizer, example: Example) -> tuple[list[int], list[int]]:
    """(input ids, labels): prompt and answer encoded separately, so the prompt's tokens are
    exactly what generation will see; prompt positions are labelled -100."""
    p, a = tokenizer.encode(example.prompt), tokenizer.encode(example.answer)
    return p + a, [-100] * len(p) + a


class TaskBatches:
    """Fine-tuning batches of examples, addressed by index like `corpus.TokenBatches`.

    Batch i holds examples from a fresh permutation per epoch (seeded), right-padded with the
    end-of-text token (label -100, so padding never contributes to the loss).
    """

    def __init__(self, tokenizer, examples: list[Example], batch_size: int, seed: int = 0):
        if batch_size < 1 or batch_size > len(examples):
            raise ValueError(f"TaskBatches: batch_size must be in [1, {len(examples)}], got {batch_size}")
        self.encoded = [encode_example(tokenizer, ex) for ex in examples]
        self.pad_id = tokenizer.eot_id
        self.batch_size, self.seed = batch_size, seed
        self.per_epoch = len(examples) // batch_size

    def __call__(self, i: int) -> dict:
        epoch, j = divmod(i, self.per_epoch)
        order = torch.randperm(len(self.encoded), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        rows = [self.encoded[k] for k in order[j * self.batch_size:(j + 1) * self.batch_size].tolist()]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            labels[r, :len(lab)] = torch.tensor(lab)
        return {"input_ids": input_ids, "labels": labels}


@torch.no_grad()
def greedy_complete(model, tokenizer, prompts: list[str], max_new_tokens: int = 8, stop: str = "\n",
                    batch_size: int = 64) -> list[str]:
    """Greedy completions of each prompt, cut after `stop`. Works for any model that maps
    input_ids [batch, seq] to logits (or an output with .logits). Prompts of equal token length
    are batched together, so no padding or attention mask is needed."""
    if max_new_tokens < 1:
        raise ValueError(f"greedy_complete: max_new_tokens must be >= 1, got {max_new_tokens}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    encoded = [tokenizer.encode(p) for p in prompts]
    by_length: dict[int, list[int]] = {}
    for k, ids in enumerate(encoded):
        by_length.setdefault(len(ids), []).append(k)
    out = [""] * len(prompts)
    try:
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start:start + batch_size]
                ids = torch.tensor([encoded[k] for k in rows], device=device)
                new = []
                for _ in range(max_new_tokens):
                    logits = model(ids)
                    logits = getattr(logits, "logits", logits)
                    next_token = logits[:, -1].argmax(-1, keepdim=True)
                    new.append(next_token)
                    ids = torch.cat([ids, next_token], dim=1)
                    texts = [tokenizer.decode(t) for t in torch.cat(new, dim=1).tolist()]
                    if all(stop in t for t in texts):
                        break
                for k, text in zip(rows, texts):
                    out[k] = text.split(stop)[0] + stop if stop in text else text
    finally:
        model.train(was_training)
    return out


def evaluate_exact_match(model, tokenizer, examples: list[Example], max_new_tokens: int = 8,
                         stop: str = "\n") -> float:
    """Exact-match accuracy of greedy completions on `examples` (each cut after `stop`)."""
    predictions = greedy_complete(model, tokenizer, [ex.prompt for ex in examples], max_new_tokens, stop=stop)
    return exact_match(predictions, [ex.answer for ex in examples])
