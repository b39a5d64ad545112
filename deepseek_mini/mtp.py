"""DeepSeek-V3's multi-token prediction (MTP): extra modules trained to predict tokens further ahead.

DeepSeek-V3 (technical report, section 2.2) adds D sequential MTP modules after the main model.
Module k = 1..D predicts, at position i, the token t_{i+k+1}:

    h'_i^k = M_k [ RMSNorm(Emb(t_{i+k})) ; RMSNorm(h_i^{k-1}) ]   M_k = eh_proj: [hidden, 2 * hidden]
    h^k    = TRM_k(h'^k)                                          one causal transformer block
    P_i^k  = OutHead(RMSNorm(h_i^k))                              the main model's lm_head (shared)

h^0 is the main model's last hidden state (before its final norm); Emb is the main model's
embedding (shared). The chain is causal: h_i^k depends on t_0 .. t_{i+k} only, never on its target
t_{i+k+1}. Training minimises

    L = L_main + lambda / D * sum_k L_MTP^k      (L_MTP^k: cross-entropy of P^k against t_{i+k+1};
                                                  V3: D = 1, lambda = 0.3 for 10T tokens, then 0.1)

and the gradient of the MTP term flows into the main model (h^0 is not detached): that is the
point, denser training signal for the shared trunk. At inference the modules are dropped, or used
to draft tokens for speculative decoding (not implemented here). `DeepseekModel(config)` builds
them as `model.mtp` when `config.num_nextn_predict_layers > 0`; `model(...)` is unchanged (main
logits and loss); `mtp_losses` / `loss_with_mtp` / `mtp_loss_fn` compute the MTP part.

Names follow DeepSeek's released checkpoint, where module k is layer `num_hidden_layers + k - 1`
(`hf.py` maps `mtp.layers.{k-1}.` to `model.layers.{num_hidden_layers + k - 1}.`): `enorm`,
`hnorm`, `eh_proj`, `shared_head.norm`, plus the block's own `self_attn`, `mlp`,
`input_layernorm`, `post_attention_layernorm`. The release also stores copies of the shared
`embed_tokens` and `shared_head.head` in that layer; `hf.py` writes them and checks them on load.

Two choices where sources differ:
  * concatenation order: the report's equation (21) writes [RMSNorm(h); RMSNorm(Emb)], but the
    released eh_proj weights are applied with the EMBEDDING half first (hence the name "eh"), by
    vLLM, SGLang and transformers' `MtpModel`. We follow the weights: the other order would read a
    released eh_proj with its halves swapped.
  * between depths (D > 1) we pass h^k, the block's output, as the report's equations do;
    transformers' `MtpModel` passes RMSNorm(h^k) (after `shared_head.norm`) instead. V3 has D = 1,
    where the two agree.
An MTP block is an MoE block whenever the model has routed experts (V3's layer 61 is), whatever
first_k_dense_replace says, as in transformers.

What this is checked against (tests/test_mtp.py). transformers' DeepseekV3ForCausalLM ignores the
MTP weights on load; transformers 5.23 has a drafting-only `modeling_layers.MtpModel` (its training
loss path is unusable), so: the depth-1 logits are compared with that `MtpModel` loaded by
transformers from a checkpoint `hf.save_pretrained` wrote; the loss of every depth with an
independent step-by-step re-derivation; the causal property (changing t_j changes no prediction
made before t_j is visible); and that gradients reach the main model and every MTP weight.
"""

from dataclasses import dataclass

import torch
from torch import nn

from deepseek_mini.layers import RMSNorm
from deepseek_mini.model import Block, DeepseekConfig, DeepseekModel, causal_lm_loss

DEFAULT_WEIGHT = 0.3  # lambda: DeepSeek-V3's MTP loss weight for its first 10T tokens


class MTPModule(Block):
    """MTP module of depth k: the projection M_k of the two normalised inputs, one transformer
    block (this class IS the block: `self_attn`, `mlp`, ... as in a checkpoint) and the norm
    before the shared output head."""

    def __init__(self, config: DeepseekConfig, depth: int):
        super().__init__(config.replace(first_k_dense_replace=0), config.num_hidden_layers + depth - 1)
        self.depth = depth
        dim, eps = config.hidden_size, config.rms_norm_eps
        self.enorm = RMSNorm(dim, eps)                         # on Emb(t_{i+k})
        self.hnorm = RMSNorm(dim, eps)                         # on h_i^{k-1}
        self.eh_proj = nn.Linear(2 * dim, dim, bias=False)    # M_k: [embedding half, hidden half] -> dim
        self.shared_head = nn.Module()                         # the head itself is the model's lm_head
        self.shared_head.norm = RMSNorm(dim, eps)

    def project(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        """h'^k = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h^{k-1})], both [B, T, D] -> [B, T, D]."""
        return self.eh_proj(torch.cat((self.enorm(next_embeds), self.hnorm(hidden)), dim=-1))

    def transformer_block(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """TRM_k: the decoder block (causal attention over the T positions of x, then the FFN).
        Its MoE balance loss, if any, is left out: the MTP objective is cross-entropy only."""
        return Block.forward(self, x, cos, sin)[0]

    def forward(self, hidden, next_embeds, cos, sin):
        """h^k from h^{k-1} and the embeddings of the tokens k ahead."""
        return self.transformer_block(self.project(hidden, next_embeds), cos, sin)


class MultiTokenPrediction(nn.Module):
    """The D = config.num_nextn_predict_layers MTP modules of a DeepseekModel (`model.mtp`)."""

    def __init__(self, config: DeepseekConfig):
        super().__init__()
        if config.num_nextn_predict_layers < 1:
            raise ValueError(f"MultiTokenPrediction: num_nextn_predict_layers={config.num_nextn_predict_layers}, "
                             "expected >= 1")
        self.layers = nn.ModuleList(MTPModule(config, k) for k in range(1, config.num_nextn_predict_layers + 1))


@dataclass
class MTPOutput:
    """What `loss_with_mtp` returns."""
    loss: torch.Tensor                 # main_loss + weight / D * sum(mtp_losses): what to backpropagate
    main_loss: torch.Tensor            # the model's own loss (next token, plus any MoE aux loss)
    mtp_losses: list[torch.Tensor]     # cross-entropy of depth k = 1..D (predicting t_{i+k+1})
    logits: torch.Tensor               # the main model's logits


def forward_with_hidden(model: DeepseekModel, input_ids: torch.Tensor, labels: torch.Tensor | None = None):
    """`model(input_ids, labels=labels)` and h^0, the last hidden state before the final norm
    [B, S, D] (read by a hook on `model.norm`, so the model's forward stays as it is)."""
    seen = []
    hook = model.norm.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    try:
        out = model(input_ids, labels=labels)
    finally:
        hook.remove()
    return out, seen[-1]


def mtp_logits(model: DeepseekModel, hidden: torch.Tensor, input_ids: torch.Tensor) -> list[torch.Tensor]:
    """Logits of every depth from h^0 (`hidden`, [B, S, D]): depth k gives [B, S - k, V], whose
    position i predicts t_{i+k+1} (so its last position predicts past the end of the sequence)."""
    mtp = getattr(model, "mtp", None)
    if mtp is None:
        raise ValueError("this model has no MTP modules: build it with DeepseekConfig(num_nextn_predict_layers=1) or more")
    B, S = input_ids.shape
    if hidden.shape[:2] != (B, S):
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [batch, seq, dim] for input_ids {tuple(input_ids.shape)}")
    depth = len(mtp.layers)
    if S < depth + 2:
        raise ValueError(f"multi-token prediction of depth {depth} needs sequences of at least {depth + 2} tokens, got {S}")
    out, h = [], hidden
    for k, module in enumerate(mtp.layers, start=1):
        cos, sin = model.rope_tables(k, S - k, hidden.device)  # positions of the embedded tokens t_k .. t_{S-1}
        h = module(h[:, :S - k], model.embed_tokens(input_ids[:, k:]), cos, sin)
        out.append(model.lm_head(module.shared_head.norm(h)))
    return out


def mtp_losses(model: DeepseekModel, hidden: torch.Tensor, input_ids: torch.Tensor,
               labels: torch.Tensor | None = None) -> list[torch.Tensor]:
    """Cross-entropy of each depth k against labels[:, i + k + 1] (labels default to input_ids;
    -100 is ignored), averaged over the positions that have a target."""
    labels = input_ids if labels is None else labels
    if labels.shape != input_ids.shape:
        raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}")
    # depth k's logits cover positions 0 .. S-k-1 and predict labels k+1 ..: the next-token loss
    # against labels shifted by k
    return [causal_lm_loss(logits, labels[:, k:])
            for k, logits in enumerate(mtp_logits(model, hidden, input_ids), start=1)]


def loss_with_mtp(model: DeepseekModel, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                  weight: float = DEFAULT_WEIGHT) -> MTPOutput:
    """DeepSeek-V3's training objective: L_main + weight / D * sum_k L_MTP^k."""
    if not weight >= 0:
        raise ValueError(f"weight (lambda) must be >= 0, got {weight}")
    labels = input_ids if labels is None else labels
    out, hidden = forward_with_hidden(model, input_ids, labels=labels)
    losses = mtp_losses(model, hidden, input_ids, labels)
    total = out.loss + weight / len(losses) * torch.stack(losses).sum()
    return MTPOutput(loss=total, main_loss=out.loss, mtp_losses=losses, logits=out.logits)


def mtp_loss_fn(weight: float = DEFAULT_WEIGHT):
    """A `Trainer` loss_fn: `Trainer(model, config, batches, loss_fn=mtp_loss_fn(0.3))`.
    (`Trainer.evaluate` then reports this total too; compare main losses with `model(...)`.)"""
    def loss_fn(model, batch):
        return loss_with_mtp(model, batch["input_ids"], batch.get("labels"), weight=weight).loss
    return loss_fn
