"""DeepSeek's chat template, and supervised fine-tuning (SFT) on it.

A chat is a list of messages {"role": "system" | "user" | "assistant", "content": str}.
DeepSeek-V3 (and R1) write it as one string with four special tokens and no extra newlines:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{reply}<｜end▁of▁sentence｜><｜User｜>...

A prompt for generation ends with "<｜Assistant｜>"; the model then writes its reply and
ends it with "<｜end▁of▁sentence｜>", which is where generation stops. (The bars are the
fullwidth "｜" U+FF5C and the spaces the block "▁" U+2581, as in DeepSeek's tokenizer.)

SFT trains on the assistant's tokens only: every other position is labelled -100 (the
Hugging Face causal-LM convention that `train.causal_lm_loss` and `DeepseekModel` use), so
the model learns to answer, not to predict the user's questions.

    tok = chat_tokenizer(tiny.tokenizer)         # + the 4 special tokens, digits split
    add_token_embeddings(model, tok.vocab_size)  # rows for the new ids
    batches = TaskBatches(tok, chat_examples(task.train), batch_size=32)
    Trainer(model, config, batches).fit()
    chat_complete(model, tok, ["What is 47 + 85?"])  # -> ["132"]
"""

import regex
import torch
from torch import nn

from .tasks import Example, digit_tokenizer, evaluate_exact_match, greedy_complete
from .tokenizer import ByteBPETokenizer

BOS = "<｜begin▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
EOS = "<｜end▁of▁sentence｜>"
CHAT_TOKENS = (BOS, USER, ASSISTANT, EOS)


class ChatTokenizer(ByteBPETokenizer):
    """A byte-level BPE tokenizer that reads its special tokens inside text: `encode` turns
    "<｜User｜>" into that token's one id (like a Hugging Face tokenizer's added tokens), where
    the plain `ByteBPETokenizer` would spell it out byte by byte. Everything else is unchanged,
    so `decode(encode(text)) == text` still holds."""

    def __init__(self, merges, special_tokens=(), pattern=None):
        missing = [t for t in CHAT_TOKENS if t not in special_tokens]
        if missing:
            raise ValueError(f"ChatTokenizer: special_tokens must include the chat tokens, missing {missing}")
        super().__init__(merges, special_tokens=special_tokens, **({"pattern": pattern} if pattern else {}))
        # longest first, so a special token that contains another one wins
        names = sorted(self.special_tokens, key=len, reverse=True)
        self._specials = regex.compile("(" + "|".join(regex.escape(t) for t in names) + ")")

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__}")
        ids = []
        for k, piece in enumerate(self._specials.split(text)):
            if k % 2:  # split() puts the matched special tokens at odd positions
                ids.append(self.special_tokens[piece])
            elif piece:
                ids.extend(super().encode(piece))
        return ids

    def token_id(self, token: str) -> int:
        return self.special_tokens[token]


def chat_tokenizer(tokenizer: ByteBPETokenizer, split_digits: bool = True) -> ChatTokenizer:
    """`tokenizer`'s merges and special tokens plus the four chat tokens (new ids at the end,
    so every id the model already knows keeps its meaning). split_digits=True reads numbers
    digit by digit (`tasks.digit_tokenizer`)."""
    if not isinstance(tokenizer, ByteBPETokenizer):
        raise TypeError(f"chat_tokenizer: expected a ByteBPETokenizer, got {type(tokenizer).__name__}")
    if split_digits:
        tokenizer = digit_tokenizer(tokenizer)
    specials = tuple(tokenizer.special_tokens) + tuple(t for t in CHAT_TOKENS if t not in tokenizer.special_tokens)
    return ChatTokenizer(tokenizer.merges, special_tokens=specials, pattern=tokenizer.pattern)


@torch.no_grad()
def add_token_embeddings(model: nn.Module, vocab_size: int) -> nn.Module:
    """Grow a DeepseekModel's input embedding and LM head to `vocab_size` rows, in place.

    New rows start at the mean of the existing ones (a common choice: the new tokens start
    out as an "average" token instead of random noise, so the model's outputs barely move).
    Existing rows are kept exactly. Returns the model."""
    old = model.embed_tokens.weight.shape[0]
    if vocab_size < old:
        raise ValueError(f"add_token_embeddings: vocab_size {vocab_size} is smaller than the model's {old}")
    if vocab_size == old:
        return model
    tied = model.lm_head.weight is model.embed_tokens.weight

    def grown(weight):
        extra = weight.mean(dim=0, keepdim=True).expand(vocab_size - old, -1)
        return nn.Parameter(torch.cat([weight, extra]), requires_grad=weight.requires_grad)

    model.embed_tokens.weight = grown(model.embed_tokens.weight)
    model.embed_tokens.num_embeddings = vocab_size
    model.lm_head.weight = model.embed_tokens.weight if tied else grown(model.lm_head.weight)
    model.lm_head.out_features = vocab_size
    model.config = model.config.replace(vocab_size=vocab_size)
    return model


def render(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The chat as DeepSeek-V3's template writes it (see the module docstring). A system
    message may only come first; add_generation_prompt=True ends with "<｜Assistant｜>"."""
    text = BOS
    for k, m in enumerate(messages):
        role, content = _check_message(m, k)
        if role == "system":
            if k != 0:
                raise ValueError(f"render: a system message may only come first, found one at index {k}")
            text += content
        elif role == "user":
            text += USER + content
        else:
            text += ASSISTANT + content + EOS
    if add_generation_prompt:
        text += ASSISTANT
    return text


def _check_message(m, k):
    if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") or not isinstance(m.get("content"), str):
        raise ValueError(f"messages[{k}] must be a dict with role 'system', 'user' or 'assistant' and a str content, got {m!r}")
    if any(t in m["content"] for t in CHAT_TOKENS):
        raise ValueError(f"messages[{k}]: content must not contain chat special tokens, got {m['content']!r}")
    return m["role"], m["content"]


def encode_chat(tokenizer: ChatTokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """(input ids, labels) of a whole chat for SFT: labels equal the ids on each assistant
    reply and its "<｜end▁of▁sentence｜>" (what the model must learn to write), -100 on
    everything else (BOS, system, user turns and the "<｜Assistant｜>" marker itself).
    Built turn by turn, so the ids are exactly those of `tokenizer.encode(render(messages))`."""
    if not isinstance(tokenizer, ChatTokenizer):
        raise TypeError("encode_chat: needs a ChatTokenizer (see chat_tokenizer), "
                        f"got {type(tokenizer).__name__}")
    if not any(m.get("role") == "assistant" for m in messages if isinstance(m, dict)):
        raise ValueError("encode_chat: no assistant message, so nothing would be learned")
    ids, labels = [], []

    def add(text, learn):
        new = tokenizer.encode(text)
        ids.extend(new)
        labels.extend(new if learn else [-100] * len(new))

    add(BOS, False)
    for k, m in enumerate(messages):
        role, content = _check_message(m, k)
        if role == "system":
            if k != 0:
                raise ValueError(f"encode_chat: a system message may only come first, found one at index {k}")
            add(content, False)
        elif role == "user":
            add(USER + content, False)
        else:
            add(ASSISTANT, False)
            add(content + EOS, True)
    return ids, labels


def chat_example(example: Example, system: str | None = None) -> Example:
    """A prompt/answer example in the chat template: the prompt becomes the user turn up to
    "<｜Assistant｜>", the answer the reply plus "<｜end▁of▁sentence｜>". `tasks.TaskBatches`
    then masks everything but the reply, and `tasks.greedy_complete` can stop at EOS."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": example.prompt}]
    return Example(render(messages, add_generation_prompt=True), example.answer + EOS)


def chat_examples(examples: list[Example], system: str | None = None) -> list[Example]:
    return [chat_example(ex, system) for ex in examples]


def chat_complete(model, tokenizer: ChatTokenizer, questions: list[str], max_new_tokens: int = 12,
                  system: str | None = None) -> list[str]:
    """Greedy answers to user questions, each cut at the model's "<｜end▁of▁sentence｜>"
    (which is not part of the returned text)."""
    prompts = [chat_example(Example(q, ""), system).prompt for q in questions]
    replies = greedy_complete(model, tokenizer, prompts, max_new_tokens=max_new_tokens, stop=EOS)
    return [r.split(EOS)[0] for r in replies]


def evaluate_chat(model, tokenizer: ChatTokenizer, examples: list[Example], max_new_tokens: int = 12) -> float:
    """Exact match of `chat_complete` answers against plain (not yet templated) examples; a
    reply that never ends with EOS within max_new_tokens counts as wrong."""
    return evaluate_exact_match(model, tokenizer, chat_examples(examples), max_new_tokens, stop=EOS)
