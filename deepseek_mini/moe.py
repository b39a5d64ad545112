"""DeepSeekMoE: a gate picks a few fine-grained routed experts per token; shared experts see all.

Read top to bottom:
  1. `routed_experts`: the reference computation of the routed part, one expert at a time
     (the fused Triton kernel in `kernels/fused_moe.py` is tested against it).
  2. `Gate`: scores every expert for every token and keeps the top-k, with the variants of
     DeepSeek-V2 and V3 (Hugging Face's names):
       scoring_func  "softmax" (V2) or "sigmoid" (V3)
       topk_method   "greedy"                plain top-k of the scores (V2)
                     "group_limited_greedy"  experts are split into n_group groups; keep the
                                             topk_group groups whose best expert scores highest,
                                             then top-k inside them (V2)
                     "noaux_tc"              V3: a group's score is the sum of its two best
                                             experts, and selection uses score + bias, where the
                                             bias (e_score_correction_bias) balances the load
                                             without an auxiliary loss; the weights themselves
                                             come from the unbiased scores
       norm_topk_prob  rescale the k weights to sum to 1 (V3; transformers' V2 never does)
       routed_scaling_factor  multiplies the weights at the end
     Training helpers: `update_bias` (the aux-loss-free rule, fed with `expert_load`) and an
     optional auxiliary load-balancing loss (`aux_loss_alpha`, `Gate.balance_loss`).
  3. `Experts`: the routed experts' weights, stacked [E, ...] like transformers 5.x.
  4. `MoE`: gate + routed experts + shared experts, with an optional expert capacity
     (`apply_capacity`: slots beyond an expert's capacity are dropped); `return_aux_loss=True`
     also returns the balance loss (`model.Block` passes it on, the model adds it to its loss).
Nothing is kept from one forward to the next: a gate returns its decisions, and a forward hook
on it records them (`model.record_routing`, `viz.routing`).
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter

from deepseek_mini import ops
from deepseek_mini.layers import MLP, swiglu_reference


# ----------------------------------------------------------------------------------------------
# 1. The routed experts, one at a time
# ----------------------------------------------------------------------------------------------

def routed_experts(x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor,
                   gate_proj: torch.Tensor, up_proj: torch.Tensor, down_proj: torch.Tensor) -> torch.Tensor:
    """y[n] = sum_k topk_weight[n, k] * expert_{topk_idx[n, k]}(x[n]).

    x [N, D]; topk_idx [N, K] int64 expert ids; topk_weight [N, K]; gate_proj, up_proj [E, I, D];
    down_proj [E, D, I]; expert e(x) = down_e(silu(gate_e x) * up_e x). Returns [N, D] in x's dtype.
    This is the reference loop, whatever the device; `ops.routed_experts` picks the fused kernel
    on CUDA and the faster of the two references on CPU.
    """
    check_routed_experts(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj)
    return routed_experts_loop(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj)


def check_routed_experts(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj):
    """Raise a clear error unless the inputs fit the contract of routed_experts."""
    if x.dim() != 2:
        raise ValueError(f"routed_experts: x must be [tokens, dim], got shape {tuple(x.shape)}")
    N, D = x.shape
    if gate_proj.dim() != 3 or gate_proj.shape[2] != D:
        raise ValueError(f"routed_experts: gate_proj must be [experts, inter, {D}], got {tuple(gate_proj.shape)}")
    E, I = gate_proj.shape[:2]
    if up_proj.shape != (E, I, D):
        raise ValueError(f"routed_experts: up_proj has shape {tuple(up_proj.shape)}, expected {(E, I, D)}")
    if down_proj.shape != (E, D, I):
        raise ValueError(f"routed_experts: down_proj has shape {tuple(down_proj.shape)}, expected {(E, D, I)}")
    if topk_idx.dim() != 2 or topk_idx.shape[0] != N:
        raise ValueError(f"routed_experts: topk_idx must be [{N}, K], got {tuple(topk_idx.shape)}")
    if topk_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"routed_experts: topk_idx must be int64 (or int32), got {topk_idx.dtype}")
    if topk_weight.shape != topk_idx.shape:
        raise ValueError(f"routed_experts: topk_weight has shape {tuple(topk_weight.shape)}, "
                         f"expected {tuple(topk_idx.shape)} like topk_idx")
    if topk_idx.numel() and (int(topk_idx.min()) < 0 or int(topk_idx.max()) >= E):
        raise ValueError(f"routed_experts: topk_idx values must lie in [0, {E}), got "
                         f"[{int(topk_idx.min())}, {int(topk_idx.max())}]")


def routed_experts_loop(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj):
    """One expert at a time: gather its tokens, run its MLP, add the weighted result back."""
    y = torch.zeros_like(x)
    for e in torch.unique(topk_idx).tolist():  # only the experts some token picked
        token, slot = torch.where(topk_idx == e)
        h = x[token]
        out = F.linear(swiglu_reference(F.linear(h, gate_proj[e]), F.linear(h, up_proj[e])), down_proj[e])
        y.index_add_(0, token, (out * topk_weight[token, slot, None]).to(y.dtype))
    return y


def _grouped_mm_flops(a_shape, b_shape, *args, **kwargs) -> int:
    """FLOPs of torch._grouped_mm, which torch's FlopCounterMode does not count by itself (a model
    on the grouped experts would look cheaper than on the loop). Groups split the rows of a 2-D
    operand, so each operand element meets the other's columns of its own group only."""
    if len(a_shape) == 2 and len(b_shape) == 3:   # [M, K] x [E, K, N]: each row through its expert
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:   # [K, M] x [M, N] -> [E, K, N]: weight gradients
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(b_shape) == 2:                         # [E, M, K] x [K, N]
        return 2 * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]  # [E, M, K] x [E, K, N]


if hasattr(torch.ops.aten, "_grouped_mm") and not any("_grouped_mm" in str(op) for op in flop_counter.flop_registry):
    flop_counter.register_flop_formula(torch.ops.aten._grouped_mm)(_grouped_mm_flops)


def grouped_supported(x, gate_proj, up_proj, down_proj) -> bool:
    """Can torch._grouped_mm run these experts? It takes one dtype among float32, bfloat16 and
    float16 (not float64), and rows a multiple of 16 bytes long (dim and inter sizes); the
    weights must be contiguous. Torch versions without it say no."""
    tensors = (x, gate_proj, up_proj, down_proj)
    if not hasattr(torch, "_grouped_mm") or len({t.dtype for t in tensors}) > 1:
        return False
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return False
    rows_aligned = all(n * x.element_size() % 16 == 0 for n in (x.shape[1], gate_proj.shape[1]))
    return rows_aligned and all(w.is_contiguous() for w in tensors[1:])


def routed_experts_grouped(x, topk_idx, topk_weight, gate_proj, up_proj, down_proj):
    """All experts in three grouped matmuls: sort the (token, slot) pairs by expert, so that each
    expert's rows are one contiguous run, and let `torch._grouped_mm` run every expert's matmul
    on its run in one call (no Python loop over experts). Same result as routed_experts_loop."""
    K = topk_idx.shape[1]
    order = topk_idx.flatten().argsort(stable=True)       # pairs grouped by expert
    token = order // K                                    # pair p = token * K + slot
    counts = torch.bincount(topk_idx.flatten(), minlength=gate_proj.shape[0])
    ends = counts.cumsum(0).to(torch.int32)               # where each expert's run ends
    h = x[token]
    gate = torch._grouped_mm(h, gate_proj.transpose(1, 2), offs=ends)
    up = torch._grouped_mm(h, up_proj.transpose(1, 2), offs=ends)
    out = torch._grouped_mm(swiglu_reference(gate, up), down_proj.transpose(1, 2), offs=ends)
    weight = topk_weight.flatten()[order, None]
    return torch.zeros_like(x).index_add_(0, token, (out * weight).to(x.dtype))


# ----------------------------------------------------------------------------------------------
# 2. The gate
# ----------------------------------------------------------------------------------------------

SCORING_FUNCS = ("softmax", "sigmoid")
TOPK_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


class Gate(nn.Module):
    """Routes each token to `top_k` of `n_experts` experts: forward(x [N, D]) -> (topk_idx, topk_weight)."""

    def __init__(self, dim: int, n_experts: int, top_k: int, *, scoring_func: str = "sigmoid",
                 topk_method: str = "noaux_tc", n_group: int = 1, topk_group: int = 1,
                 norm_topk_prob: bool = True, routed_scaling_factor: float = 1.0,
                 aux_loss_alpha: float = 0.0):
        super().__init__()
        if scoring_func not in SCORING_FUNCS:
            raise ValueError(f"Gate: scoring_func must be one of {SCORING_FUNCS}, got {scoring_func!r}")
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"Gate: topk_method must be one of {TOPK_METHODS}, got {topk_method!r}")
        if not 1 <= top_k <= n_experts:
            raise ValueError(f"Gate: top_k must be in [1, n_experts={n_experts}], got {top_k}")
        grouped = topk_method != "greedy"
        if grouped:
            if n_group < 1 or n_experts % n_group:
                raise ValueError(f"Gate: n_group ({n_group}) must divide n_experts ({n_experts})")
            if not 1 <= topk_group <= n_group:
                raise ValueError(f"Gate: topk_group must be in [1, n_group={n_group}], got {topk_group}")
            if topk_method == "noaux_tc" and n_experts // n_group < 2:
                raise ValueError(f"Gate: noaux_tc scores a group by its 2 best experts, so each group needs "
                                 f">= 2 experts (n_experts={n_experts}, n_group={n_group})")
        self.n_experts, self.top_k = n_experts, top_k
        self.scoring_func, self.topk_method = scoring_func, topk_method
        self.n_group, self.topk_group = n_group, topk_group
        self.norm_topk_prob, self.routed_scaling_factor = norm_topk_prob, routed_scaling_factor
        self.aux_loss_alpha = aux_loss_alpha
        self.weight = nn.Parameter(torch.empty(n_experts, dim))
        nn.init.normal_(self.weight, std=0.02)
        if topk_method == "noaux_tc":
            # a buffer, not a parameter: it is moved by `update_bias`, never by the optimizer
            self.register_buffer("e_score_correction_bias", torch.zeros(n_experts, dtype=torch.float32))

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """Every expert's score for every token, [N, E]: softmax or sigmoid of x @ weight^T."""
        if x.dim() != 2 or x.shape[1] != self.weight.shape[1]:
            raise ValueError(f"Gate: x must be [tokens, {self.weight.shape[1]}], got {tuple(x.shape)}")
        # Routing decisions are made in float32 (or float64) whatever the model dtype.
        compute = torch.promote_types(x.dtype, torch.float32)
        logits = F.linear(x.to(compute), self.weight.to(compute))
        return logits.softmax(dim=-1) if self.scoring_func == "softmax" else logits.sigmoid()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scores = self.scores(x)
        N, E, G = x.shape[0], self.n_experts, self.n_group

        if self.topk_method == "greedy":
            topk_weight, topk_idx = scores.topk(self.top_k, dim=-1, sorted=False)
        elif self.topk_method == "group_limited_greedy":
            group_scores = scores.view(N, G, E // G).amax(dim=-1)
            masked = scores.masked_fill(self._group_mask(group_scores) == 0, 0.0)  # other groups -> 0
            topk_weight, topk_idx = masked.topk(self.top_k, dim=-1, sorted=False)
        else:  # noaux_tc
            choice = scores + self.e_score_correction_bias
            group_scores = choice.view(N, G, E // G).topk(2, dim=-1)[0].sum(dim=-1)
            choice = choice.masked_fill(self._group_mask(group_scores) == 0, float("-inf"))
            topk_idx = choice.topk(self.top_k, dim=-1, sorted=False)[1]
            topk_weight = scores.gather(1, topk_idx)  # the bias picks, the plain score weighs

        if self.norm_topk_prob:
            topk_weight = topk_weight / (topk_weight.sum(dim=-1, keepdim=True) + 1e-20)
        topk_weight = topk_weight * self.routed_scaling_factor
        return topk_idx, topk_weight

    def balance_loss(self, x: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor | None:
        """aux_loss_alpha * load_balancing_loss for the tokens x [N, D] routed to topk_idx [N, k]
        (None when aux_loss_alpha is 0). The scores are computed again: one small matmul, and only
        when the loss is on, which keeps `forward`'s output the plain (ids, weights) pair."""
        if self.aux_loss_alpha == 0:
            return None
        return load_balancing_loss(self.scores(x), topk_idx, self.n_experts) * self.aux_loss_alpha

    def _apply(self, fn, recurse=True):
        # Like transformers, keep the correction bias in float32 when the model is cast to bf16/fp16:
        # its small differences decide which experts win. (Device moves still apply.)
        bias = getattr(self, "e_score_correction_bias", None)
        super()._apply(fn, recurse)
        if bias is not None:
            self.e_score_correction_bias = bias.to(self.weight.device)
        return self

    def _group_mask(self, group_scores: torch.Tensor) -> torch.Tensor:
        """[N, E] float mask: 1 for experts in each token's topk_group best groups."""
        N, G = group_scores.shape
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores).scatter_(1, best, 1.0)
        return mask.repeat_interleave(self.n_experts // G, dim=1)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, speed: float = 1e-3) -> None:
        """DeepSeek-V3's aux-loss-free balancing: after a training step, raise the bias of
        under-loaded experts and lower it for over-loaded ones by `speed`. load [n_experts]:
        tokens per expert in that step (`expert_load` of the gate's topk_idx)."""
        if self.topk_method != "noaux_tc":
            raise ValueError(f"Gate.update_bias: only topk_method='noaux_tc' has a correction bias, "
                             f"this gate uses {self.topk_method!r}")
        if load.shape != (self.n_experts,):
            raise ValueError(f"Gate.update_bias: load must be [{self.n_experts}], got {tuple(load.shape)}")
        load = load.float().to(self.e_score_correction_bias.device)
        self.e_score_correction_bias += speed * torch.sign(load.mean() - load)


def expert_load(topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many routed slots went to each expert, [n_experts] (topk_idx: a gate's [N, k] choices)."""
    return torch.bincount(topk_idx.flatten(), minlength=n_experts)


def load_balancing_loss(scores: torch.Tensor, topk_idx: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch/DeepSeek-style auxiliary loss: E * sum_e f_e * P_e, where f_e is the fraction of
    routed slots that went to expert e and P_e its mean (normalised) score. Equal to 1 when the
    load is perfectly even; larger when the gate favours a few experts."""
    probs = scores / scores.sum(dim=-1, keepdim=True)
    fraction = expert_load(topk_idx, n_experts).float() / topk_idx.numel()
    return n_experts * (fraction * probs.mean(dim=0)).sum()


def apply_capacity(topk_idx: torch.Tensor, topk_weight: torch.Tensor, n_experts: int,
                   capacity_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert capacity (GShard / Switch Transformer): each expert takes at most
    ceil(capacity_factor * N * K / n_experts) of the N*K routed slots, first come (token order,
    then slot) first served; the slots over capacity are dropped, i.e. get weight 0 (the token
    still has the shared experts and the residual). Returns (topk_weight with drops zeroed,
    dropped mask [N, K]). DeepSeek-V3 itself drops no tokens; this is for experiments."""
    if capacity_factor <= 0:
        raise ValueError(f"apply_capacity: capacity_factor must be > 0, got {capacity_factor}")
    capacity = math.ceil(capacity_factor * topk_idx.numel() / n_experts)
    onehot = F.one_hot(topk_idx.flatten(), n_experts)                # [N*K, E], row-major = token order
    position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1) - 1        # rank of each slot in its expert's queue
    dropped = (position >= capacity).view(topk_idx.shape)
    return topk_weight.masked_fill(dropped, 0.0), dropped


# ----------------------------------------------------------------------------------------------
# 3. Stacked routed experts
# ----------------------------------------------------------------------------------------------

class Experts(nn.Module):
    """E SwiGLU experts stored as 3-D weights: gate_proj, up_proj [E, I, D]; down_proj [E, D, I]."""

    def __init__(self, n_experts: int, dim: int, inter_dim: int):
        super().__init__()
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter_dim, dim))
        self.down_proj = nn.Parameter(torch.empty(n_experts, dim, inter_dim))
        for w in (self.gate_proj, self.up_proj, self.down_proj):
            nn.init.normal_(w, std=0.02)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        return ops.routed_experts(x, topk_idx, topk_weight, self.gate_proj, self.up_proj, self.down_proj)


# ----------------------------------------------------------------------------------------------
# 4. The MoE layer
# ----------------------------------------------------------------------------------------------

class MoE(nn.Module):
    """y = routed experts (weighted by the gate) + shared experts (every token), same shape as x."""

    def __init__(self, dim: int, moe_inter_dim: int, n_routed_experts: int, n_shared_experts: int,
                 top_k: int, capacity_factor: float | None = None, **gate_kwargs):
        super().__init__()
        self.capacity_factor = capacity_factor  # None: no token is ever dropped (DeepSeek-V3)
        self.gate = Gate(dim, n_routed_experts, top_k, **gate_kwargs)
        self.experts = Experts(n_routed_experts, dim, moe_inter_dim)
        # the shared experts are one MLP as wide as all of them together (as in HF / DeepSeek)
        self.shared_experts = MLP(dim, moe_inter_dim * n_shared_experts) if n_shared_experts else None

    def forward(self, x: torch.Tensor, return_aux_loss: bool = False):
        """y [..., D] like x; with return_aux_loss, (y, the gate's balance loss in training or None)."""
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        topk_idx, topk_weight = self.gate(flat)
        if self.capacity_factor is not None:
            topk_weight, _ = apply_capacity(topk_idx, topk_weight, self.gate.n_experts, self.capacity_factor)
        y = self.experts(flat, topk_idx, topk_weight).view(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if not return_aux_loss:
            return y
        return y, (self.gate.balance_loss(flat, topk_idx) if self.training else None)
