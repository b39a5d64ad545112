"""The multi-process half of assignment 14: data parallel (DDP), fully sharded (FSDP) and
expert-parallel training steps of a tiny DeepSeek, run by torchrun on one machine.

    torchrun --standalone --nproc_per_node 2 distributed_worker.py --out results/

Every rank runs the same file. Rank r of W takes rows [r*B/W, (r+1)*B/W) of each global batch
of B sequences; the notebook imports the same functions (make_model, global_batches,
train_single, ...) to train the single-process reference it compares against.

The backend is gloo, so it runs on CPUs; on GPUs one would pick nccl and one device per rank,
and nothing else below changes.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from deepseek_mini.corpus import stdlib_corpus
from deepseek_mini.model import DeepseekConfig, DeepseekModel
from deepseek_mini.moe import MoE, routed_experts

SEQ_LEN = 32
GLOBAL_BATCH = 8
LR = 3e-3


def tiny_config() -> DeepseekConfig:
    """Two layers (one dense, one MoE with 4 routed experts, top-2, one shared), bytes as tokens."""
    return DeepseekConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                          intermediate_size=128, first_k_dense_replace=1, n_routed_experts=4,
                          num_experts_per_tok=2, n_shared_experts=1, moe_intermediate_size=32,
                          max_position_embeddings=2 * SEQ_LEN)


def make_model(seed: int = 0) -> DeepseekModel:
    torch.manual_seed(seed)  # every rank builds the same initial weights
    return DeepseekModel(tiny_config())


def corpus_bytes(max_chars: int = 200_000) -> tuple[torch.Tensor, str]:
    """The Python standard library's source as a byte stream (token id = byte value)."""
    corpus = stdlib_corpus(max_chars=max_chars)
    data = "\n".join(corpus.documents).encode("utf-8")
    return torch.tensor(list(data), dtype=torch.long), corpus.source


def global_batches(tokens: torch.Tensor, steps: int, batch: int = GLOBAL_BATCH, seed: int = 0) -> list[torch.Tensor]:
    """`steps` global batches [batch, SEQ_LEN + 1] of windows at seeded random offsets."""
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - SEQ_LEN - 1, (steps, batch), generator=g)
    return [torch.stack([tokens[s:s + SEQ_LEN + 1] for s in row.tolist()]) for row in starts]


def rank_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    if batch.shape[0] % world_size:
        raise ValueError(f"a global batch of {batch.shape[0]} cannot be split evenly over {world_size} ranks")
    n = batch.shape[0] // world_size
    return batch[rank * n:(rank + 1) * n]


def lm_loss(model, rows: torch.Tensor) -> torch.Tensor:
    return model(rows, labels=rows).loss  # labels aligned with the inputs; the model shifts them


def train_single(model, batches) -> list[float]:
    """The reference: one process, the whole global batch per step."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for rows in batches:
        loss = lm_loss(model, rows)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def state_bytes(model, opt) -> dict:
    """Bytes this rank holds for parameters, gradients and AdamW state (only the local shard for
    FSDP's DTensors)."""
    local = lambda t: t.to_local() if hasattr(t, "to_local") else t  # noqa: E731
    params = [local(p) for p in model.parameters()]
    grads = [local(p.grad) for p in model.parameters() if p.grad is not None]
    states = [local(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim() > 0]
    size = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    return {"params": size(params), "grads": size(grads), "optimizer": size(states)}


def train_parallel(kind: str, batches, rank: int, world_size: int) -> dict:
    """Train with DDP or FSDP on this rank's rows of each global batch."""
    model = make_model()
    if kind == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        wrapped = DistributedDataParallel(model)  # broadcasts rank 0's weights, all-reduces grads
    else:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cpu", (world_size,))
        for layer in model.layers:  # shard each block, then what is left (embeddings, head)
            fully_shard(layer, mesh=mesh)
        wrapped = fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=LR)
    losses, start = [], time.perf_counter()
    for rows in batches:
        loss = lm_loss(wrapped, rank_rows(rows, rank, world_size))
        opt.zero_grad()
        loss.backward()
        opt.step()
        # the logged loss is the mean over all ranks, i.e. the global batch's loss
        logged = loss.detach().clone()
        dist.all_reduce(logged)
        losses.append(logged.item() / world_size)
    seconds = time.perf_counter() - start
    memory = state_bytes(model, opt)
    full = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}
    return {"losses": losses, "seconds": seconds, "bytes": memory, "state_dict": full}


# ----------------------------------------------------------------------------------------------
# Expert parallelism: each rank holds E/W of the routed experts
# ----------------------------------------------------------------------------------------------

def make_moe(seed: int = 1) -> MoE:
    torch.manual_seed(seed)
    return MoE(dim=64, moe_inter_dim=32, n_routed_experts=8, n_shared_experts=1, top_k=2)


def moe_inputs(seed: int = 2, tokens: int = 32) -> torch.Tensor:
    return torch.randn(tokens, 64, generator=torch.Generator().manual_seed(seed))


def expert_parallel_forward(moe: MoE, x: torch.Tensor, rank: int, world_size: int) -> tuple[torch.Tensor, list]:
    """moe(x) for this rank's tokens x [N, D], with the routed experts split over the ranks:
    rank r owns experts [r*E/W, (r+1)*E/W). Two all-to-alls: tokens out to their experts' ranks,
    results back. Returns the output [N, D] and how many (token, expert) pairs went to each rank."""
    E = moe.gate.n_experts
    per_rank = E // world_size
    topk_idx, topk_weight = moe.gate(x)
    pair_expert = topk_idx.reshape(-1)  # pair p = (token p // K, its k-th choice)
    pair_token = torch.arange(x.shape[0]).repeat_interleave(topk_idx.shape[1])
    dest = pair_expert // per_rank
    order = torch.argsort(dest, stable=True)
    send_counts = torch.bincount(dest, minlength=world_size)
    recv_counts = torch.empty_like(send_counts)
    dist.all_to_all_single(recv_counts, send_counts)  # first tell every rank how much is coming
    send_sizes, recv_sizes = send_counts.tolist(), recv_counts.tolist()

    x_in = torch.empty(sum(recv_sizes), x.shape[1])
    dist.all_to_all_single(x_in, x[pair_token[order]].contiguous(), recv_sizes, send_sizes)
    e_in = torch.empty(sum(recv_sizes), dtype=torch.long)
    dist.all_to_all_single(e_in, pair_expert[order].contiguous(), recv_sizes, send_sizes)

    lo = rank * per_rank  # run the local experts on what arrived, one expert per row (weight 1)
    w = moe.experts
    y_in = routed_experts(x_in, (e_in - lo)[:, None], torch.ones(len(e_in), 1),
                          w.gate_proj[lo:lo + per_rank], w.up_proj[lo:lo + per_rank], w.down_proj[lo:lo + per_rank])

    y_sorted = torch.empty(len(order), x.shape[1])
    dist.all_to_all_single(y_sorted, y_in.contiguous(), send_sizes, recv_sizes)  # results go home
    y_pairs = torch.empty_like(y_sorted)
    y_pairs[order] = y_sorted
    y = (y_pairs.view(x.shape[0], -1, x.shape[1]) * topk_weight[..., None]).sum(1)
    return y + moe.shared_experts(x), send_sizes


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="folder for results.json and the trained weights")
    parser.add_argument("--steps", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two ranks share two cores
    dist.init_process_group("gloo")
    rank, world_size = dist.get_rank(), dist.get_world_size()
    out = Path(args.out)
    tokens, source = corpus_bytes()
    batches = global_batches(tokens, args.steps)
    results = {"world_size": world_size, "data": source, "steps": args.steps}
    for kind in ("ddp", "fsdp"):
        run = train_parallel(kind, batches, rank, world_size)
        weights = run.pop("state_dict")
        if rank == 0:
            torch.save(weights, out / f"{kind}_weights.pt")
        bytes_all = [None] * world_size
        dist.all_gather_object(bytes_all, run["bytes"])
        run["bytes_per_rank"] = bytes_all
        results[kind] = run
        dist.barrier()

    moe = make_moe()
    x = rank_rows(moe_inputs(), rank, world_size)
    with torch.no_grad():
        y, sent = expert_parallel_forward(moe, x, rank, world_size)
    ys, sents = [None] * world_size, [None] * world_size
    dist.all_gather_object(ys, y)
    dist.all_gather_object(sents, sent)
    if rank == 0:
        torch.save(torch.cat(ys), out / "ep_output.pt")
        results["ep"] = {"pairs_sent": sents}  # pairs_sent[src][dst]
        (out / "results.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
    # gloo's threads sometimes abort the process while the interpreter shuts down ("terminate
    # called without an active exception", about 1 run in 10), after the results are written.
    # Everything is saved and the group is destroyed, so leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
