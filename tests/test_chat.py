"""DeepSeek chat template, chat tokenizer, assistant-only SFT labels, generation that stops at EOS."""

import pytest
import torch

from deepseek_mini.chat import (ASSISTANT, BOS, EOS, USER, ChatTokenizer, add_token_embeddings, chat_complete,
                                chat_example, chat_examples, chat_tokenizer, encode_chat, evaluate_chat, render)
from deepseek_mini.tasks import Example, TaskBatches, instruction_task
from deepseek_mini.tokenizer import ByteBPETokenizer, train_bpe_fast

CHAT = [{"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "What is 47 + 85?"},
        {"role": "assistant", "content": "132"},
        {"role": "user", "content": "Reverse the digits of 4071."},
        {"role": "assistant", "content": "1704"}]


@pytest.fixture(scope="module")
def base_tok():
    task = instruction_task(n_train=400, n_test=10)
    # the repeated numbers make the BPE learn digit merges ("100", "47", ...) for the chat tokenizer to undo
    return train_bpe_fast([ex.prompt + " " + ex.answer for ex in task.train] * 3 + ["100 47 85 4071"] * 50, vocab_size=320)


@pytest.fixture(scope="module")
def tok(base_tok):
    return chat_tokenizer(base_tok)


def test_template_is_deepseek_v3s_exactly():
    assert (BOS, USER, ASSISTANT, EOS) == ("<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cUser\uff5c>",
                                          "<\uff5cAssistant\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>")
    assert render(CHAT) == ("<｜begin▁of▁sentence｜>Answer briefly.<｜User｜>What is 47 + 85?<｜Assistant｜>132"
                            "<｜end▁of▁sentence｜><｜User｜>Reverse the digits of 4071.<｜Assistant｜>1704<｜end▁of▁sentence｜>")
    assert render(CHAT[1:2], add_generation_prompt=True) == "<｜begin▁of▁sentence｜><｜User｜>What is 47 + 85?<｜Assistant｜>"
    ex = chat_example(Example("What is 47 + 85?", "132"))
    assert ex.prompt == render(CHAT[1:2], add_generation_prompt=True) and ex.answer == "132" + EOS


def test_template_rejects_bad_messages():
    with pytest.raises(ValueError, match=r"messages\[1\] must be a dict with role"):
        render([CHAT[1], {"role": "bot", "content": "hi"}])
    with pytest.raises(ValueError, match="system message may only come first"):
        render(CHAT[1:2] + CHAT[:1])
    with pytest.raises(ValueError, match="must not contain chat special tokens"):
        render([{"role": "user", "content": "hi" + EOS}])


def test_chat_tokenizer_reads_special_tokens_and_single_digits(base_tok, tok):
    assert tok.vocab_size == base_tok.vocab_size + 4
    ids = [tok.token_id(t) for t in (BOS, USER, ASSISTANT, EOS)]
    assert ids == list(range(base_tok.vocab_size, base_tok.vocab_size + 4)), "new ids at the end, old ones kept"
    text = render(CHAT)
    encoded = tok.encode(text)
    assert encoded.count(tok.token_id(EOS)) == 2 and encoded[0] == tok.token_id(BOS)
    assert tok.decode(encoded) == text
    # numbers become one token per digit, whatever merges the corpus learned
    assert any(len(base_tok.encode(n)) < len(n) for n in ("100", "47", "85", "4071")), "fixture should merge digits"
    for number in ("100", "47", "85", "4071", "1234567890"):
        assert tok.encode(number) == [ord(c) for c in number]
        assert tok.encode(" " + number) == tok.encode(" ") + [ord(c) for c in number]
    # text without digits or chat tokens encodes as before
    assert tok.encode("Reverse the digits of") == base_tok.encode("Reverse the digits of")
    # saved and loaded, it is the same tokenizer
    assert ChatTokenizer(tok.merges, special_tokens=tuple(tok.special_tokens), pattern=tok.pattern).encode(text) == encoded
    with pytest.raises(ValueError, match="must include the chat tokens"):
        ChatTokenizer(tok.merges, special_tokens=("<|endoftext|>",))


def test_chat_tokenizer_round_trip(tok, tmp_path):
    for text in [render(CHAT), "plain text 123", "<｜User｜" + "｜>", "é ü 🙂 " + USER + USER + "x", ""]:
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "tok.json")
    again = ChatTokenizer.load(tmp_path / "tok.json")
    assert again.encode(render(CHAT)) == tok.encode(render(CHAT)) and again.vocab_size == tok.vocab_size


def test_sft_labels_are_the_assistant_replies_exactly(tok):
    ids, labels = encode_chat(tok, CHAT)
    assert ids == tok.encode(render(CHAT))
    eos = tok.token_id(EOS)
    # what must be learned, token by token: each reply and its EOS, nothing else
    learned = [i for i, lab in zip(ids, labels) if lab != -100]
    assert learned == tok.encode("132") + [eos] + tok.encode("1704") + [eos]
    assert all(lab in (-100, i) for i, lab in zip(ids, labels))
    # the learned stretches sit right after each <｜Assistant｜> marker
    starts = [k + 1 for k, i in enumerate(ids) if i == tok.token_id(ASSISTANT)]
    for start, reply in zip(starts, ("132", "1704")):
        n = len(tok.encode(reply)) + 1
        assert labels[start - 1] == -100 and labels[start:start + n] == ids[start:start + n]
    assert sum(lab != -100 for lab in labels) == len(learned)
    with pytest.raises(ValueError, match="no assistant message"):
        encode_chat(tok, CHAT[:2])
    with pytest.raises(TypeError, match="needs a ChatTokenizer"):
        encode_chat(ByteBPETokenizer({}), CHAT)


def test_chat_examples_in_task_batches_mask_all_but_the_reply(tok):
    examples = chat_examples(instruction_task(n_train=16, n_test=4).train)
    batch = TaskBatches(tok, examples, batch_size=16)(0)
    eos = tok.token_id(EOS)
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
        learned = [i for i, lab in zip(ids, labels) if lab != -100]
        assert learned[-1] == eos and learned.count(eos) == 1
        text = tok.decode(ids)
        reply = text.split(ASSISTANT)[1].split(EOS)[0]
        assert tok.decode(learned) == reply + EOS


def test_add_token_embeddings_keeps_old_behaviour():
    from deepseek_mini.model import DeepseekConfig, DeepseekModel

    torch.manual_seed(0)
    model = DeepseekModel(DeepseekConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, n_routed_experts=None,
                                         intermediate_size=48))
    x = torch.randint(0, 300, (2, 7))
    before = model(x)
    old_embed = model.embed_tokens.weight.detach().clone()
    add_token_embeddings(model, 304)
    after = model(x)
    assert after.shape == (2, 7, 304) and model.config.vocab_size == 304
    torch.testing.assert_close(after[..., :300], before)
    assert torch.equal(model.embed_tokens.weight[:300], old_embed)
    torch.testing.assert_close(model.embed_tokens.weight[300:], old_embed.mean(0).expand(4, -1))
    assert model(torch.tensor([[303, 1]])).shape == (1, 2, 304), "new ids are accepted"
    assert model.lm_head.weight.requires_grad and model.embed_tokens.weight.requires_grad
    with pytest.raises(ValueError, match="smaller than the model's 304"):
        add_token_embeddings(model, 200)


class ScriptedModel(torch.nn.Module):
    """Writes a fixed script, one token per call after the prompt (a real module for
    greedy_complete; the script decides exactly what a correct stop looks like)."""

    def __init__(self, vocab, prompt_len, script):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))
        self.vocab, self.prompt_len, self.script = vocab, prompt_len, script

    def forward(self, input_ids):
        logits = torch.zeros(*input_ids.shape, self.vocab)
        k = input_ids.shape[1] - self.prompt_len
        logits[:, -1, self.script[min(k, len(self.script) - 1)]] = 1.0
        return logits


def test_chat_complete_stops_at_end_of_sentence(tok):
    question = "What is 3 + 4?"
    prompt_len = len(tok.encode(chat_example(Example(question, "")).prompt))
    eos = tok.token_id(EOS)
    script = tok.encode("7") + [eos] + tok.encode("junk after the end")
    model = ScriptedModel(tok.vocab_size, prompt_len, script)
    assert chat_complete(model, tok, [question]) == ["7"]
    assert evaluate_chat(model, tok, [Example(question, "7")]) == 1.0
    assert evaluate_chat(model, tok, [Example(question, "8")]) == 0.0
    # no EOS within the budget: the reply is whatever was written, and it does not count as right
    rambling = ScriptedModel(tok.vocab_size, prompt_len, tok.encode("7777777777"))
    assert chat_complete(rambling, tok, [question], max_new_tokens=3) == ["777"]
    assert evaluate_chat(rambling, tok, [Example(question, "777")], max_new_tokens=3) == 0.0


def test_sft_teaches_a_small_model_to_answer_in_the_template(base_tok):
    """End to end: chat tokenizer, grown embeddings, TaskBatches on chat examples, Trainer."""
    from deepseek_mini.model import DeepseekConfig, DeepseekModel
    from deepseek_mini.train import TrainConfig, Trainer

    tok = chat_tokenizer(base_tok)
    task = instruction_task(kinds=("larger",), n_digits=1, n_train=24, n_test=4, seed=0)
    torch.manual_seed(0)
    model = DeepseekModel(DeepseekConfig(vocab_size=base_tok.vocab_size, hidden_size=48, num_hidden_layers=1,
                                         n_routed_experts=None, intermediate_size=64))
    add_token_embeddings(model, tok.vocab_size)
    assert evaluate_chat(model, tok, task.train, max_new_tokens=3) == 0.0
    config = TrainConfig(max_steps=60, lr=1e-2, warmup_steps=5, progress=False)
    Trainer(model, config, TaskBatches(tok, chat_examples(task.train), batch_size=24)).fit()
    assert evaluate_chat(model, tok, task.train, max_new_tokens=3) >= 0.9
