"""Text to train language models on, and the token batches a trainer eats.

Offline (the default) the corpus is the Python standard library's own source code: it is on
every machine that runs this course, it is real text written by people, and a model trained
on it learns to write Python-looking code. Online, any Hugging Face text dataset works
(`hf_corpus`); it is tested on local parquet/text files, which `datasets` reads offline.

Batches follow the Hugging Face causal-LM convention: `labels` is aligned with `input_ids`
(the loss shifts by one: position t predicts token t+1), and -100 marks positions to ignore.
"""

import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# Folders of the standard library that are not ordinary source: tests, vendored packages,
# huge generated tables and the documentation dump.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__",
              "encodings", "pydoc_data", "lib2to3", "ensurepip", "turtledemo"}


@dataclass
class TextCorpus:
    """Documents (one string each), their names, and where they came from."""

    documents: list[str]
    names: list[str]
    source: str

    def __post_init__(self):
        if len(self.documents) != len(self.names):
            raise ValueError(f"TextCorpus: {len(self.documents)} documents but {len(self.names)} names")

    def __len__(self):
        return len(self.documents)

    @property
    def n_chars(self) -> int:
        return sum(len(d) for d in self.documents)

    def fingerprint(self) -> str:
        """sha256 of the names and contents: two machines with the same corpus agree on it."""
        h = hashlib.sha256()
        for name, doc in zip(self.names, self.documents):
            h.update(name.encode("utf-8", "surrogatepass") + b"\0" + doc.encode("utf-8", "surrogatepass") + b"\0")
        return h.hexdigest()

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> tuple["TextCorpus", "TextCorpus"]:
        """(train, val) by whole documents, so no text is in both. Deterministic under seed."""
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        n = len(self.documents)
        n_val = max(1, round(n * val_fraction))
        if n < 2 or n_val >= n:
            raise ValueError(f"split: {n} documents cannot give both a train and a val part (val_fraction={val_fraction})")
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
        part = lambda idx, tag: TextCorpus([self.documents[i] for i in idx], [self.names[i] for i in idx],  # noqa: E731
                                           f"{self.source} [{tag}]")
        return part(train_idx, "train"), part(val_idx, "val")


def stdlib_corpus(max_chars: int = 2_000_000, max_file_chars: int = 100_000, root=None) -> TextCorpus:
    """Python source files of the standard library, up to `max_chars` characters in all.

    The selection is deterministic: every *.py file outside tests/vendored folders and under
    `max_file_chars`, ordered by a hash of its relative path (a fixed shuffle, so a small
    budget still samples many modules), taken whole until the budget is spent.
    """
    if max_chars <= 0:
        raise ValueError(f"max_chars must be positive, got {max_chars}")
    root = Path(root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"stdlib_corpus: no standard library folder at {root}")
    candidates = []
    for folder, subdirs, files in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in _SKIP_DIRS]  # prune: never walk into them
        for f in files:
            if f.endswith(".py") and not f.startswith(("test_", "_sysconfigdata")):  # the latter is machine-made
                candidates.append((Path(folder) / f).relative_to(root).as_posix())
    candidates.sort(key=lambda rel: hashlib.sha256(rel.encode()).hexdigest())

    documents, names, total = [], [], 0
    for rel in candidates:
        try:
            text = (root / rel).read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few platforms ship unreadable or non-UTF-8 files; skip them
        if not text.strip() or len(text) > max_file_chars:
            continue
        if total + len(text) > max_chars:
            continue  # whole files only: look for a smaller one that still fits
        documents.append(text)
        names.append(rel)
        total += len(text)
        if max_chars - total < 1000:
            break
    if not documents:
        raise RuntimeError(f"stdlib_corpus: no usable .py file under {root} fits max_chars={max_chars}")
    version = ".".join(map(str, sys.version_info[:3]))
    return TextCorpus(documents, names, f"python-stdlib {version} at {root} ({len(documents)} files, {total:,} chars)")


def hf_corpus(path: str, name: str | None = None, *, split: str = "train", text_column: str = "text",
              data_files=None, max_documents: int | None = None, max_chars: int | None = None,
              streaming: bool = False) -> TextCorpus:
    """Documents from a Hugging Face dataset (`datasets.load_dataset(path, name, ...)`).

    Works with hub names online (e.g. "roneneldan/TinyStories") and with local files offline
    (path="parquet"/"text"/"json" plus data_files=...). Empty rows are skipped.
    """
    import datasets

    ds = datasets.load_dataset(path, name, split=split, data_files=data_files, streaming=streaming)
    columns = ds.column_names if ds.column_names is not None else list(next(iter(ds)).keys())
    if text_column not in columns:
        raise KeyError(f"hf_corpus: dataset {path!r} has no column {text_column!r}; its columns are {columns}")
    documents, names, total = [], [], 0
    for i, row in enumerate(ds):
        text = row[text_column]
        if not isinstance(text, str):
            raise TypeError(f"hf_corpus: column {text_column!r} must hold strings, row {i} has {type(text).__name__}")
        if not text.strip():
            continue
        documents.append(text)
        names.append(f"{split}[{i}]")
        total += len(text)
        if (max_documents and len(documents) >= max_documents) or (max_chars and total >= max_chars):
            break
    if not documents:
        raise ValueError(f"hf_corpus: dataset {path!r} split {split!r} has no non-empty text")
    where = path if data_files is None else f"{path} files {data_files}"
    return TextCorpus(documents, names, f"huggingface {where}{'/' + name if name else ''} [{split}] "
                                        f"({len(documents)} documents, {total:,} chars)")


def load_corpus(source: str = "stdlib", **kwargs) -> TextCorpus:
    """source="stdlib" (offline default) or "hf" (kwargs go to `hf_corpus`)."""
    if source == "stdlib":
        return stdlib_corpus(**kwargs)
    if source == "hf":
        return hf_corpus(**kwargs)
    raise ValueError(f"load_corpus: source must be 'stdlib' or 'hf', got {source!r}")


def encode_documents(tokenizer, documents, eot_id: int | None = None) -> torch.Tensor:
    """All documents as one int64 token stream, each followed by the end-of-text token."""
    eot = tokenizer.eot_id if eot_id is None else eot_id
    from .tokenizer import GPT2_PATTERN, ByteBPETokenizer, to_hf_tokenizer

    fast = None
    if isinstance(tokenizer, ByteBPETokenizer) and tokenizer.pattern == GPT2_PATTERN:
        fast = to_hf_tokenizer(tokenizer)  # same ids as tokenizer.encode, ~50x faster
    ids = []
    if fast is not None:
        for enc in fast.encode_batch(list(documents), add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
    else:
        for doc in documents:
            ids.extend(tokenizer.encode(doc))
            ids.append(eot)
    return torch.tensor(ids, dtype=torch.long)


class TokenBatches:
    """Batches of `seq_len`-token windows from a 1-D token stream, addressed by index.

    `batches(i)` is a pure function of (seed, i), so a trainer resuming at step i gets exactly
    the batches it would have seen. random=True samples window starts uniformly (training);
    random=False walks consecutive non-overlapping windows (evaluation over the whole stream).
    """

    def __init__(self, tokens: torch.Tensor, batch_size: int, seq_len: int, *, seed: int = 0, random: bool = True):
        if not isinstance(tokens, torch.Tensor) or tokens.dim() != 1 or tokens.dtype != torch.long:
            raise ValueError("TokenBatches: tokens must be a 1-D int64 tensor, got "
                             f"{getattr(tokens, 'shape', type(tokens).__name__)} {getattr(tokens, 'dtype', '')}")
        if batch_size < 1 or seq_len < 2:
            raise ValueError(f"TokenBatches: need batch_size >= 1 and seq_len >= 2, got {batch_size}, {seq_len}")
        if tokens.numel() < seq_len:
            raise ValueError(f"TokenBatches: {tokens.numel()} tokens are fewer than one window of seq_len={seq_len}")
        if not 0 <= seed < 2**31:
            raise ValueError(f"TokenBatches: seed must be in [0, 2**31), got {seed}")
        self.tokens, self.batch_size, self.seq_len, self.seed, self.random = tokens, batch_size, seq_len, seed, random

    def __len__(self):
        """Number of distinct batches of consecutive windows (what random=False walks through)."""
        return (self.tokens.numel() // self.seq_len) // self.batch_size

    def __call__(self, i: int) -> dict:
        B, T = self.batch_size, self.seq_len
        if self.random:
            g = torch.Generator().manual_seed((self.seed << 32) + i)
            starts = torch.randint(0, self.tokens.numel() - T + 1, (B,), generator=g)
        else:
            if len(self) == 0:
                raise ValueError(f"TokenBatches: {self.tokens.numel()} tokens give no full batch of {B}x{T}")
            starts = (torch.arange(B) + (i % len(self)) * B) * T
        x = torch.stack([self.tokens[s : s + T] for s in starts.tolist()])
        return {"input_ids": x, "labels": x.clone()}
