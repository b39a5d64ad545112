"""`pretrained("tiny")`: a small DeepSeek-style model (MLA + MoE) trained here, once, and cached.

Later notebooks start from it instead of from random weights:

    tiny = deepseek_mini.pretrained("tiny")      # minutes the first time, seconds after
    tiny.model, tiny.tokenizer, tiny.history

The build is a pure function of its recipe: the Python standard library's source (this
machine's, see `corpus.stdlib_corpus`), a byte-level BPE trained on it, a `DeepseekModel`
trained with `train.Trainer` under a fixed seed. The cache folder's name is a hash of the recipe
and of the corpus, so changing either builds a new model instead of reusing a stale one.

Where: `paths.models_dir()`, i.e. $DEEPSEEK_MINI_HOME/models for a workshop (build once into
the shared folder, every student loads it) or ~/.cache/deepseek_mini/models.
A build writes into a temporary folder next to the cache and renames it into place when
complete, so a crash or a second concurrent build never leaves a half-written model behind.
"""

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import paths

FORMAT_VERSION = 1  # bump when the files written below change meaning
_FILES = ("config.json", "model.safetensors", "tokenizer.json", "recipe.json", "history.json")


@dataclass
class Recipe:
    """Everything that decides the pretrained weights."""

    corpus_chars: int = 1_000_000  # stdlib source characters
    val_fraction: float = 0.05  # documents held out for validation
    vocab_size: int = 2048  # BPE vocabulary, incl. <|endoftext|>
    seq_len: int = 128
    batch_size: int = 16
    steps: int = 300
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    eval_batches: int = 8
    seed: int = 0
    # DeepseekConfig fields (vocab_size and max_position_embeddings come from above)
    model: dict = field(default_factory=lambda: {
        "hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4,
        "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 32, "qk_rope_head_dim": 16, "v_head_dim": 32,
        "intermediate_size": 384, "first_k_dense_replace": 1,
        "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "moe_intermediate_size": 64,
    })


RECIPES = {"tiny": Recipe()}


@dataclass
class Pretrained:
    """A loaded pretrained model and what came with it."""

    model: torch.nn.Module  # DeepseekModel in eval mode
    tokenizer: object  # ByteBPETokenizer
    path: Path  # the cache folder
    recipe: Recipe
    history: dict  # train/eval loss curves, build time, corpus source

    def __repr__(self):
        return (f"Pretrained({self.path.name}: {self.model.num_parameters():,} parameters, "
                f"vocab {self.tokenizer.vocab_size}, final val loss {self.history.get('final_val_loss', float('nan')):.3f})")


def cache_key(recipe: Recipe, corpus_fingerprint: str) -> str:
    """Hash of the recipe and the corpus: a different recipe or corpus means another folder."""
    blob = json.dumps({"format": FORMAT_VERSION, "recipe": dataclasses.asdict(recipe), "corpus": corpus_fingerprint},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def pretrained(name: str = "tiny", *, rebuild: bool = False, progress: bool = True, **overrides) -> Pretrained:
    """Load the cached pretrained model `name`, building it first if needed.

    overrides replace recipe fields (e.g. steps=50 for a quick experiment); they change the
    cache key, so the default model is never overwritten by a variant.
    """
    if name not in RECIPES:
        raise ValueError(f"pretrained: unknown model {name!r}; available: {sorted(RECIPES)}")
    known = {f.name for f in dataclasses.fields(Recipe)}
    unknown = set(overrides) - known
    if unknown:
        raise ValueError(f"pretrained: unknown recipe fields {sorted(unknown)}; known: {sorted(known)}")
    recipe = dataclasses.replace(copy.deepcopy(RECIPES[name]), **overrides)  # never alias the registry's dict

    from .corpus import stdlib_corpus

    corpus = stdlib_corpus(max_chars=recipe.corpus_chars)
    folder = paths.models_dir() / f"{name}-{cache_key(recipe, corpus.fingerprint())}"
    damaged = None  # the inode of a cache folder found damaged, to repair it once
    if not rebuild and _complete(folder):
        try:
            return load(folder)
        except DamagedCacheError as e:
            if progress:
                print(f"pretrained: {e}; building it again")
            try:
                damaged = folder.stat().st_ino
            except FileNotFoundError:  # another process is replacing it right now
                damaged = -1
    with _build_lock(folder):
        # another process may have built or repaired it meanwhile (a repair is a new folder)
        repaired = damaged is not None and folder.exists() and folder.stat().st_ino != damaged
        if rebuild or (damaged is not None and not repaired) or not _complete(folder):
            # an existing folder here is incomplete or damaged, or asked to be rebuilt: replace it
            _build(recipe, corpus, folder, progress=progress, replace=rebuild or folder.exists())
    return load(folder)


class DamagedCacheError(ValueError):
    """A cached model folder whose files exist but cannot be read (truncated, edited, ...)."""


def load(folder) -> Pretrained:
    """Load a model folder written by `pretrained` (config, safetensors weights, tokenizer)."""
    from safetensors.torch import load_model

    from .model import DeepseekConfig, DeepseekModel
    from .tokenizer import ByteBPETokenizer

    folder = Path(folder)
    if not _complete(folder):
        missing = [f for f in _FILES if not (folder / f).is_file()]
        raise FileNotFoundError(f"load: {folder} is not a complete pretrained model folder (missing {missing}); "
                                "pretrained(..., rebuild=True) builds it again")
    reading = "config.json"
    try:
        config = DeepseekConfig(**json.loads((folder / reading).read_text()))
        model = DeepseekModel(config)
        reading = "model.safetensors"
        load_model(model, str(folder / reading))
        model.eval()
        reading = "recipe.json"
        recipe = Recipe(**json.loads((folder / reading).read_text()))
        reading = "history.json"
        history = json.loads((folder / reading).read_text())
        reading = "tokenizer.json"
        tokenizer = ByteBPETokenizer.load(folder / reading)
    except Exception as e:  # what a damaged file raises depends on the reader (JSON, safetensors, ...)
        raise DamagedCacheError(f"load: {folder / reading} is damaged ({type(e).__name__}: {e}); "
                                "pretrained(..., rebuild=True) replaces the cached model") from e
    return Pretrained(model, tokenizer, folder, recipe, history)


def built_models(name: str = "tiny") -> list[Path]:
    """Complete cached folders of model `name` (one per recipe and corpus built here)."""
    return sorted(f for f in paths.models_dir().glob(f"{name}-*") if f.is_dir() and _complete(f))


def _complete(folder: Path) -> bool:
    return all((folder / f).is_file() for f in _FILES)


class _build_lock:
    """An exclusive file lock, so concurrent builders of one model wait for each other
    instead of all training it. Where file locks are unavailable, the atomic rename in
    `_publish` alone still keeps the cache consistent."""

    def __init__(self, folder: Path):
        self.path = folder.parent / f".{folder.name}.lock"

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(self.path.parent, os.W_OK):
            raise PermissionError(f"pretrained: the model is not built yet (or damaged) and {self.path.parent} is not "
                                  "writable; "
                                  "set DEEPSEEK_MINI_HOME to a folder you can write, or ask your instructor to build it")
        self.file = open(self.path, "a")
        try:
            import fcntl

            fcntl.flock(self.file, fcntl.LOCK_EX)
        except (ImportError, OSError):
            pass
        return self

    def __exit__(self, *exc):
        self.file.close()  # closing releases the lock
        return False


def _build(recipe: Recipe, corpus, folder: Path, *, progress: bool, replace: bool) -> None:
    from safetensors.torch import save_model

    from .corpus import TokenBatches, encode_documents
    from .model import DeepseekConfig, DeepseekModel
    from .tokenizer import train_bpe_fast
    from .train import TrainConfig, Trainer

    started, started_cpu = time.perf_counter(), time.process_time()
    if progress:
        print(f"pretrained: building {folder.name} into {folder.parent} (first time only; later calls load it)")
    train_docs, val_docs = corpus.split(recipe.val_fraction, seed=recipe.seed)
    # the Rust fast path learns the same merges as tokenizer.train_bpe (tested), in seconds
    tokenizer = train_bpe_fast(train_docs.documents, recipe.vocab_size)
    train_tokens = encode_documents(tokenizer, train_docs.documents)
    val_tokens = encode_documents(tokenizer, val_docs.documents)

    config = DeepseekConfig(**{**recipe.model, "vocab_size": tokenizer.vocab_size,
                               "max_position_embeddings": recipe.seq_len})
    torch.manual_seed(recipe.seed)
    model = DeepseekModel(config)
    train_config = TrainConfig(max_steps=recipe.steps, lr=recipe.lr, min_lr=recipe.min_lr,
                               warmup_steps=recipe.warmup_steps, weight_decay=recipe.weight_decay,
                               eval_batches=recipe.eval_batches, seed=recipe.seed, progress=progress)
    trainer = Trainer(model, train_config,
                      TokenBatches(train_tokens, recipe.batch_size, recipe.seq_len, seed=recipe.seed),
                      TokenBatches(val_tokens, recipe.batch_size, recipe.seq_len, random=False))
    initial_val = trainer.evaluate()["val_loss"]
    trainer.fit()

    history = {
        "train": trainer.history,
        "eval": trainer.eval_history,
        "initial_val_loss": initial_val,
        "final_val_loss": trainer.eval_history[-1]["val_loss"],
        "corpus": corpus.source,
        "corpus_fingerprint": corpus.fingerprint(),
        "train_tokens": train_tokens.numel(),
        "val_tokens": val_tokens.numel(),
        "build_seconds": time.perf_counter() - started,
        "build_cpu_seconds": time.process_time() - started_cpu,  # all threads; = wall time when alone
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "threads": torch.get_num_threads(),
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}-building-", dir=folder.parent))
    try:
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=1))
        save_model(model, str(tmp / "model.safetensors"))
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "recipe.json").write_text(json.dumps(dataclasses.asdict(recipe), indent=1))
        (tmp / "history.json").write_text(json.dumps(history))
        # mkdtemp makes a private folder; a workshop's shared cache must be readable by all
        umask = os.umask(0)
        os.umask(umask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~umask)
        tmp.chmod(0o777 & ~umask)
        _publish(tmp, folder, replace=replace)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _publish(tmp: Path, folder: Path, *, replace: bool) -> bool:
    """Move a finished build into place with one atomic rename. If the folder already
    exists (a concurrent builder won), keep theirs unless replace=True. Returns True when
    `tmp` became `folder`."""
    if replace and folder.exists():
        old = folder.parent / f".{folder.name}-old-{os.getpid()}"
        os.rename(folder, old)
        shutil.rmtree(old, ignore_errors=True)
    try:
        os.rename(tmp, folder)
        return True
    except OSError:
        if _complete(folder):
            return False  # someone else's identical build is in place
        raise
