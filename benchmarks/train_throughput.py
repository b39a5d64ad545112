"""CPU throughput, training and generation: our DeepseekModel against transformers' DeepseekV3ForCausalLM.

Both models get the same config (the tiny pretrained recipe's by default), the same weights
(ours saved with `hf.save_pretrained`, loaded by transformers), the same batches of real
tokens, and the same loop (`train.Trainer`: AdamW, clipping, warmup + cosine). Each model takes
a few warm-up steps, then `--steps` timed steps, the two models alternating step by step so
that a busy machine slows both alike; the figure is tokens per second of training (forward +
backward + optimizer) from the median step time. Generation (greedy, KV cache, `--new-tokens`
tokens after a 16-token prompt) is timed the same way, alternating, median of `--repeats`.

One run measures every combination of `--threads` (default 1 and 2) and precision (fp32, and
bf16: autocast for training, bf16 weights for generation) and prints one markdown table with
the ratios ours / theirs, so the ratios come from one run on one machine state.

    python benchmarks/train_throughput.py                   # tiny recipe, threads 1 and 2, fp32 and bf16
    python benchmarks/train_throughput.py --threads 2 --steps 30 --batch-size 16 --seq-len 128
    python benchmarks/train_throughput.py --expert-loop     # our routed experts on the per-expert loop

Runs on a CPU by design (the course's laptop case); not part of run_all.py, which times GPU
kernels. Needs transformers (the `dev` extra).
"""

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from deepseek_mini import moe  # noqa: E402
from deepseek_mini.corpus import TokenBatches, encode_documents, stdlib_corpus  # noqa: E402
from deepseek_mini.hf import save_pretrained  # noqa: E402
from deepseek_mini.model import DeepseekConfig, DeepseekModel  # noqa: E402
from deepseek_mini.pretrained import RECIPES  # noqa: E402
from deepseek_mini.tokenizer import train_bpe_fast  # noqa: E402
from deepseek_mini.train import TrainConfig, Trainer  # noqa: E402


def interleaved_tokens_per_second(models: dict, batches, steps: int, warmup: int, precision: str = "fp32") -> dict:
    """Train every model with its own Trainer, alternating one step each, so a change in the
    machine's load during the run hits all models alike. Returns name -> (tokens/s from the
    median step time, losses)."""
    tokens_per_step = batches(0)["input_ids"].numel()
    config = TrainConfig(max_steps=warmup + steps, lr=1e-3, warmup_steps=1, progress=False, precision=precision)
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


def interleaved_generation_tokens_per_second(models: dict, prompt, new_tokens: int, repeats: int) -> dict:
    """Greedy generation with the KV cache, alternating models; name -> (generated tokens/s from
    the median time, the tokens). One untimed warm-up call each."""
    times = {name: [] for name in models}
    out = {}
    with torch.no_grad():
        for step in range(repeats + 1):
            for name, model in models.items():
                start = time.perf_counter()
                if name == "ours":
                    out[name] = model.generate(prompt, new_tokens)
                else:
                    out[name] = model.generate(prompt, attention_mask=torch.ones_like(prompt), pad_token_id=0,
                                               max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                               do_sample=False, use_cache=True)
                if step:
                    times[name].append(time.perf_counter() - start)
    return {name: (prompt.shape[0] * new_tokens / statistics.median(times[name]), out[name]) for name in models}


def main(argv=None):
    recipe = RECIPES["tiny"]
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=recipe.batch_size)
    parser.add_argument("--seq-len", type=int, default=recipe.seq_len)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts to measure")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated per sequence")
    parser.add_argument("--repeats", type=int, default=3, help="timed generation calls per model")
    parser.add_argument("--expert-loop", action="store_true",
                        help="run our routed experts on the per-expert loop, not the grouped reference")
    args = parser.parse_args(argv)
    if args.expert_loop:
        moe.grouped_supported = lambda *tensors: False  # ops.routed_experts then takes the loop

    from transformers import AutoModelForCausalLM

    corpus = stdlib_corpus(max_chars=300_000)
    tokenizer = train_bpe_fast(corpus.documents, recipe.vocab_size)
    tokens = encode_documents(tokenizer, corpus.documents)
    batches = TokenBatches(tokens, args.batch_size, args.seq_len, seed=0)

    config = DeepseekConfig(**{**recipe.model, "vocab_size": tokenizer.vocab_size,
                               "max_position_embeddings": args.seq_len + args.new_tokens + 16})
    torch.manual_seed(0)
    ours = DeepseekModel(config)
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(ours, tmp)
        theirs = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32)
    attn = getattr(theirs.config, "_attn_implementation", "?")
    prompt = batches(0)["input_ids"][:4, :16]

    n_params = sum(p.numel() for p in ours.parameters())
    print(f"CPU throughput, torch {torch.__version__}, {os.cpu_count()} logical CPUs, load average "
          f"{os.getloadavg()[0]:.2f} at start; training: batch {args.batch_size} x {args.seq_len} tokens, median of "
          f"{args.steps} interleaved steps after {args.warmup} warm-up; generation: {prompt.shape[0]} x 16-token "
          f"prompts, {args.new_tokens} new tokens, median of {args.repeats}; {n_params:,} parameters "
          f"({ours.num_parameters(active=True):,} active); transformers attention: {attn}; our experts: "
          f"{'per-expert loop' if args.expert_loop else 'ops.routed_experts (grouped/loop by rule)'}\n")
    print("| threads | precision | train ours tok/s | train transformers tok/s | train ratio "
          "| generate ours tok/s | generate transformers tok/s | generate ratio |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for threads in args.threads:
        torch.set_num_threads(threads)
        for precision in args.precisions:
            # fresh copies: training changes the weights, and the next row should start alike
            models = {"ours": copy.deepcopy(ours), "transformers": copy.deepcopy(theirs)}
            train = interleaved_tokens_per_second(models, batches, args.steps, args.warmup, precision)
            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            models = {name: copy.deepcopy(m).to(dtype).eval() for name, m in
                      (("ours", ours), ("transformers", theirs))}
            gen = interleaved_generation_tokens_per_second(models, prompt, args.new_tokens, args.repeats)
            (o_t, o_losses), (t_t, t_losses) = train["ours"], train["transformers"]
            (o_g, o_ids), (t_g, t_ids) = gen["ours"], gen["transformers"]
            print(f"| {threads} | {precision} | {o_t:,.0f} | {t_t:,.0f} | {o_t / t_t:.2f}x "
                  f"| {o_g:,.0f} | {t_g:,.0f} | {o_g / t_g:.2f}x |", flush=True)
            # same weights, same batches, same loop: the first losses must agree (a check, not a timing)
            if abs(o_losses[0] - t_losses[0]) > 2e-2 * abs(t_losses[0]):
                print(f"  first-step losses differ: ours {o_losses[0]:.4f}, transformers {t_losses[0]:.4f}")
            same = (o_ids == t_ids).float().mean().item()
            if precision == "fp32" and same < 1.0:
                print(f"  greedy tokens differ at {1 - same:.0%} of positions")
    print(f"\nload average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
