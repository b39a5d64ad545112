"""One small, complete training loop for every model in the course.

    trainer = Trainer(model, TrainConfig(max_steps=200, lr=1e-3), train_batches, eval_batches)
    trainer.fit()                 # tqdm progress, evaluation, checkpoints
    plot_history(trainer)         # loss / val loss / learning rate curves

What it does, step by step (`train_step`):
  1. set the learning rate: linear warmup, then cosine decay to `min_lr`;
  2. for each of `grad_accum_steps` micro-batches: forward under bf16 autocast if asked,
     loss / grad_accum_steps, backward (gradients add up: a bigger batch without the memory);
  3. clip the global gradient norm, take an AdamW step (decoupled weight decay, none on norm
     weights and biases), zero the gradients.
Only parameters with requires_grad=True are optimized, so LoRA fine-tuning (frozen base,
trainable adapters) uses the very same trainer as full fine-tuning.

Batches come from `train_batches(i)`, a function of the micro-batch index (e.g.
`corpus.TokenBatches`), or a list of batches, or any iterable. A checkpoint (safetensors weights
+ optimizer moments, JSON for step, schedule, RNG state and history) resumes to exactly the
losses an uninterrupted run would have had. It is a folder published in one rename, so a crash
mid-save never leaves a mix of two steps; `latest_checkpoint(dir)` finds the newest complete one,
and `load_checkpoint` checks everything (including that the training settings are the saved
ones) before it changes the model:

    trainer.load_checkpoint(latest_checkpoint(config.checkpoint_dir)).fit()

The loss: `loss_fn(model, batch)` if you give one. Otherwise the model is called with the batch
(a dict as keyword arguments, Hugging Face style, so a model that takes `labels` computes its own
loss, MoE balance loss included; a tuple as positional arguments); if its output carries a loss
(a scalar tensor, `.loss`, `["loss"]`) that is used, and if it returns logits, the causal-LM
loss against `batch["labels"]` is computed here (`causal_lm_loss`, the model's own).
"""

import base64
import json
import math
import os
import re
import shutil
import socket
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from deepseek_mini.model import causal_lm_loss  # noqa: F401  (re-exported: the one next-token loss)


@dataclass
class TrainConfig:
    max_steps: int = 100  # optimizer steps (each is grad_accum_steps micro-batches)
    lr: float = 1e-3  # peak learning rate, reached at the end of warmup
    min_lr: float = 0.0  # where the cosine ends
    warmup_steps: int = 0
    weight_decay: float = 0.1  # decoupled (AdamW); not applied to 1-D params (norms, biases)
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float | None = 1.0  # max global gradient norm; None = no clipping
    grad_accum_steps: int = 1
    precision: str = "fp32"  # "fp32", "bf16" (autocast) or "auto" (bf16 on a GPU that has it)
    gradient_checkpointing: bool = False  # recompute activations in backward to save memory
    eval_every: int = 0  # evaluate every N steps (0: only when fit() ends, if eval data given)
    eval_batches: int = 8  # batches per evaluation
    checkpoint_every: int = 0  # save to checkpoint_dir every N steps (0: never)
    checkpoint_dir: str | None = None
    seed: int = 0
    progress: bool = True  # tqdm bar (renders as a widget in notebooks)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        checks = [
            (self.max_steps >= 1, "max_steps must be >= 1"),
            (self.lr > 0 and 0 <= self.min_lr <= self.lr, "need lr > 0 and 0 <= min_lr <= lr"),
            (0 <= self.warmup_steps <= self.max_steps, "warmup_steps must be in [0, max_steps]"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two values in [0, 1)"),
            (self.grad_clip is None or self.grad_clip > 0, "grad_clip must be > 0 or None"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be >= 1"),
            (self.precision in ("fp32", "bf16", "auto"), "precision must be 'fp32', 'bf16' or 'auto'"),
            (self.eval_every >= 0 and self.eval_batches >= 1, "need eval_every >= 0 and eval_batches >= 1"),
            (self.checkpoint_every == 0 or self.checkpoint_dir, "checkpoint_every needs checkpoint_dir"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"TrainConfig: {message} (got {self})")


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to `lr` over
    `warmup_steps`, then half a cosine down to `min_lr` at `max_steps`."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.max_steps - config.warmup_steps)
    progress = min(progress, 1.0)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable parameters in two AdamW groups: matrices (and stacked experts) decay;
    vectors (norm weights, biases) do not, since shrinking them only hurts."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("Trainer: the model has no parameter with requires_grad=True")
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """Call the model on the batch (a dict as keyword arguments, a tuple as positional ones) and
    get a scalar loss out of whatever it returns: the loss itself, or logits and batch["labels"]."""
    labels = batch.get("labels") if isinstance(batch, dict) else None
    if isinstance(batch, dict):
        out = model(**batch)
    elif isinstance(batch, (tuple, list)):
        out = model(*batch)
    else:
        out = model(batch)
    loss = getattr(out, "loss", None)
    if loss is None and isinstance(out, dict):
        loss = out.get("loss")
    if loss is None and isinstance(out, (tuple, list)):
        loss = next((o for o in out if isinstance(o, torch.Tensor) and o.dim() == 0), None)
    if loss is None and isinstance(out, torch.Tensor) and out.dim() == 0:
        loss = out
    if loss is not None:
        return loss
    logits = getattr(out, "logits", out)
    if isinstance(logits, torch.Tensor) and logits.dim() == 3 and labels is not None:
        return causal_lm_loss(logits, labels)
    raise ValueError("Trainer: could not get a loss from the model's output "
                     f"({type(out).__name__}); return a scalar loss, or logits [batch, seq, vocab] with "
                     "batch['labels'], or pass loss_fn=lambda model, batch: ...")


def _as_batch_fn(batches, name: str):
    """Turn a callable(i) / list / iterable into a function of the micro-batch index."""
    if batches is None:
        return None
    if callable(batches) and not isinstance(batches, nn.Module):
        return batches
    if hasattr(batches, "__getitem__") and hasattr(batches, "__len__"):
        if len(batches) == 0:
            raise ValueError(f"Trainer: {name} is empty")
        return lambda i: batches[i % len(batches)]
    if hasattr(batches, "__iter__"):
        state = {"it": None, "pos": 0}

        def from_iterable(i):
            # Restart (and skip ahead) when asked for an index other than the next one, so a
            # resumed run sees the same batches. Cycles when the iterable runs out.
            if state["it"] is None or state["pos"] != i:
                state["it"], state["pos"] = iter(batches), 0
                for _ in range(i):
                    from_iterable(state["pos"])
            try:
                batch = next(state["it"])
            except StopIteration:
                state["it"] = iter(batches)
                batch = next(state["it"])
            state["pos"] += 1
            return batch

        return from_iterable
    raise TypeError(f"Trainer: {name} must be a function of the batch index, a list of batches, or an iterable; "
                    f"got {type(batches).__name__}")


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (tuple, list)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch) -> int:
    x = batch.get("input_ids") if isinstance(batch, dict) else (batch[0] if isinstance(batch, (tuple, list)) else batch)
    return x.numel() if isinstance(x, torch.Tensor) else 0


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "gradient_checkpointing_enable"):  # transformers and our DeepseekModel
        model.gradient_checkpointing_enable()
    elif hasattr(model, "gradient_checkpointing"):
        model.gradient_checkpointing = True
    else:
        raise ValueError(f"Trainer: gradient_checkpointing=True but {type(model).__name__} has no "
                         "gradient_checkpointing_enable() method or gradient_checkpointing attribute")


class Trainer:
    def __init__(self, model: nn.Module, config: TrainConfig, train_batches, eval_batches=None,
                 loss_fn=None, device=None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"Trainer: model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"Trainer: config must be a TrainConfig, got {type(config).__name__}")
        self.model, self.config = model, config
        self.train_batches = _as_batch_fn(train_batches, "train_batches")
        self.eval_batches = _as_batch_fn(eval_batches, "eval_batches")
        self.loss_fn = loss_fn or default_loss
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr,
                                           betas=config.betas, eps=config.eps)
        self.trainable = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.use_bf16 = self._bf16_wanted()
        if config.gradient_checkpointing:
            _enable_gradient_checkpointing(model)
        self.step = 0  # optimizer steps done
        self.tokens_seen = 0
        self.history: list[dict] = []  # one record per optimizer step
        self.eval_history: list[dict] = []
        # The trainer's own random state (dropout etc.): swapped in for each step and out
        # again, so two trainers never draw from each other's stream and a checkpoint holds it.
        self.rng_state = torch.Generator().manual_seed(config.seed).get_state()
        self.cuda_rng_state = None
        if self.device.type == "cuda":
            outer = torch.cuda.get_rng_state(self.device)
            with torch.cuda.device(self.device):
                torch.cuda.manual_seed(config.seed)
            self.cuda_rng_state = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(outer, self.device)

    def _bf16_wanted(self) -> bool:
        p = self.config.precision
        if p == "fp32":
            return False
        supported = self.device.type == "cpu" or (self.device.type == "cuda" and torch.cuda.is_bf16_supported())
        if p == "bf16" and not supported:
            raise ValueError(f"TrainConfig: precision='bf16' but {self.device} does not support bfloat16")
        # "auto": bf16 on GPUs that have it; on a CPU it is usually slower than fp32
        return supported and (p == "bf16" or self.device.type == "cuda")

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _swap_rng(self):
        """Exchange the global RNG state with the trainer's (call twice: in, then out)."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng_state)
        self.rng_state = outer
        if self.cuda_rng_state is not None:
            outer = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda_rng_state, self.device)
            self.cuda_rng_state = outer

    def train_step(self) -> dict:
        """One optimizer step over grad_accum_steps micro-batches; returns its history record."""
        self._swap_rng()
        try:
            return self._train_step()
        finally:
            self._swap_rng()

    def _train_step(self) -> dict:
        cfg, model = self.config, self.model
        model.train()
        lr = lr_at(self.step, cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        started = time.perf_counter()
        total, tokens = 0.0, 0
        for k in range(cfg.grad_accum_steps):
            batch = _to_device(self.train_batches(self.step * cfg.grad_accum_steps + k), self.device)
            with self._autocast():
                loss = self.loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                raise ValueError(f"Trainer: the loss must be a scalar tensor, got {getattr(loss, 'shape', loss)}")
            if not torch.isfinite(loss):
                raise FloatingPointError(f"Trainer: loss is {loss.item()} at step {self.step}; lower lr or check the data")
            (loss / cfg.grad_accum_steps).backward()
            total += loss.item()
            tokens += _count_tokens(batch)
        max_norm = cfg.grad_clip if cfg.grad_clip is not None else float("inf")  # inf: measure only
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens_seen += tokens
        seconds = time.perf_counter() - started
        record = {"step": self.step, "loss": total / cfg.grad_accum_steps, "lr": lr,
                  "grad_norm": grad_norm.item(), "tokens": self.tokens_seen,
                  "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}
        self.history.append(record)
        return record

    @torch.no_grad()
    def evaluate(self, n_batches: int | None = None) -> dict:
        """Mean loss (and perplexity) over the first n eval batches; the training RNG and
        train/eval mode are left as they were."""
        if self.eval_batches is None:
            raise ValueError("Trainer.evaluate: no eval_batches were given")
        n = n_batches or self.config.eval_batches
        was_training = self.model.training
        self.model.eval()
        try:
            losses = []
            for i in range(n):
                with self._autocast():
                    losses.append(self.loss_fn(self.model, _to_device(self.eval_batches(i), self.device)).item())
        finally:
            self.model.train(was_training)
        val = sum(losses) / len(losses)
        record = {"step": self.step, "val_loss": val, "val_ppl": math.exp(min(val, 50.0))}
        self.eval_history.append(record)
        return record

    def fit(self, steps: int | None = None) -> list[dict]:
        """Train until max_steps (or `steps` more steps, to stop early and resume later)."""
        from tqdm.auto import tqdm

        cfg = self.config
        end = cfg.max_steps if steps is None else min(cfg.max_steps, self.step + steps)
        bar = tqdm(total=cfg.max_steps, initial=self.step, disable=not cfg.progress, desc="train", unit="step")
        try:
            while self.step < end:
                rec = self.train_step()
                postfix = {"loss": f"{rec['loss']:.3f}", "lr": f"{rec['lr']:.1e}"}
                if self.eval_batches is not None and cfg.eval_every and self.step % cfg.eval_every == 0:
                    postfix["val"] = f"{self.evaluate()['val_loss']:.3f}"
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    self.save_checkpoint(Path(cfg.checkpoint_dir) / f"step-{self.step:06d}")
                bar.set_postfix(postfix)
                bar.update(1)
        finally:
            bar.close()
        if (self.eval_batches is not None and self.step == cfg.max_steps
                and (not self.eval_history or self.eval_history[-1]["step"] != self.step)):
            self.evaluate()
        return self.history

    # --- checkpoints ---------------------------------------------------------------------
    def save_checkpoint(self, path) -> Path:
        """Write model.safetensors, optimizer.safetensors and trainer_state.json as the folder
        `path`, atomically: the files go into a temporary folder next to it, are flushed to disk,
        and the folder is renamed into place, replacing an older checkpoint of that name only
        once the new one is complete. A crash leaves the old checkpoint or the new one, never a
        mix; temporary folders left by a killed save are removed by the next save."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_temporaries(path.parent)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{_owner()}-", dir=path.parent))
        try:
            save_model(self.model, str(tmp / "model.safetensors"))  # handles tied weights
            opt = self.optimizer.state_dict()
            tensors, scalars = {}, {}
            for idx, state in opt["state"].items():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
                    else:
                        scalars[f"{idx}.{key}"] = value
            save_file(tensors, str(tmp / "optimizer.safetensors"))
            encode = lambda t: base64.b64encode(t.numpy().tobytes()).decode()  # noqa: E731
            rng = {"torch": encode(self.rng_state)}
            if self.cuda_rng_state is not None:
                rng["cuda"] = encode(self.cuda_rng_state)
            state = {
                "step": self.step,
                "tokens_seen": self.tokens_seen,
                "config": asdict(self.config),
                "schedule": {"lr_next": lr_at(self.step, self.config) if self.step < self.config.max_steps else None},
                "optimizer": {"param_groups": opt["param_groups"], "scalars": scalars},
                "rng": rng,
                "history": self.history,
                "eval_history": self.eval_history,
            }
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=1))
            for f in tmp.iterdir():  # on disk before the rename makes them visible
                _fsync(f)
            tmp.chmod(0o777 & ~_umask())  # mkdtemp's folder is private; a checkpoint is not
            _publish_folder(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone already unless something failed
        return path

    def load_checkpoint(self, path, allow_config_changes: bool = False) -> "Trainer":
        """Restore weights, optimizer moments, step, RNG and history saved by save_checkpoint.

        Everything is read and checked first (files, tensor names, shapes and dtypes, optimizer
        groups, training settings), so a checkpoint that does not fit raises and leaves this
        trainer and its model untouched. Settings that change the remaining steps (seed,
        grad_accum_steps, lr schedule, AdamW, clipping, precision) must equal the saved ones for
        an exact resume; allow_config_changes=True accepts different ones on purpose."""
        path = Path(path)
        loaded = read_checkpoint(path)
        state, weights, opt_tensors = loaded["state"], loaded["model"], loaded["optimizer"]
        where = f"load_checkpoint: {path}"
        self._check_resume_config(state["config"], where, allow_config_changes)
        if state["step"] > self.config.max_steps:
            raise ValueError(f"{where} is at step {state['step']}, past this config's max_steps={self.config.max_steps}")
        self._check_weights(weights, where)
        opt_state: dict = {}
        for key, value in opt_tensors.items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            idx, name = key.split(".", 1)
            opt_state.setdefault(int(idx), {})[name] = value
        groups = state["optimizer"]["param_groups"]
        for g in groups:
            g["betas"] = tuple(g["betas"])
        self._check_optimizer_state(opt_state, groups, where)
        decode = lambda s: torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)  # noqa: E731
        rng_state = decode(state["rng"]["torch"])
        try:
            torch.Generator().set_state(rng_state)
        except RuntimeError as e:
            raise ValueError(f"{where}: trainer_state.json holds an invalid random-number state ({e})") from None

        # everything checked: now change the model, the optimizer and the trainer
        self.model.load_state_dict(weights, strict=False)  # tied names share the storage of a loaded one
        self.optimizer.load_state_dict({"state": opt_state, "param_groups": groups})
        self.rng_state = rng_state
        if self.cuda_rng_state is not None and "cuda" in state["rng"]:
            self.cuda_rng_state = decode(state["rng"]["cuda"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.history, self.eval_history = state["history"], state["eval_history"]
        return self

    def _check_resume_config(self, saved: dict, where: str, allowed: bool) -> None:
        current = asdict(self.config)
        changed = {}
        for name in RESUME_FIELDS:
            old, new = saved.get(name), current[name]
            if isinstance(new, tuple):
                old = tuple(old) if isinstance(old, list) else old
            if old != new:
                changed[name] = (old, new)
        if changed and not allowed:
            listed = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in changed.items())
            raise ValueError(f"{where} was saved with other training settings ({listed}); resuming would not "
                             "repeat the interrupted run. Use the saved TrainConfig, or pass "
                             "allow_config_changes=True to continue with the new settings on purpose")

    def _check_weights(self, weights: dict, where: str) -> None:
        expected = self.model.state_dict()
        problems = [f"unexpected {k}" for k in weights if k not in expected]
        stored = {t.untyped_storage().data_ptr(): k for k, t in expected.items() if k in weights}
        for k, t in expected.items():
            if k not in weights:
                # save_model writes one name for tied weights (e.g. lm_head = embed_tokens)
                if stored.get(t.untyped_storage().data_ptr()) is None:
                    problems.append(f"missing {k}")
            elif weights[k].shape != t.shape or weights[k].dtype != t.dtype:
                problems.append(f"{k}: {weights[k].dtype} {tuple(weights[k].shape)} in the file, "
                                f"{t.dtype} {tuple(t.shape)} in the model")
        if problems:
            raise ValueError(f"{where}/model.safetensors does not fit this model: {problems[:5]}"
                             f"{' ...' if len(problems) > 5 else ''}")

    def _check_optimizer_state(self, opt_state: dict, groups: list, where: str) -> None:
        ours = self.optimizer.param_groups
        if [len(g.get("params", ())) for g in groups] != [len(g["params"]) for g in ours]:
            raise ValueError(f"{where}: the optimizer was saved for parameter groups of sizes "
                             f"{[len(g.get('params', ())) for g in groups]}, this trainer has "
                             f"{[len(g['params']) for g in ours]} (another model, or other trainable parameters?)")
        params = [p for g in ours for p in g["params"]]
        for idx, entry in opt_state.items():
            if not 0 <= idx < len(params):
                raise ValueError(f"{where}/optimizer.safetensors: state for parameter {idx}, but there are {len(params)}")
            for name, value in entry.items():
                if isinstance(value, torch.Tensor) and value.dim() and value.shape != params[idx].shape:
                    raise ValueError(f"{where}/optimizer.safetensors: {idx}.{name} has shape {tuple(value.shape)}, "
                                     f"its parameter {tuple(params[idx].shape)}")


# Settings that decide what the remaining steps compute: a resume with other values would not
# repeat the interrupted run (eval, checkpoint and progress settings may change freely).
RESUME_FIELDS = ("max_steps", "lr", "min_lr", "warmup_steps", "weight_decay", "betas", "eps", "grad_clip",
                 "grad_accum_steps", "precision", "seed")
_TMP_TAG = ".partial-"
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.safetensors", "trainer_state.json")


def read_checkpoint(path, tensors: bool = True) -> dict:
    """Read and check a checkpoint folder without changing anything: {"state": the parsed
    trainer_state.json, "model": weights, "optimizer": optimizer tensors}. Raises
    FileNotFoundError or ValueError naming the file that is missing or damaged. With
    tensors=False only the safetensors headers are read (cheap; they reveal a truncated file)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    for name in _CHECKPOINT_FILES:
        if not (path / name).is_file():
            raise FileNotFoundError(f"load_checkpoint: {path / name} is missing; is {path} a checkpoint folder?")
    try:
        state = json.loads((path / "trainer_state.json").read_text())
        required = {"step": int, "tokens_seen": int, "config": dict, "optimizer": dict, "rng": dict,
                    "history": list, "eval_history": list}
        wrong = [k for k, kind in required.items() if not isinstance(state.get(k), kind)]
        if not wrong:
            wrong = [k for k in ("param_groups", "scalars") if k not in state["optimizer"]] + \
                    [k for k in ("torch",) if not isinstance(state["rng"].get(k), str)]
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise ValueError(f"load_checkpoint: {path / 'trainer_state.json'} is not a valid trainer state ({e})") from None
    if wrong:
        raise ValueError(f"load_checkpoint: {path / 'trainer_state.json'} lacks or has wrong field(s) {wrong}")
    out = {"state": state}
    for name, key in (("model.safetensors", "model"), ("optimizer.safetensors", "optimizer")):
        try:
            if tensors:
                out[key] = load_file(str(path / name))
            else:
                with safe_open(str(path / name), "pt"):
                    pass
        except Exception as e:  # safetensors' error does not name the file
            raise ValueError(f"load_checkpoint: cannot read {path / name} (truncated or damaged?): {e}") from None
    return out


def latest_checkpoint(directory) -> Path | None:
    """The complete checkpoint with the highest step among the folders in `directory` (e.g. a
    TrainConfig's checkpoint_dir), or None when there is none. Damaged or unfinished folders
    are skipped, so a run interrupted in the middle of a save resumes from the one before."""
    best, best_step = None, -1
    directory = Path(directory)
    if not directory.is_dir():
        return None
    for folder in directory.iterdir():
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            step = read_checkpoint(folder, tensors=False)["state"]["step"]
        except (OSError, ValueError):
            continue
        if step > best_step:
            best, best_step = folder, step
    return best


def _owner() -> str:
    """Who writes a temporary folder (host and process), so a later save knows whether it is stale."""
    return f"{socket.gethostname()}-{os.getpid()}"


def _remove_stale_temporaries(parent: Path) -> None:
    """Delete temporary folders of saves whose process died (on this host) before finishing."""
    for tmp in parent.glob(f".*{_TMP_TAG}*"):
        owner = re.search(rf"{re.escape(_TMP_TAG)}(.+)-(\d+)-(old-)?[a-z0-9_]+$", tmp.name)  # mkdtemp's suffix
        if owner and owner[1] == socket.gethostname() and not _alive(int(owner[2])):
            shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # our own leftovers: this process is not saving there now
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, someone else's
    return True


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_folder(tmp: Path, path: Path) -> None:
    """Rename the finished `tmp` to `path`; an existing `path` is moved aside first and
    deleted after, so at every moment `path` is either the old checkpoint or the new one."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}{_TMP_TAG}{_owner()}-old-", dir=path.parent))
        os.replace(path, old / "checkpoint")
    os.replace(tmp, path)
    try:
        _fsync(path.parent)  # make the rename itself durable
    except OSError:
        pass  # some filesystems cannot fsync a directory
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def plot_history(history, eval_history=None, ax=None):
    """Training loss (and validation loss) against step, with the learning rate on a second
    axis. Accepts a Trainer or its history lists."""
    import matplotlib.pyplot as plt

    if isinstance(history, Trainer):
        history, eval_history = history.history, history.eval_history
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in history], [r["loss"] for r in history], label="train loss")
    if eval_history:
        ax.plot([r["step"] for r in eval_history], [r["val_loss"] for r in eval_history], "o-", label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    lr_ax = ax.twinx()
    lr_ax.plot([r["step"] for r in history], [r["lr"] for r in history], color="gray", alpha=0.4, label="lr")
    lr_ax.set_ylabel("learning rate")
    ax.legend(loc="upper right")
    return ax
