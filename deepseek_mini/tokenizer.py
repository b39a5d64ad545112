"""Byte-level BPE, written from scratch for teaching (the GPT-2 / DeepSeek tokenizer family).

Text -> UTF-8 bytes -> tokens. The 256 single bytes are always tokens, so every string (emoji,
any script, even byte sequences that are not valid UTF-8) encodes and decodes back exactly.

Training (`train_bpe`):
  1. split the text into "words" with the GPT-2 regex (letters, numbers, punctuation and
     whitespace runs stay apart, so merges never cross a word boundary);
  2. count every adjacent pair of tokens inside the words (weighted by how often a word occurs);
  3. merge the most frequent pair into a new token, update the counts of the words that
     contained it, and repeat until the vocabulary is full.
Ties are broken like Hugging Face `tokenizers` (the pair of smaller token ids wins, with the
256 bytes ordered by their GPT-2 "printable" character), so `train_bpe_fast`, which runs the
same algorithm in Rust through `tokenizers`, learns the very same merges, only faster.

Encoding applies the learned merges inside each word, lowest-ranked (earliest learned) first.
"""

import heapq
import json
from collections import Counter, defaultdict
from pathlib import Path

import regex

# GPT-2's pre-tokenizer pattern, the one `tokenizers.pre_tokenizers.ByteLevel` uses.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
ENDOFTEXT = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character (Hugging Face stores byte-level
    vocabularies as such strings). Printable Latin-1 bytes map to themselves, the rest to
    characters from U+0100 up."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


_BYTE_CHAR = bytes_to_unicode()
_CHAR_BYTE = {c: b for b, c in _BYTE_CHAR.items()}
# Tie-break rank of each single byte: its position in Hugging Face's initial alphabet, which
# is sorted by the printable character. Merged tokens rank by their id (creation order).
_BYTE_RANK = {b: i for i, b in enumerate(sorted(range(256), key=lambda b: ord(_BYTE_CHAR[b])))}


class ByteBPETokenizer:
    """A trained byte-level BPE tokenizer.

    ids 0..255 are the raw bytes, then one id per merged token (in the order they were learned),
    then the special tokens (e.g. "<|endoftext|>", used to separate documents).
    `merges` maps a pair of ids to the id it merges into, in learning order.
    """

    def __init__(self, merges: dict[tuple[int, int], int], special_tokens=(ENDOFTEXT,), pattern: str = GPT2_PATTERN):
        self.pattern = pattern
        self._split = regex.compile(pattern)
        self.merges = dict(merges)
        self.vocab: dict[int, bytes] = {i: bytes([i]) for i in range(256)}
        for (a, b), new in self.merges.items():
            if a not in self.vocab or b not in self.vocab:
                raise ValueError(f"merges: pair ({a}, {b}) uses an id that no earlier merge created")
            merged = self.vocab[a] + self.vocab[b]
            if self.vocab.setdefault(new, merged) != merged:
                raise ValueError(f"merges: id {new} is given two different byte strings")
        if max(self.vocab) != len(self.vocab) - 1:
            raise ValueError(f"merges: token ids must run 0..{len(self.vocab) - 1} without gaps, the largest is {max(self.vocab)}")
        self._rank = {pair: r for r, pair in enumerate(self.merges)}
        first_special = len(self.vocab)
        self.special_tokens = {tok: first_special + i for i, tok in enumerate(special_tokens)}
        self._cache: dict[bytes, list[int]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        """Id of "<|endoftext|>", which separates documents."""
        if ENDOFTEXT not in self.special_tokens:
            raise KeyError(f"this tokenizer has no {ENDOFTEXT} token")
        return self.special_tokens[ENDOFTEXT]

    # --- encoding -----------------------------------------------------------------------
    def _encode_word(self, word: bytes) -> list[int]:
        cached = self._cache.get(word)
        if cached is not None:
            return cached
        ids = list(word)
        # Merge the earliest-learned pair present (leftmost on ties), one occurrence at a time:
        # the same order Hugging Face's BPE model uses.
        while len(ids) > 1:
            best, best_rank = -1, None
            for i in range(len(ids) - 1):
                r = self._rank.get((ids[i], ids[i + 1]))
                if r is not None and (best_rank is None or r < best_rank):
                    best, best_rank = i, r
            if best < 0:
                break
            ids[best : best + 2] = [self.merges[(ids[best], ids[best + 1])]]
        if len(self._cache) < 100_000:
            self._cache[word] = ids
        return ids

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of arbitrary bytes (valid UTF-8 or not)."""
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"encode_bytes: data must be bytes, got {type(data).__name__}")
        # Invalid UTF-8 bytes become lone surrogates so the regex can run; each piece turns
        # back into exactly its original bytes.
        text = bytes(data).decode("utf-8", errors="surrogateescape")
        ids = []
        for piece in self._split.findall(text):
            ids.extend(self._encode_word(piece.encode("utf-8", errors="surrogateescape")))
        return ids

    def encode(self, text: str) -> list[int]:
        """Token ids of a string. Special-token text such as "<|endoftext|>" is encoded as
        ordinary text; append `eot_id` yourself to separate documents."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be str, got {type(text).__name__} (use encode_bytes for bytes)")
        try:
            data = text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate such as "\ud83d" has no UTF-8 form
            raise ValueError(f"encode: text has {text[e.start]!r} at index {e.start}, a lone surrogate that is "
                             "not valid Unicode text; fix the string or pass bytes to encode_bytes") from None
        return self.encode_bytes(data)

    # --- decoding -----------------------------------------------------------------------
    def decode_bytes(self, ids) -> bytes:
        """The exact bytes behind a list of ids (special tokens give their own text)."""
        specials = {i: tok.encode("utf-8") for tok, i in self.special_tokens.items()}
        out = []
        for i in ids:
            i = int(i)
            if i in self.vocab:
                out.append(self.vocab[i])
            elif i in specials:
                out.append(specials[i])
            else:
                raise ValueError(f"decode: token id {i} is outside the vocabulary [0, {self.vocab_size})")
        return b"".join(out)

    def decode(self, ids) -> str:
        """Text of a list of ids. A cut through a multi-byte character (possible when
        decoding a prefix) shows as U+FFFD instead of failing."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    # --- save / load ------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "type": "byte_bpe",
            "pattern": self.pattern,
            "merges": [[a, b, new] for (a, b), new in self.merges.items()],
            "special_tokens": list(self.special_tokens),
        }

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path) -> "ByteBPETokenizer":
        d = json.loads(Path(path).read_text())
        if d.get("type") != "byte_bpe":
            raise ValueError(f"{path} is not a byte_bpe tokenizer file (type={d.get('type')!r})")
        merges = {(a, b): new for a, b, new in d["merges"]}
        return cls(merges, special_tokens=d["special_tokens"], pattern=d["pattern"])

    def token_strings(self) -> list[tuple[str, str]]:
        """Each merge as a readable pair, e.g. ('Ġ', 'the') (GPT-2 printable characters)."""
        show = lambda i: "".join(_BYTE_CHAR[b] for b in self.vocab[i])  # noqa: E731
        return [(show(a), show(b)) for a, b in self.merges]

    def __repr__(self):
        return f"ByteBPETokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special={list(self.special_tokens)})"


def _check_training_args(texts, vocab_size, special_tokens):
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings (e.g. a list of documents), not one str")
    smallest = 256 + len(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise ValueError(f"vocab_size must be an int >= {smallest} (256 bytes + {len(special_tokens)} special), got {vocab_size!r}")


def train_bpe(texts, vocab_size: int, special_tokens=(ENDOFTEXT,), min_frequency: int = 2,
              pattern: str = GPT2_PATTERN, verbose: bool = False) -> ByteBPETokenizer:
    """Learn byte-level BPE merges from an iterable of documents, in pure Python.

    vocab_size counts everything: 256 bytes + merged tokens + special tokens. Training stops
    early when no pair occurs at least `min_frequency` times.
    """
    special_tokens = tuple(special_tokens)
    _check_training_args(texts, vocab_size, special_tokens)
    split = regex.compile(pattern)
    word_counts = Counter()
    for text in texts:
        word_counts.update(split.findall(text))
    words = [list(w.encode("utf-8")) for w in word_counts]
    counts = list(word_counts.values())

    pair_counts = Counter()
    where = defaultdict(set)  # pair -> indices of the words that contain it
    for w, (ids, n) in enumerate(zip(words, counts)):
        for pair in zip(ids, ids[1:]):
            pair_counts[pair] += n
            where[pair].add(w)

    rank = lambda i: _BYTE_RANK[i] if i < 256 else i  # noqa: E731 (tie-break order, see top)
    heap = [(-c, rank(a), rank(b), a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    vocab = {i: bytes([i]) for i in range(256)}
    id_of = {v: k for k, v in vocab.items()}
    merges = {}
    n_tokens = vocab_size - len(special_tokens)
    while len(vocab) < n_tokens and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if -neg != count:  # stale heap entry; the current count was pushed when it changed
            continue
        if count < max(min_frequency, 1):
            break
        merged = vocab[a] + vocab[b]
        new = id_of.get(merged)  # two merge paths can build the same bytes: reuse the token
        if new is None:
            new = len(vocab)
            vocab[new], id_of[merged] = merged, new
        merges[(a, b)] = new
        if verbose:
            print(f"merge {len(merges)}: {vocab[a]!r} + {vocab[b]!r} ({count}x)")

        changed = set()
        for w in where.pop((a, b)):
            ids, n = words[w], counts[w]
            for pair in zip(ids, ids[1:]):
                pair_counts[pair] -= n
                changed.add(pair)
            out, i = [], 0
            while i < len(ids):  # left to right, non-overlapping (so "aaa" -> "aa" "a")
                if i + 1 < len(ids) and ids[i] == a and ids[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(ids[i])
                    i += 1
            words[w] = out
            for pair in zip(out, out[1:]):
                pair_counts[pair] += n
                where[pair].add(w)
                changed.add(pair)
        for pair in changed:
            c = pair_counts[pair]
            if c > 0:
                heapq.heappush(heap, (-c, rank(pair[0]), rank(pair[1]), *pair))
            else:
                del pair_counts[pair]
                where.pop(pair, None)
    return ByteBPETokenizer(merges, special_tokens=special_tokens, pattern=pattern)


def train_bpe_fast(texts, vocab_size: int, special_tokens=(ENDOFTEXT,), min_frequency: int = 2) -> ByteBPETokenizer:
    """Same training as `train_bpe` (GPT-2 pattern), run by Hugging Face `tokenizers` in Rust.
    Returns our tokenizer class, so encode/decode/save behave the same either way."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    special_tokens = tuple(special_tokens)
    _check_training_args(texts, vocab_size, special_tokens)
    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(special_tokens),  # ours go after the merges
        min_frequency=min_frequency,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    hf.train_from_iterator(texts, trainer)
    return from_hf_merges(json.loads(hf.to_str())["model"]["merges"], special_tokens)


def from_hf_merges(hf_merges, special_tokens=(ENDOFTEXT,)) -> ByteBPETokenizer:
    """Our tokenizer from Hugging Face byte-level merges (pairs of GPT-2 printable strings)."""
    id_of = {bytes([i]): i for i in range(256)}
    merges = {}
    for pair in hf_merges:
        left, right = pair.split(" ") if isinstance(pair, str) else pair
        a = id_of[bytes(_CHAR_BYTE[c] for c in left)]
        b = id_of[bytes(_CHAR_BYTE[c] for c in right)]
        merged = bytes(_CHAR_BYTE[c] for c in left + right)
        merges[(a, b)] = id_of.setdefault(merged, len(id_of))
    return ByteBPETokenizer(merges, special_tokens=special_tokens)


def to_hf_tokenizer(tok: ByteBPETokenizer):
    """A Hugging Face `tokenizers.Tokenizer` with our merges (fast encoding of large corpora;
    it gives the same ids as `tok.encode` for ordinary text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    if tok.pattern != GPT2_PATTERN:
        raise ValueError("to_hf_tokenizer: only the GPT-2 pattern maps onto tokenizers' ByteLevel pre-tokenizer")
    show = lambda i: "".join(_BYTE_CHAR[b] for b in tok.vocab[i])  # noqa: E731
    vocab = {show(i): i for i in tok.vocab}
    merges = [(show(a), show(b)) for a, b in tok.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(list(tok.special_tokens))
    return hf
