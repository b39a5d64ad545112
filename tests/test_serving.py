"""The batching HTTP endpoint of assignment 14 (deepseek_mini.serving), on 127.0.0.1 only.

Every request gets a status and a JSON error message, whatever the client sends: bodies that are
not JSON objects, text that is not valid Unicode, too much of it, too little of what it announced,
prompts longer than the model's context. A handful of requests per test, each with a timeout.
"""

import http.client
import json
import select
import time
from urllib.parse import urlparse

import pytest
import torch

from deepseek_mini.model import DeepseekConfig, DeepseekModel
from deepseek_mini.serving import BatchingServer, RequestError, parse_request, post
from deepseek_mini.tokenizer import train_bpe

CONTEXT = 32
MAX_BODY = 4096
READ_TIMEOUT = 1.0


def one_per_batch(lengths, max_batch):
    return [[i] for i in range(len(lengths))]


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(["def serve(request):\n    return request.body\n" * 8], vocab_size=280)


@pytest.fixture(scope="module")
def model(tokenizer):
    config = DeepseekConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
                            num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16, kv_lora_rank=16,
                            qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, n_routed_experts=4,
                            num_experts_per_tok=2, n_group=2, topk_group=1, max_position_embeddings=CONTEXT)
    return DeepseekModel(config).eval()


@pytest.fixture(scope="module")
def server(model, tokenizer):
    server = BatchingServer(model, tokenizer, one_per_batch, max_batch=4, max_new_tokens=8,
                            max_body_bytes=MAX_BODY, read_timeout_s=READ_TIMEOUT)
    yield server
    server.close()


def send(url, body: bytes, headers=None, timeout=10.0):
    """POST raw bytes with exactly the given headers; (status, JSON answer)."""
    parts = urlparse(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.putrequest("POST", parts.path)
        for name, value in ({"Content-Length": str(len(body))} if headers is None else headers).items():
            conn.putheader(name, value)
        conn.endheaders()
        conn.send(body)
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_good_request_is_answered(server, model, tokenizer):
    status, answer = post(server.url, {"prompt": "def serve(", "max_new_tokens": 5}, timeout=30)
    assert status == 200, answer
    ids = tokenizer.encode("def serve(")
    with torch.no_grad():
        want = tokenizer.decode(model.generate(torch.tensor([ids]), max_new_tokens=5)[0, len(ids):].tolist())
    assert answer == {"text": want, "batch_size": 1}, "the server must answer with the greedy continuation"


@pytest.mark.parametrize("body, words", [
    (b"[1, 2]", "JSON object"),
    (b"null", "JSON object"),
    (b'"def serve("', "JSON object"),
    (b"7", "JSON object"),
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[" * 2000 + b"]" * 2000, "not valid JSON"),  # deeper than Python's recursion limit
    (b'{"prompt": "\\ud800 lone surrogate"}', "not valid text"),
    (b'{"prompt": ""}', "non-empty string"),
    (b'{"prompt": ["def"]}', "non-empty string"),
    (b'{"prompt": "def", "max_new_tokens": true}', "max_new_tokens"),
    (b'{"prompt": "def", "max_new_tokens": 9}', "max_new_tokens"),
    (b'{"prompt": "def", "max_new_tokens": -1}', "max_new_tokens"),
    (b'{"prompt": "def", "max_new_tokens": 2.5}', "max_new_tokens"),
])
def test_a_bad_body_gets_400_with_a_message(server, body, words):
    status, answer = send(server.url, body)
    assert status == 400 and words in answer["error"], (status, answer)


def test_a_prompt_longer_than_the_context_gets_400(server, tokenizer):
    prompt = "return request.body " * 20
    assert len(tokenizer.encode(prompt)) > CONTEXT
    status, answer = post(server.url, {"prompt": prompt, "max_new_tokens": 1}, timeout=30)
    assert status == 400 and f"holds {CONTEXT} tokens" in answer["error"], answer
    fits = next(n for n in range(40, 0, -1) if len(tokenizer.encode("a" * n)) <= CONTEXT - 8)
    room = CONTEXT - len(tokenizer.encode("a" * fits))  # prompt + new tokens must fit, not the prompt alone
    assert post(server.url, {"prompt": "a" * fits, "max_new_tokens": min(room, 8)}, timeout=30)[0] == 200
    if room < 8:
        assert post(server.url, {"prompt": "a" * fits, "max_new_tokens": room + 1}, timeout=30)[0] == 400


def test_a_large_body_is_refused_before_it_is_read(server):
    # 50 MB announced, none of it sent: the answer comes at once, nothing is read or parsed.
    status, answer = send(server.url, b"", {"Content-Length": str(50 * 2 ** 20)})
    assert status == 413 and str(MAX_BODY) in answer["error"], answer
    status, answer = send(server.url, b"x" * 10, {"Content-Length": "ten"})
    assert status == 400 and "Content-Length" in answer["error"], answer
    status, answer = send(server.url, b"", {})
    assert status == 411, answer


def test_a_body_shorter_than_announced_frees_its_thread(server):
    start = time.monotonic()
    status, answer = send(server.url, b'{"prompt"', {"Content-Length": "1000"}, timeout=10 * READ_TIMEOUT + 10)
    assert status == 408 and "1000 bytes" in answer["error"], answer
    assert time.monotonic() - start < 10 * READ_TIMEOUT + 5, "the server held the connection past its read timeout"


def test_a_body_sent_a_byte_at_a_time_cannot_hold_a_thread(server):
    """The read timeout covers the whole body: a valid body trickled in at one byte per half
    timeout (each byte in time, the whole far too slow) is cut off with a 408."""
    body = b'{"prompt": "def"}'
    parts = urlparse(server.url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10 * READ_TIMEOUT + 10)
    try:
        conn.putrequest("POST", parts.path)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders()
        start = time.monotonic()
        for byte in body:
            conn.send(bytes([byte]))
            if select.select([conn.sock], [], [], READ_TIMEOUT / 2)[0]:  # the server answered: stop sending
                break
        response = conn.getresponse()
        assert response.status == 408, (response.status, response.read())
        assert time.monotonic() - start < len(body) * READ_TIMEOUT / 2 - 1, "the server waited for the whole trickle"
    finally:
        conn.close()


def test_other_paths_get_404(server):
    status, answer = send(server.url.replace("/generate", "/admin"), b"{}")
    assert status == 404 and "/generate" in answer["error"]


def test_still_serving_after_bad_requests(server):
    for body in (b"null", b"[]", b'{"prompt": "\\udfff"}'):
        assert send(server.url, body)[0] == 400
    assert post(server.url, {"prompt": "def serve(", "max_new_tokens": 2}, timeout=30)[0] == 200


def _raises(lengths, max_batch):
    if lengths != [1]:  # the server's start-up check passes, real requests fail
        raise RuntimeError("broken rule")
    return [[0]]


def _forgets(lengths, max_batch):
    return [[0]] if lengths == [1] else []


def _bad_index(lengths, max_batch):
    return [[0]] if lengths == [1] else [[len(lengths) + 5]]


@pytest.mark.parametrize("rule, words", [(_raises, "batching rule failed: RuntimeError"),
                                         (_forgets, "left this request out"),
                                         (_bad_index, "batching rule failed: IndexError")])
def test_a_broken_batching_rule_answers_500_instead_of_hanging(model, tokenizer, rule, words):
    assert len(tokenizer.encode("def serve(")) > 1
    server = BatchingServer(model, tokenizer, rule, max_batch=4)
    try:
        status, answer = post(server.url, {"prompt": "def serve(", "max_new_tokens": 1}, timeout=30)
        assert status == 500 and words in answer["error"], answer
    finally:
        server.close()


def test_parse_request_without_a_server(tokenizer):
    assert parse_request(b'{"prompt": "def"}', tokenizer, 16, CONTEXT) == (tokenizer.encode("def"), 16)
    with pytest.raises(RequestError, match="JSON object") as err:
        parse_request(b"[]", tokenizer, 16, CONTEXT)
    assert err.value.status == 400
