"""CPU training throughput: our DeepseekModel against transformers' DeepseekV3ForCausalLM.

Both models get the same config (the tiny pretrained recipe's by default), the same weights
(ours saved with `hf.save_pretrained`, loaded by transformers), the same batches of real
tokens, and the same loop (`train.Trainer`: AdamW, clipping, warmup + cosine). Each model takes
a few warm-up steps, then `--steps` timed steps, the two models alternating step by step so
that a busy machine slows both alike; the figure is tokens per second of training (forward +
backward + optimizer) from the median step time. Printed as a markdown table with the ratio
ours / theirs.

    python benchmarks/train_throughput.py                 # defaults: tiny recipe, 20 steps
    python benchmarks/train_throughput.py --threads 2 --steps 30 --batch-size 16 --seq-len 128

Runs on a CPU by design (the course's laptop case); not part of run_all.py, which times GPU
kernels. Needs transformers (the `dev` extra).
"""

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deepseek_mini.corpus import TokenBatches, encode_documents, stdlib_corpus  # noqa: E402
from deepseek_mini.hf import save_pretrained  # noqa: E402
from deepseek_mini.model import DeepseekConfig, DeepseekModel  # noqa: E402
from deepseek_mini.pretrained import RECIPES  # noqa: E402
from deepseek_mini.tokenizer import train_bpe_fast  # noqa: E402
from deepseek_mini.train import TrainConfig, Trainer  # noqa: E402


def interleaved_tokens_per_second(models: dict, batches, steps: int, warmup: int) -> dict:
    """Train every model with its own Trainer, alternating one step each, so a change in the
    machine's load during the run hits all models alike. Returns name -> (tokens/s from the
    median step time, losses)."""
    tokens_per_step = batches(0)["input_ids"].numel()
    config = TrainConfig(max_steps=warmup + steps, lr=1e-3, warmup_steps=1, progress=False)
    trainers = {name: Trainer(model, config, batches) for name, model in models.items()}
    times = {name: [] for name in models}
    for step in range(warmup + steps):
        for name, trainer in trainers.items():
            start = time.perf_counter()
            trainer.train_step()
            if step >= warmup:  # the first steps allocate buffers and optimizer state
                times[name].append(time.perf_counter() - start)
    return {name: (tokens_per_step / statistics.median(times[name]), [r["loss"] for r in trainers[name].history])
            for name in models}


def main(argv=None):
    recipe = RECIPES["tiny"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--seq-len", type=int, default=recipe.seq_len)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM

    corpus = stdlib_corpus(max_chars=300_000)
    tokenizer = train_bpe_fast(corpus.documents, recipe.vocab_size)
    tokens = encode_documents(tokenizer, corpus.documents)
    batches = TokenBatches(tokens, args.batch_size, args.seq_len, seed=0)

    config = DeepseekConfig(**{**recipe.model, "vocab_size": tokenizer.vocab_size,
                               "max_position_embeddings": args.seq_len})
    torch.manual_seed(0)
    ours = DeepseekModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    attn = getattr(theirs.config, "_attn_implementation", "?")

    results = interleaved_tokens_per_second({"ours": ours, "transformers": theirs}, batches, args.steps, args.warmup)
    (ours_tps, ours_losses), (theirs_tps, theirs_losses) = results["ours"], results["transformers"]

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"CPU training throughput, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"{os.cpu_count()} logical CPUs; batch {args.batch_size} x {args.seq_len} tokens, "
          f"median of {args.steps} interleaved steps after {args.warmup} warm-up; {n_params:,} parameters "
          f"({ours.num_parameters(active=True):,} active); transformers attention: {attn}\n")
    print("| model | tokens/s | ratio to transformers |")
    print("|---|---:|---:|")
    print(f"| deepseek_mini DeepseekModel | {ours_tps:,.0f} | {ours_tps / theirs_tps:.2f}x |")
    print(f"| transformers DeepseekV3ForCausalLM | {theirs_tps:,.0f} | 1.00x |")
    # same weights, same batches, same loop: the first losses must agree (a check, not a timing)
    print(f"\nfirst-step loss: ours {ours_losses[0]:.4f}, transformers {theirs_losses[0]:.4f}")


if __name__ == "__main__":
    main()
