"""Text corpus: deterministic stdlib selection, Hugging Face datasets offline, splits, batches."""

import pytest
import torch

from deepseek_mini.corpus import TextCorpus, TokenBatches, encode_documents, hf_corpus, load_corpus, stdlib_corpus
from deepseek_mini.tokenizer import train_bpe_fast


def test_stdlib_corpus_is_deterministic_and_says_its_source():
    a = stdlib_corpus(max_chars=200_000)
    b = stdlib_corpus(max_chars=200_000)
    assert a.names == b.names and a.fingerprint() == b.fingerprint()
    assert "python-stdlib" in a.source and f"{len(a)} files" in a.source
    assert 150_000 < a.n_chars <= 200_000
    assert all(n.endswith(".py") for n in a.names)
    assert not any("test" in n.split("/")[:-1] or n.split("/")[-1].startswith("test_") for n in a.names)
    assert any("def " in d for d in a.documents)
    # a bigger budget starts with the same files (one fixed order), then adds more
    bigger = stdlib_corpus(max_chars=400_000)
    assert bigger.names[0] == a.names[0] and bigger.n_chars > a.n_chars


def test_stdlib_corpus_bad_budget():
    with pytest.raises(ValueError, match="max_chars must be positive"):
        stdlib_corpus(max_chars=0)
    with pytest.raises(RuntimeError, match="fits max_chars=10"):
        stdlib_corpus(max_chars=10)


def test_split_is_disjoint_deterministic_and_complete():
    c = TextCorpus([f"doc {i}" for i in range(20)], [f"n{i}" for i in range(20)], "test")
    train, val = c.split(val_fraction=0.2, seed=3)
    assert len(val) == 4 and len(train) == 16
    assert not set(train.names) & set(val.names)
    assert sorted(train.names + val.names) == sorted(c.names)
    assert c.split(0.2, seed=3)[1].names == val.names
    assert c.split(0.2, seed=4)[1].names != val.names
    with pytest.raises(ValueError, match="val_fraction"):
        c.split(1.5)
    with pytest.raises(ValueError, match="cannot give both"):
        TextCorpus(["one"], ["n"], "t").split(0.1)


def test_hf_corpus_reads_local_parquet_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rows = {"text": ["first story.", "", "second story, longer.", "third."], "id": [0, 1, 2, 3]}
    path = tmp_path / "stories.parquet"
    datasets.Dataset.from_dict(rows).to_parquet(str(path))
    c = hf_corpus("parquet", data_files=str(path))
    assert c.documents == ["first story.", "second story, longer.", "third."]
    assert "huggingface parquet" in c.source and "3 documents" in c.source
    assert hf_corpus("parquet", data_files=str(path), max_documents=2).documents == c.documents[:2]
    with pytest.raises(KeyError, match="no column 'body'"):
        hf_corpus("parquet", data_files=str(path), text_column="body")
    # a plain text file, one document per line, through load_corpus
    txt = tmp_path / "lines.txt"
    txt.write_text("alpha beta\ngamma\n")
    c2 = load_corpus("hf", path="text", data_files=str(txt))
    assert c2.documents == ["alpha beta", "gamma"]
    with pytest.raises(ValueError, match="source must be"):
        load_corpus("web")


def test_encode_documents_separates_documents_with_eot():
    docs = ["x = 1\n", "y = 2\n", "print(x + y)\n"] * 5
    tok = train_bpe_fast(docs, vocab_size=300)
    ids = encode_documents(tok, docs)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert (ids == tok.eot_id).sum() == len(docs)
    # fast (Rust) encoding agrees with the pure-Python encoder
    expected = [i for d in docs for i in tok.encode(d) + [tok.eot_id]]
    assert ids.tolist() == expected


def test_token_batches_are_pure_functions_of_index():
    tokens = torch.arange(1000)
    batches = TokenBatches(tokens, batch_size=4, seq_len=16, seed=7)
    b3 = batches(3)
    assert b3["input_ids"].shape == (4, 16) and torch.equal(b3["labels"], b3["input_ids"])
    assert torch.equal(batches(3)["input_ids"], b3["input_ids"])
    assert not torch.equal(batches(4)["input_ids"], b3["input_ids"])
    # windows are contiguous slices of the stream
    assert torch.all(b3["input_ids"][:, 1:] - b3["input_ids"][:, :-1] == 1)
    seq = TokenBatches(tokens, batch_size=4, seq_len=16, random=False)
    assert len(seq) == 1000 // 16 // 4
    firsts = torch.cat([seq(i)["input_ids"] for i in range(len(seq))])
    assert torch.equal(firsts.flatten(), tokens[: len(seq) * 64])


def test_token_batches_bad_input():
    with pytest.raises(ValueError, match="1-D int64"):
        TokenBatches(torch.zeros(10), 2, 4)
    with pytest.raises(ValueError, match="fewer than one window"):
        TokenBatches(torch.arange(5), 2, 8)
    with pytest.raises(ValueError, match="batch_size >= 1 and seq_len >= 2"):
        TokenBatches(torch.arange(50), 0, 8)
