"""Byte-level BPE: exact round trips, merges equal to Hugging Face `tokenizers`, save/load."""

import random
from collections import Counter

import pytest
import regex

from deepseek_mini.tokenizer import (ENDOFTEXT, GPT2_PATTERN, ByteBPETokenizer, bytes_to_unicode, to_hf_tokenizer,
                                     train_bpe, train_bpe_fast)

TEXTS = [
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n    def __init__(self, x, y):\n        self.x = x\n",
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!\n" * 3,
    "for i in range(10):\n    print(i, i * i)  # squares\n    total += i\n",
    "Ünïcödé tëxt: naïve café, 東京は晴れ, Привет мир, مرحبا 😀👍🏽👨‍👩‍👧 ok ok ok\n",
    "aaaa aaaa aaa aa a bbb bb b ab ab abab\n",
]
WEIRD = [
    "",
    "😀",
    "👨‍👩‍👧‍👦 family + 🏳️‍🌈 flag + skin 👋🏿",
    "e\u0301 (combining accent) vs \u00e9, \u200b zero-width, \ufeff BOM, \x00 NUL, \r\n CRLF\t tab",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 math, 𓀀 hieroglyph, \U0010FFFF last code point",
    "  leading and trailing spaces   ",
    ENDOFTEXT + " special text is plain text",
]


@pytest.fixture(scope="module")
def tok():
    return train_bpe(TEXTS, vocab_size=400)


def test_training_learns_merges_and_frequent_words_become_single_tokens(tok):
    assert 256 < tok.vocab_size <= 400
    assert len(tok.merges) == len(tok.vocab) - 256
    # "aaaa" occurs as a word twice with pairs (a,a) x3 each: the most frequent pair overall
    ids = tok.encode(" the")
    assert len(ids) == 1, "' the' is frequent enough to be one token"
    assert tok.encode("the") != list(b"the")
    # every merged token is the concatenation of its pair
    for (a, b), new in tok.merges.items():
        assert tok.vocab[new] == tok.vocab[a] + tok.vocab[b]


@pytest.mark.parametrize("text", TEXTS + WEIRD)
def test_round_trip_exact(tok, text):
    ids = tok.encode(text)
    assert all(isinstance(i, int) and 0 <= i < tok.vocab_size for i in ids)
    assert tok.decode(ids) == text
    assert len(ids) <= len(text.encode("utf-8"))


def test_round_trip_random_unicode_and_random_bytes(tok):
    rng = random.Random(0)
    for _ in range(50):
        # code points from every plane except the surrogates (not encodable as UTF-8)
        chars = [chr(rng.choice([rng.randrange(0x20, 0x80), rng.randrange(0x80, 0xD800),
                                 rng.randrange(0xE000, 0x110000)])) for _ in range(rng.randrange(1, 40))]
        text = "".join(chars)
        assert tok.decode(tok.encode(text)) == text
    for _ in range(50):
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 60)))
        assert tok.decode_bytes(tok.encode_bytes(data)) == data


def test_invalid_utf8_bytes_round_trip(tok):
    for data in [b"\xff\xfe", b"\xc3(", b"abc\x80def", b"\xed\xa0\x80", b"\xf0\x9f\x98", b"caf\xc3\xa9 \xe9"]:
        assert tok.decode_bytes(tok.encode_bytes(data)) == data
    # decoding a prefix that cuts an emoji in half does not raise; it shows U+FFFD
    ids = tok.encode_bytes("😀".encode()[:3])
    assert tok.decode(ids) == "\ufffd"


def test_bad_inputs_have_clear_errors(tok):
    with pytest.raises(TypeError, match="text must be str"):
        tok.encode(b"bytes")
    with pytest.raises(TypeError, match="data must be bytes"):
        tok.encode_bytes("str")
    with pytest.raises(ValueError, match="lone surrogate"):
        tok.encode("half an emoji \ud83d")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(ValueError, match="vocab_size must be an int >= 257"):
        train_bpe(TEXTS, vocab_size=100)
    with pytest.raises(TypeError, match="iterable of strings"):
        train_bpe("one string", vocab_size=300)


def test_special_token_id_and_decode(tok):
    assert tok.eot_id == tok.vocab_size - 1
    assert tok.decode(tok.encode("hi") + [tok.eot_id]) == "hi" + ENDOFTEXT


def _reference_merge_counts(texts):
    """Brute force: the pair counts of the pre-tokenized words, recounted from scratch."""
    words = Counter()
    for t in texts:
        words.update(regex.findall(GPT2_PATTERN, t))
    return {tuple(w.encode()): n for w, n in words.items()}


def test_each_merge_is_the_most_frequent_pair_by_brute_force_recount(tok):
    words = _reference_merge_counts(TEXTS)
    for (a, b), new in tok.merges.items():
        counts = Counter()
        for w, n in words.items():
            for pair in zip(w, w[1:]):
                counts[pair] += n
        assert counts[(a, b)] == max(counts.values()), f"merge {(a, b)} is not a most frequent pair"
        merged = {}
        for w, n in words.items():
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(new)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        words = merged


def test_fast_path_learns_the_same_merges_as_hugging_face_tokenizers(tok):
    fast = train_bpe_fast(TEXTS, vocab_size=400)
    assert list(fast.merges.items()) == list(tok.merges.items())
    assert fast.vocab == tok.vocab


def test_same_merges_on_a_small_real_corpus():
    from deepseek_mini.corpus import stdlib_corpus

    docs = stdlib_corpus(max_chars=60_000).documents
    slow = train_bpe(docs, vocab_size=600)
    fast = train_bpe_fast(docs, vocab_size=600)
    assert len(slow.merges) == 600 - 256 - 1
    assert list(slow.merges.items()) == list(fast.merges.items())
    # and encoding agrees with Hugging Face's BPE model loaded with our merges
    hf = to_hf_tokenizer(slow)
    for doc in docs[:5] + TEXTS:
        assert slow.encode(doc) == hf.encode(doc, add_special_tokens=False).ids


def test_save_load_round_trip(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    again = ByteBPETokenizer.load(path)
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens
    for text in TEXTS + WEIRD:
        assert again.encode(text) == tok.encode(text)
    assert again.token_strings()[:3] == tok.token_strings()[:3] and all(len(p) == 2 for p in tok.token_strings())
    with pytest.raises(ValueError, match="without gaps"):
        ByteBPETokenizer({(97, 98): 300})
    with pytest.raises(ValueError, match="no earlier merge created"):
        ByteBPETokenizer({(97, 400): 256})
    path.write_text('{"type": "other"}')
    with pytest.raises(ValueError, match="not a byte_bpe tokenizer"):
        ByteBPETokenizer.load(path)


def test_bytes_to_unicode_is_a_bijection_onto_printable_chars():
    m = bytes_to_unicode()
    assert len(set(m.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in m.values())
    assert m[ord("A")] == "A" and m[ord(" ")] == "Ġ"
