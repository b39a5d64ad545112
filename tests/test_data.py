"""load_mnist: local IDX files (valid and broken), the bundled digits, and the Hugging Face path
on a local parquet file in the layout of ylecun/mnist (offline)."""

import gzip
import struct

import numpy as np
import pytest
import torch

from deepseek_mini.data import MNISTFileError, load_mnist

N_TRAIN, N_TEST = 30, 12


def _idx_images(images: np.ndarray) -> bytes:
    return struct.pack(">IIII", 0x803, len(images), 28, 28) + images.astype(np.uint8).tobytes()


def _idx_labels(labels: np.ndarray) -> bytes:
    return struct.pack(">II", 0x801, len(labels)) + labels.astype(np.uint8).tobytes()


@pytest.fixture
def digits():
    rng = np.random.default_rng(0)
    return {
        "train": (rng.integers(0, 256, (N_TRAIN, 28, 28)), rng.integers(0, 10, N_TRAIN)),
        "test": (rng.integers(0, 256, (N_TEST, 28, 28)), rng.integers(0, 10, N_TEST)),
    }


def write_idx(folder, digits, gz=("train-images-idx3-ubyte",)):
    """The four standard files; those named in `gz` gzip-compressed, as they are downloaded."""
    folder.mkdir(parents=True, exist_ok=True)
    payloads = {
        "train-images-idx3-ubyte": _idx_images(digits["train"][0]),
        "train-labels-idx1-ubyte": _idx_labels(digits["train"][1]),
        "t10k-images-idx3-ubyte": _idx_images(digits["test"][0]),
        "t10k-labels-idx1-ubyte": _idx_labels(digits["test"][1]),
    }
    for name, payload in payloads.items():
        if name in gz:
            (folder / (name + ".gz")).write_bytes(gzip.compress(payload))
        else:
            (folder / name).write_bytes(payload)
    return folder


@pytest.fixture
def no_data_home(tmp_path, monkeypatch):
    monkeypatch.setenv("DEEPSEEK_MINI_DATA", str(tmp_path / "empty-data"))


def _check_same(mnist, digits):
    for split in ("train", "test"):
        images, labels = digits[split]
        assert torch.equal(getattr(mnist, f"{split}_images"), torch.from_numpy(images.astype(np.uint8)))
        assert torch.equal(getattr(mnist, f"{split}_labels"), torch.from_numpy(labels.astype(np.int64)))
    assert mnist.train_images.dtype == torch.uint8 and mnist.train_labels.dtype == torch.int64


def test_idx_folder_given_as_path(tmp_path, digits, capsys, no_data_home):
    mnist = load_mnist(path=write_idx(tmp_path / "mnist", digits))
    _check_same(mnist, digits)
    assert mnist.source == "idx"
    assert "MNIST from idx" in capsys.readouterr().out
    x, y = mnist.tensors("test")
    assert x.shape == (N_TEST, 784) and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(x[0] * 255, torch.from_numpy(digits["test"][0][0].reshape(-1).astype(np.float32)))


def test_idx_folder_found_through_deepseek_mini_data(tmp_path, digits, monkeypatch):
    """What a workshop does: download once into a shared folder, point everyone at it."""
    write_idx(tmp_path / "shared" / "mnist", digits, gz=())
    monkeypatch.setenv("DEEPSEEK_MINI_DATA", str(tmp_path / "shared"))
    mnist = load_mnist(verbose=False)
    assert mnist.source == "idx" and str(tmp_path / "shared" / "mnist") in mnist.description
    _check_same(mnist, digits)


@pytest.mark.parametrize("damage, message", [
    ("truncate", "truncated or corrupt"),
    ("magic", "magic number"),
    ("gzip", "cannot read it as gzip"),
    ("label", "label 12 found"),
    ("missing", "t10k-labels-idx1-ubyte"),
    ("count", "12 images but 11 labels"),
])
def test_broken_idx_files_name_the_file(tmp_path, digits, damage, message, no_data_home):
    folder = write_idx(tmp_path / "mnist", digits)
    images, labels = folder / "t10k-images-idx3-ubyte", folder / "t10k-labels-idx1-ubyte"
    if damage == "truncate":
        images.write_bytes(images.read_bytes()[:-100])
    elif damage == "magic":
        images.write_bytes(struct.pack(">I", 0x801) + images.read_bytes()[4:])
    elif damage == "gzip":
        gz = folder / "train-images-idx3-ubyte.gz"
        gz.write_bytes(gz.read_bytes()[:50])
    elif damage == "label":
        raw = bytearray(labels.read_bytes())
        raw[-1] = 12
        labels.write_bytes(bytes(raw))
    elif damage == "missing":
        labels.unlink()
    elif damage == "count":
        labels.write_bytes(_idx_labels(digits["test"][1][:-1]))
    expected = FileNotFoundError if damage == "missing" else MNISTFileError
    with pytest.raises(expected, match=message) as err:
        load_mnist("idx", path=folder)
    named = {"gzip": "train-images-idx3-ubyte.gz", "label": labels.name, "missing": labels.name,
             "count": str(folder)}.get(damage, images.name)
    assert named in str(err.value)


def test_idx_without_a_folder_says_where_to_put_it(no_data_home):
    with pytest.raises(FileNotFoundError, match="DEEPSEEK_MINI_DATA"):
        load_mnist("idx")


def test_bundled_digits_split_is_stratified_disjoint_and_deterministic(capsys):
    mnist = load_mnist("bundled")
    assert mnist.source == "bundled" and "MNIST from bundled" in capsys.readouterr().out
    assert mnist.train_images.shape == (4000, 28, 28) and mnist.test_images.shape == (1000, 28, 28)
    assert torch.equal(mnist.train_labels.bincount(), torch.full((10,), 400))
    assert torch.equal(mnist.test_labels.bincount(), torch.full((10,), 100))
    train_rows = {bytes(row) for row in mnist.train_images.reshape(4000, -1).numpy()}
    overlap = sum(bytes(row) in train_rows for row in mnist.test_images.reshape(1000, -1).numpy())
    assert overlap == 0, f"{overlap} test digits also appear in the training split"
    again = load_mnist("bundled", verbose=False)
    assert torch.equal(again.test_images, mnist.test_images) and torch.equal(again.train_labels, mnist.train_labels)
    other = load_mnist("bundled", seed=1, test_fraction=0.1, verbose=False)
    assert len(other.test_labels) == 500 and not torch.equal(other.test_images[:100], mnist.test_images[:100])


def _write_hf_parquet(tmp_path, digits):
    """Parquet files exactly as the ylecun/mnist repository ships them: an Image and a ClassLabel column."""
    import datasets
    from PIL import Image

    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(i) for i in range(10)])})
    files = {}
    for split, (images, labels) in digits.items():
        ds = datasets.Dataset.from_dict(
            {"image": [Image.fromarray(img.astype(np.uint8), mode="L") for img in images], "label": labels.tolist()},
            features=features)
        files[split] = str(tmp_path / f"{split}-00000-of-00001.parquet")
        ds.to_parquet(files[split])
    return files


@pytest.fixture
def hf_offline(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    return tmp_path / "hf-cache"


def test_hugging_face_path_on_a_local_parquet_copy(tmp_path, digits, hf_offline, capsys):
    files = _write_hf_parquet(tmp_path, digits)
    mnist = load_mnist("hf", hf_name="parquet", hf_kwargs={"data_files": files, "cache_dir": str(hf_offline)})
    assert mnist.source == "hf" and "MNIST from hf" in capsys.readouterr().out
    _check_same(mnist, digits)


def test_hugging_face_split_missing_is_a_clear_error(tmp_path, digits, hf_offline):
    files = _write_hf_parquet(tmp_path, digits)
    with pytest.raises(MNISTFileError, match="no 'test' split"):
        load_mnist("hf", hf_name="parquet", hf_kwargs={"data_files": {"train": files["train"]}, "cache_dir": str(hf_offline)})


def test_auto_falls_back_to_the_bundled_digits_offline(hf_offline, no_data_home, capsys):
    # offline mode with an empty cache: datasets cannot find ylecun/mnist, so the bundled digits
    mnist = load_mnist(hf_kwargs={"cache_dir": str(hf_offline)})
    out = capsys.readouterr().out
    assert mnist.source == "bundled"
    assert "Hugging Face ylecun/mnist failed" in out and "using the bundled digits" in out


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="source must be one of"):
        load_mnist("kaggle")
    with pytest.raises(ValueError, match="test_fraction"):
        load_mnist("bundled", test_fraction=1.5)
    with pytest.raises(ValueError, match="split must be"):
        load_mnist("bundled", verbose=False).tensors("validation")
