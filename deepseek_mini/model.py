"""A DeepSeek-V3 (and V2) language model in plain PyTorch, readable top to bottom.

    tokens -> embed_tokens -> N x Block -> norm -> lm_head -> logits

    Block(x):  x = x + self_attn(input_layernorm(x))          Multi-head Latent Attention
               x = x + mlp(post_attention_layernorm(x))      dense MLP (first_k_dense_replace
                                                             layers) or DeepSeekMoE
Module and parameter names follow Hugging Face transformers (`self_attn.q_a_proj`, `mlp.gate`,
...), so checkpoints map one to one (see `hf.py`) and LoRA can target modules by name.

Conventions:
  * `model(input_ids)` returns logits [batch, seq, vocab].
  * `model(input_ids, labels=labels)` returns an `LMOutput` with `.loss` (`causal_lm_loss`:
    next-token cross entropy, labels shifted inside like transformers, -100 ignored; plus the
    blocks' auxiliary balance loss when `aux_loss_alpha > 0` in training, also in `.aux_loss`)
    and `.logits`.
  * Inputs are checked once, in `check_inputs`: shapes and dtypes always, token values only on
    the CPU (reading a GPU tensor's values would stall every decoding step).
  * `model.generate(input_ids, max_new_tokens, temperature=0.0, top_k=None, top_p=None)`:
    temperature 0 is greedy; the KV cache makes each new token one short forward.
  * `model.gradient_checkpointing_enable()` recomputes each block in the backward pass.
  * Nothing is kept from one forward to the next. `with record_routing(model) as routing:`
    records the gates' choices through forward hooks (`viz.routing` and `viz.AttentionWeights`
    for plots); `model.update_expert_biases(routing, speed)` after an optimizer step is
    DeepSeek-V3's aux-loss-free load balancing.
  * `model.num_parameters(active=True)` counts the parameters one token uses.
  * Padding masks are not supported: a batch holds sequences of equal length.
"""

import dataclasses
import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from deepseek_mini.attention import KVCache, MultiHeadLatentAttention, kv_cache_bytes_per_token
from deepseek_mini.layers import MLP, RMSNorm
from deepseek_mini.moe import SCORING_FUNCS, TOPK_METHODS, Experts, Gate, MoE, expert_load
from deepseek_mini.rope import precompute_rope, rope_type, softmax_scale


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass
class DeepseekConfig:
    """Hyper-parameters, with Hugging Face's DeepSeek-V3 field names. The defaults describe a
    tiny model that trains on a laptop CPU; `deepseek_v3()` / `deepseek_v2_lite()` give the real
    sizes (for parameter counts and KV-cache arithmetic, not for instantiating on a laptop)."""

    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 192           # dense MLP width (first_k_dense_replace layers)
    moe_intermediate_size: int = 32        # width of each routed / shared expert
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    # Never read: MLA gives every head its own K/V. Kept because the config.json files of cached
    # pretrained models (`pretrained.py`) hold it and are loaded with DeepseekConfig(**json).
    num_key_value_heads: int | None = None
    # Multi-head Latent Attention
    q_lora_rank: int | None = 32           # None: queries straight from x (q_proj)
    kv_lora_rank: int = 32
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    # DeepSeekMoE
    n_routed_experts: int | None = 8       # None or 0: every layer is dense
    n_shared_experts: int | None = 1
    num_experts_per_tok: int = 2
    n_group: int | None = 1
    topk_group: int | None = 1
    scoring_func: str = "sigmoid"          # "sigmoid" (V3) or "softmax" (V2)
    topk_method: str = "noaux_tc"          # "noaux_tc" (V3), "greedy" / "group_limited_greedy" (V2)
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    first_k_dense_replace: int = 1         # the first k layers use a dense MLP
    moe_layer_freq: int = 1
    aux_loss_alpha: float = 0.0            # auxiliary balance loss weight (training only)
    num_nextn_predict_layers: int = 0      # DeepSeek-V3's multi-token-prediction depth (deepseek_mini.mtp)
    # positions
    max_position_embeddings: int = 1024
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None       # YaRN: {"rope_type": "yarn", "factor": ..., ...}
    rope_interleave: bool = True
    # the rest
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    attention_bias: bool = False
    attention_dropout: float = 0.0
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 1
    pad_token_id: int | None = None
    # not Hugging Face fields: how this library runs the model
    absorb_mla: bool = False               # run MLA in the absorbed form (latent-only cache)
    capacity_factor: float | None = None   # expert capacity for experiments (None: drop nothing)

    def __post_init__(self):
        # Checked once here, so a bad value fails with its name instead of as a shape error or
        # NaN logits deep in the forward pass (which stays free of checks).
        def bad(name, expected):
            raise ValueError(f"DeepseekConfig.{name}={getattr(self, name)!r}: expected {expected}")

        def is_int(value):  # bool is an int to Python, never a size here
            return isinstance(value, int) and not isinstance(value, bool)

        def is_real(value):
            return is_int(value) or (isinstance(value, float) and math.isfinite(value))

        def require(names, ok, expected, optional=False):
            for name in names:
                value = getattr(self, name)
                if not (optional and value is None) and not ok(value):
                    bad(name, expected + (" or None" if optional else ""))

        positive_int = lambda v: is_int(v) and v > 0  # noqa: E731
        int_at_least_0 = lambda v: is_int(v) and v >= 0  # noqa: E731
        positive_real = lambda v: is_real(v) and v > 0  # noqa: E731
        require(("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings"), positive_int,
                "a positive int")
        require(("qk_nope_head_dim",), int_at_least_0, "an int >= 0")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "an even number (RoPE rotates pairs)")
        require(("q_lora_rank", "num_key_value_heads"), positive_int, "a positive int", optional=True)
        require(("n_routed_experts", "n_shared_experts"), int_at_least_0, "an int >= 0", optional=True)
        require(("rope_theta", "rms_norm_eps", "routed_scaling_factor"), positive_real, "a finite number > 0")
        require(("aux_loss_alpha", "initializer_range"), lambda v: is_real(v) and v >= 0, "a finite number >= 0")
        require(("capacity_factor",), positive_real, "a finite number > 0", optional=True)
        require(("norm_topk_prob", "rope_interleave", "attention_bias", "tie_word_embeddings", "absorb_mla"),
                lambda v: isinstance(v, bool), "True or False")
        require(("first_k_dense_replace", "num_nextn_predict_layers"), int_at_least_0, "an int >= 0")
        if self.hidden_act != "silu":
            bad("hidden_act", "'silu' (the only activation DeepSeek uses)")
        if self.attention_dropout:
            bad("attention_dropout", "0.0 (attention dropout is not implemented)")
        rope_type(self.rope_scaling)  # raises on unsupported scaling
        if self.n_routed_experts:
            require(("moe_intermediate_size",), positive_int, "a positive int")
            if self.scoring_func not in SCORING_FUNCS:
                bad("scoring_func", f"one of {SCORING_FUNCS}")
            if self.topk_method not in TOPK_METHODS:
                bad("topk_method", f"one of {TOPK_METHODS}")
            if not is_int(self.num_experts_per_tok) or not 1 <= self.num_experts_per_tok <= self.n_routed_experts:
                bad("num_experts_per_tok", f"an int in [1, n_routed_experts={self.n_routed_experts}]")
            require(("n_group", "topk_group"), positive_int, "a positive int", optional=True)
            if self.topk_method != "greedy":
                n_group, topk_group = self.n_group or 1, self.topk_group or 1
                if self.n_routed_experts % n_group:
                    bad("n_group", f"a divisor of n_routed_experts={self.n_routed_experts}")
                if not 1 <= topk_group <= n_group:
                    bad("topk_group", f"an int in [1, n_group={n_group}]")
            if self.moe_layer_freq != 1:
                bad("moe_layer_freq", "1 (every layer after first_k_dense_replace is MoE)")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.n_routed_experts) and layer_idx >= self.first_k_dense_replace

    def replace(self, **changes) -> "DeepseekConfig":
        return dataclasses.replace(self, **changes)

    @classmethod
    def deepseek_v3(cls) -> "DeepseekConfig":
        """DeepSeek-V3 / R1 (671B total, 37B active; the extra multi-token-prediction module is not included)."""
        return cls(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_hidden_layers=61, num_attention_heads=128, q_lora_rank=1536, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=256,
                   n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
                   first_k_dense_replace=3, max_position_embeddings=163840,
                   rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})

    @classmethod
    def deepseek_v2_lite(cls) -> "DeepseekConfig":
        """DeepSeek-V2-Lite (15.7B total, 2.4B active)."""
        return cls(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                   num_hidden_layers=27, num_attention_heads=16, q_lora_rank=None, kv_lora_rank=512,
                   qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                   n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1, scoring_func="softmax",
                   topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0,
                   first_k_dense_replace=1, max_position_embeddings=163840, bos_token_id=100000,
                   eos_token_id=100001,
                   rope_scaling={"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
                                 "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})


# ----------------------------------------------------------------------------------------------
# The transformer block
# ----------------------------------------------------------------------------------------------

def attention_from_config(config: DeepseekConfig) -> MultiHeadLatentAttention:
    """One block's Multi-head Latent Attention, sized and configured by the config."""
    return MultiHeadLatentAttention(
        config.hidden_size, config.num_attention_heads, config.kv_lora_rank, config.qk_nope_head_dim,
        config.qk_rope_head_dim, config.v_head_dim, q_lora_rank=config.q_lora_rank,
        softmax_scale=softmax_scale(config.qk_head_dim, config.rope_scaling),
        rope_interleaved=config.rope_interleave, bias=config.attention_bias, absorb=config.absorb_mla)


def moe_from_config(config: DeepseekConfig) -> MoE:
    """One block's DeepSeekMoE layer (gate, routed and shared experts), configured by the config."""
    return MoE(config.hidden_size, config.moe_intermediate_size, config.n_routed_experts,
               config.n_shared_experts or 0, config.num_experts_per_tok,
               scoring_func=config.scoring_func, topk_method=config.topk_method,
               n_group=config.n_group or 1, topk_group=config.topk_group or 1,
               norm_topk_prob=config.norm_topk_prob, routed_scaling_factor=config.routed_scaling_factor,
               aux_loss_alpha=config.aux_loss_alpha, capacity_factor=config.capacity_factor)


class Block(nn.Module):
    def __init__(self, config: DeepseekConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = attention_from_config(config)
        if config.is_moe_layer(layer_idx):
            self.mlp = moe_from_config(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, cos, sin, cache: KVCache | None = None):
        """(the new residual stream [B, S, D], the MoE's auxiliary balance loss or None)."""
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer_idx=self.layer_idx)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoE):
            y, aux_loss = self.mlp(h, return_aux_loss=True)
        else:
            y, aux_loss = self.mlp(h), None
        return x + y, aux_loss


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token cross-entropy, Hugging Face convention: labels are aligned with the inputs,
    position t predicts labels[t + 1]; positions labelled -100 are ignored. Computed in float32
    at least (bf16 logits lose too much in the log-softmax)."""
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"causal_lm_loss: logits must be [batch, seq, vocab] and labels [batch, seq]; "
                         f"got logits {tuple(logits.shape)}, labels {tuple(labels.shape)}")
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    targets = labels[:, 1:]
    # a value check: on the CPU only, where it costs no wait for a GPU (there, the loss is NaN)
    if targets.device.type == "cpu" and not (targets != ignore_index).any():
        raise ValueError("causal_lm_loss: every label is ignore_index; nothing to learn from this batch")
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)


def check_inputs(config: DeepseekConfig, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None) -> None:
    """What `DeepseekModel.forward` accepts, checked once at the door. Types and shapes are
    free to check; values only on the CPU: on a GPU, `.min()`, `.all()`, ... make the host wait
    for the device at every decoding step. (An id out of range there fails in the embedding.)"""
    if not isinstance(input_ids, torch.Tensor):
        raise ValueError(f"input_ids must be an int64 tensor [batch, seq], got {type(input_ids).__name__}")
    if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be an int64 tensor [batch, seq], got {input_ids.dtype} "
                         f"of shape {tuple(input_ids.shape)}")
    if labels is not None and labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}, "
                         f"got {tuple(attention_mask.shape)}")
    if input_ids.device.type != "cpu":
        return
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(f"input_ids must lie in [0, vocab_size={config.vocab_size}), got "
                         f"[{int(input_ids.min())}, {int(input_ids.max())}]")
    if attention_mask is not None and not bool((attention_mask == 1).all()):
        raise ValueError("attention_mask with padding (zeros) is not supported: pass sequences of equal length "
                         "(an all-ones mask, or None, is fine)")


@dataclass
class LMOutput:
    """What `DeepseekModel.forward` returns when labels are given."""
    loss: torch.Tensor
    logits: torch.Tensor
    aux_loss: torch.Tensor | None = None


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class DeepseekModel(nn.Module):
    """DeepSeek-V3/V2 causal language model (see the module docstring for the conventions)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if config.num_nextn_predict_layers:  # extra modules trained to predict tokens further ahead
            from deepseek_mini.mtp import MultiTokenPrediction
            self.mtp = MultiTokenPrediction(config)
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        self._rope_len = 0
        self._extend_rope(min(config.max_position_embeddings, 4096))

    def gradient_checkpointing_enable(self):
        """Recompute each block's activations in the backward pass (less memory, ~30% more compute)."""
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self):
        self.gradient_checkpointing = False

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, Experts):
            for w in (module.gate_proj, module.up_proj, module.down_proj):
                nn.init.normal_(w, std=std)
        elif isinstance(module, Gate):
            nn.init.normal_(module.weight, std=std)

    def _extend_rope(self, length: int):
        """(Re)build the cos/sin tables so positions [0, length) exist."""
        if length <= self._rope_len:
            return
        scaling = self.config.rope_scaling
        if rope_type(scaling) == "yarn":  # YaRN's ramp depends on the pretraining length
            scaling = {"original_max_position_embeddings": self.config.max_position_embeddings, **scaling}
        cos, sin = precompute_rope(self.config.qk_rope_head_dim, length, self.config.rope_theta, scaling)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._rope_len = length

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, cache: KVCache | None = None,
                attention_mask: torch.Tensor | None = None):
        check_inputs(self.config, input_ids, labels, attention_mask)
        x, aux_loss = self.hidden_states(input_ids, cache)
        logits = self.lm_head(self.norm(x))
        if labels is None:
            return logits
        loss = causal_lm_loss(logits, labels)
        return LMOutput(loss=loss if aux_loss is None else loss + aux_loss, logits=logits, aux_loss=aux_loss)

    def hidden_states(self, input_ids: torch.Tensor, cache: KVCache | None = None):
        """Embedding, then every block: (the last hidden state [B, S, D], before the final norm;
        the sum of the blocks' auxiliary losses, None when no gate has one)."""
        start = cache.seq_len() if cache is not None else 0
        cos, sin = self.rope_tables(start, input_ids.shape[1], input_ids.device)
        x, aux_loss = self.embed_tokens(input_ids), None
        for layer in self.layers:
            if self.gradient_checkpointing and self.training and cache is None:
                x, aux = checkpoint(layer, x, cos, sin, use_reentrant=False)
            else:
                x, aux = layer(x, cos, sin, cache)
            if aux is not None:
                aux_loss = aux if aux_loss is None else aux_loss + aux
        return x, aux_loss

    def rope_tables(self, start: int, length: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [length, rope dim] for positions start .. start + length - 1."""
        if self._rope_len < start + length:
            self._extend_rope(max(start + length, 2 * self._rope_len))
        return self.rope_cos[start:start + length].to(device), self.rope_sin[start:start + length].to(device)

    # ------------------------------------------------------------------------------------------
    # Generation
    # ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, eos_token_id: int | None = None,
                 generator: torch.Generator | None = None, use_cache: bool = True) -> torch.Tensor:
        """Append up to max_new_tokens tokens to input_ids [batch, seq] and return [batch, seq + new].

        temperature 0 picks the most likely token (greedy); otherwise sample from
        softmax(logits / temperature), restricted to the top_k tokens and/or the smallest set whose
        probability reaches top_p. Sequences that produced eos_token_id keep producing it; the loop
        stops early once all have. use_cache=False recomputes the whole sequence at every step
        (same tokens, much slower: what the KV cache saves).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.config.vocab_size:
            raise ValueError(f"top_k must be in [1, vocab_size={self.config.vocab_size}], got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        cache = KVCache() if use_cache else None
        out = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        logits = self(input_ids, cache=cache)[:, -1]
        for _ in range(max_new_tokens):
            next_token = sample_next_token(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                next_token = torch.where(done, torch.full_like(next_token, eos_token_id), next_token)
                done = done | (next_token == eos_token_id)
            out = torch.cat((out, next_token[:, None]), dim=1)
            if eos_token_id is not None and done.all():
                break
            logits = self(next_token[:, None], cache=cache)[:, -1] if use_cache else self(out)[:, -1]
        return out

    # ------------------------------------------------------------------------------------------
    # Introspection
    # ------------------------------------------------------------------------------------------

    def moe_gates(self) -> dict[int, Gate]:
        """{layer index: gate} of the MoE layers."""
        return {layer.layer_idx: layer.mlp.gate for layer in self.layers if isinstance(layer.mlp, MoE)}

    @torch.no_grad()
    def update_expert_biases(self, routing: dict[int, list["Routing"]], speed: float = 1e-3) -> None:
        """Aux-loss-free load balancing: after an optimizer step, nudge every noaux_tc gate's
        correction bias toward an even load, the load being what `record_routing` recorded
        during that step's forward(s) (see `Gate.update_bias`)."""
        for i, gate in self.moe_gates().items():
            if gate.topk_method == "noaux_tc" and routing.get(i):
                topk_idx = torch.cat([r.topk_idx.flatten() for r in routing[i]])
                gate.update_bias(expert_load(topk_idx, gate.n_experts), speed)

    def num_parameters(self, active: bool = False, exclude_embeddings: bool = False) -> int:
        """Parameter count. active=True counts what ONE token uses: of each MoE layer's routed
        experts only num_experts_per_tok are active. exclude_embeddings drops the input embedding
        (and the LM head when it is not tied to it)."""
        params = {id(p): p for p in self.parameters()}  # tied weights count once
        total = sum(p.numel() for p in params.values())
        if exclude_embeddings:
            total -= self.embed_tokens.weight.numel()
            if self.lm_head.weight is not self.embed_tokens.weight:
                total -= self.lm_head.weight.numel()
        if active:
            cfg = self.config
            for layer in self.layers:
                if isinstance(layer.mlp, MoE):
                    e = layer.mlp.experts
                    routed = e.gate_proj.numel() + e.up_proj.numel() + e.down_proj.numel()
                    total -= routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
        return total


class Routing(NamedTuple):
    """One gate call's decisions: expert ids and gate weights, both [tokens, k]."""
    topk_idx: torch.Tensor
    topk_weight: torch.Tensor


@contextmanager
def record_routing(model: DeepseekModel):
    """`with record_routing(model) as routing: model(...)` fills routing = {layer index: [Routing
    per gate call]} through forward hooks on the MoE gates (one call per forward; a second under
    gradient checkpointing, which runs the block again in backward). The hooks go at exit."""
    routing = {i: [] for i in model.moe_gates()}

    def hook(i):
        return lambda gate, args, out: routing[i].append(Routing(out[0].detach(), out[1].detach()))

    handles = [gate.register_forward_hook(hook(i)) for i, gate in model.moe_gates().items()]
    try:
        yield routing
    finally:
        for handle in handles:
            handle.remove()


def sample_next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Pick one token per row of logits [batch, vocab] (see `DeepseekModel.generate`)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens ranked above it already reach top_p (the best one always stays)
        drop = probs.cumsum(dim=-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


# ----------------------------------------------------------------------------------------------
# KV-cache sizes of MHA / GQA / MQA / MLA at a given config
# ----------------------------------------------------------------------------------------------

def kv_cache_table(configs: dict[str, DeepseekConfig] | None = None, gqa_kv_heads: int = 8,
                   bytes_per_value: int = 2) -> str:
    """A Markdown table of KV-cache bytes per token: the config's MLA against MHA, GQA and MQA
    with the same layers, heads and head sizes (K = qk_nope + qk_rope, V = v_head_dim)."""
    if configs is None:
        configs = {"DeepSeek-V2-Lite": DeepseekConfig.deepseek_v2_lite(), "DeepSeek-V3": DeepseekConfig.deepseek_v3()}
    rows = ["| model | attention | cached per token per layer | KiB per token (all layers, bf16) | vs MHA |",
            "|---|---|---|---|---|"]
    for name, cfg in configs.items():
        common = dict(n_layers=cfg.num_hidden_layers, n_heads=cfg.num_attention_heads, k_head_dim=cfg.qk_head_dim,
                      v_head_dim=cfg.v_head_dim, bytes_per_value=bytes_per_value)
        kinds = [("MHA", "mha", f"{cfg.num_attention_heads} heads x (K {cfg.qk_head_dim} + V {cfg.v_head_dim})"),
                 (f"GQA ({gqa_kv_heads} kv heads)", "gqa", f"{gqa_kv_heads} x ({cfg.qk_head_dim} + {cfg.v_head_dim})"),
                 ("MQA", "mqa", f"1 x ({cfg.qk_head_dim} + {cfg.v_head_dim})"),
                 ("MLA (absorbed)", "mla", f"latent {cfg.kv_lora_rank} + rope key {cfg.qk_rope_head_dim}")]
        mha = kv_cache_bytes_per_token("mha", **common)
        for label, kind, what in kinds:
            if kind == "mla":
                nbytes = kv_cache_bytes_per_token("mla", n_layers=cfg.num_hidden_layers, kv_lora_rank=cfg.kv_lora_rank,
                                                  qk_rope_head_dim=cfg.qk_rope_head_dim, bytes_per_value=bytes_per_value)
            else:
                nbytes = kv_cache_bytes_per_token(kind, n_kv_heads=gqa_kv_heads, **common)
            rows.append(f"| {name} | {label} | {what} | {nbytes / 1024:,.1f} | {nbytes / mha:.3f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":  # python -m deepseek_mini.model  -> the table in docs/kv_cache.md
    print(kv_cache_table())
