"""Typical wrong answers to the graded exercises of 07_pretrain (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

# count_parameters: one correct skeleton, each mistake changes one piece of it
_COUNT = """
def count_parameters(cfg):
    D, H = cfg.hidden_size, cfg.num_attention_heads
    qk_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        attention = D * H * qk_head
    else:
        attention = D * cfg.q_lora_rank + Q_NORM + cfg.q_lora_rank * H * qk_head
    attention += D * (cfg.kv_lora_rank + ROPE_KEY) + KV_NORM
    attention += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim) + H * cfg.v_head_dim * D
    block = attention + BLOCK_NORMS
    expert = 3 * D * cfg.moe_intermediate_size
    total = active = cfg.vocab_size * D + D + HEAD
    for layer in range(cfg.num_hidden_layers):
        if cfg.n_routed_experts and IS_MOE:
            shared = (cfg.n_shared_experts or 0) * expert
            always = block + cfg.n_routed_experts * D
            total += always + shared + cfg.n_routed_experts * expert
            active += always + ACTIVE_SHARED + cfg.num_experts_per_tok * expert
        else:
            total += block + 3 * D * cfg.intermediate_size
            active += block + 3 * D * cfg.intermediate_size
    return total, active
"""
_RIGHT = {"Q_NORM": "cfg.q_lora_rank", "ROPE_KEY": "cfg.qk_rope_head_dim", "KV_NORM": "cfg.kv_lora_rank",
          "BLOCK_NORMS": "2 * D", "HEAD": "(0 if cfg.tie_word_embeddings else D * cfg.vocab_size)",
          "IS_MOE": "layer >= cfg.first_k_dense_replace", "ACTIVE_SHARED": "shared"}


def _count(**wrong):
    code = _COUNT
    for key, value in {**_RIGHT, **wrong}.items():
        code = code.replace(key, value)
    return code


_BLOCK_INIT = """
class DecoderBlock(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = attention_from_config(config)
        if config.n_routed_experts and layer_idx IS_MOE config.first_k_dense_replace:
            self.mlp = moe_from_config(config)
        else:
            self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, EPS)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, EPS)

    def forward(self, x, cos, sin, cache=None):
"""


def _block(forward, is_moe=">=", eps="config.rms_norm_eps"):
    return _BLOCK_INIT.replace("IS_MOE", is_moe).replace("EPS", eps) + forward


_PRE_NORM = """
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer_idx=self.layer_idx)
        return h + self.mlp(self.post_attention_layernorm(h))
"""

_PPL_HEAD = """
def perplexity(model, batches):
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
"""

# the token-weighted sum, right (for the mistakes that lie elsewhere)
_PPL_SUM = """
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            targets = batch["labels"].to(dev)[:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            n += int((targets != -100).sum())
"""

_FLOPS = """
def forward_flops(model, batch_size, seq_len):
    tokens = batch_size * seq_len
    flops = 0
    for module in model.modules():
        if isinstance(module, nn.Linear):
            flops += TWO * tokens * module.in_features * module.out_features
        elif isinstance(module, MoE):
            n_experts, dim = module.gate.weight.shape
            per_expert = module.experts.gate_proj[0].numel() * 3
            flops += TWO * tokens * GATE + TWO * tokens * EXPERTS * per_expert
        elif isinstance(module, MultiHeadLatentAttention):
            flops += ATTENTION
        elif isinstance(module, nn.Embedding):
            flops += EMBEDDING
    return flops
"""
_FLOPS_RIGHT = {"TWO": "2", "GATE": "n_experts * dim", "EXPERTS": "module.gate.top_k",
                "ATTENTION": "2 * batch_size * module.n_heads * seq_len * seq_len * (module.qk_head_dim + module.v_head_dim)",
                "EMBEDDING": "0"}


def _flops(**wrong):
    code = _FLOPS
    for key, value in {**_FLOPS_RIGHT, **wrong}.items():
        code = code.replace(key, value)
    return code


# mtp_loss: one correct skeleton, each mistake changes one piece of it
_MTP = """
def mtp_loss(model, hidden, input_ids, weight):
    S = input_ids.shape[1]
    depth = len(model.mtp.layers)
    h, losses = HIDDEN, []
    for k, module in enumerate(model.mtp.layers, start=1):
        next_embeds = model.embed_tokens(EMBEDDED)
        x = module.eh_proj(torch.cat(CONCAT, dim=-1))
        h_k = module.transformer_block(x, model.rope_cos[k:S], model.rope_sin[k:S])
        logits = HEAD
        losses.append(F.cross_entropy(LOGITS.reshape(-1, logits.shape[-1]), TARGETS.reshape(-1)))
        h = CHAIN
    return TOTAL
"""
_MTP_RIGHT = {"HIDDEN": "hidden", "EMBEDDED": "input_ids[:, k:]",
              "CONCAT": "(module.enorm(next_embeds), module.hnorm(h[:, :S - k]))",
              "HEAD": "model.lm_head(module.shared_head.norm(h_k))", "LOGITS": "logits[:, :-1]",
              "TARGETS": "input_ids[:, k + 1:]", "CHAIN": "h_k", "TOTAL": "weight / depth * torch.stack(losses).sum()"}


def _mtp(**wrong):
    code = _MTP
    for key, value in {**_MTP_RIGHT, **wrong}.items():
        code = code.replace(key, value)
    return code


WRONG_ANSWERS = {
    "count_parameters": {
        "forgets MLA's latent norms (q_a_layernorm, kv_a_layernorm)": _count(Q_NORM="0", KV_NORM="0"),
        "forgets the two RMSNorms of each block": _count(BLOCK_NORMS="0"),
        "one RoPE key per head instead of one shared key": _count(ROPE_KEY="H * cfg.qk_rope_head_dim"),
        "every block is MoE (ignores first_k_dense_replace)": _count(IS_MOE="True"),
        "off by one: the first MoE block is layer k + 1": _count(IS_MOE="layer > cfg.first_k_dense_replace"),
        "counts the output head even when tied to the embedding": _count(HEAD="D * cfg.vocab_size"),
        "treats the shared experts as inactive": _count(ACTIVE_SHARED="0"),
    },
    "decoder_block": {
        "post-norm: normalises the output of each residual branch": _block("""
        h = self.input_layernorm(x + self.self_attn(x, cos, sin, cache=cache, layer_idx=self.layer_idx))
        return self.post_attention_layernorm(h + self.mlp(h))
"""),
        "parallel branches: the FFN reads x, not the stream after attention": _block("""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer_idx=self.layer_idx)
        return h + self.mlp(self.post_attention_layernorm(x))
"""),
        "one norm for both branches": _block("""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer_idx=self.layer_idx)
        return h + self.mlp(self.input_layernorm(h))
"""),
        "no residual around the FFN": _block("""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache, layer_idx=self.layer_idx)
        return self.mlp(self.post_attention_layernorm(h))
"""),
        "off by one: MoE from layer first_k_dense_replace + 1": _block(_PRE_NORM, is_moe=">"),
        "RMSNorm with its default eps instead of config.rms_norm_eps": _block(_PRE_NORM, eps="1e-6"),
        "ignores the KV cache (generation attends to the new token only)": _block("""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return h + self.mlp(self.post_attention_layernorm(h))
"""),
        "multi-layer cache: layer_idx not passed, every block caches under layer 0": _block("""
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, cache=cache)
        return h + self.mlp(self.post_attention_layernorm(h))
"""),
    },
    "perplexity": {
        "mode restore: always switches back to train mode (model.train() at the end)": """
def perplexity(model, batches):
    model.eval()
    dev = next(model.parameters()).device""" + _PPL_SUM + """
    model.train()
    return math.exp(nll / n)
""",
        "never calls model.eval(): dropout stays on while measuring": """
def perplexity(model, batches):
    dev = next(model.parameters()).device""" + _PPL_SUM + """
    return math.exp(nll / n)
""",
        "batch-weighted: the mean of per-batch mean losses": _PPL_HEAD + """
    losses = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            losses.append(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                          batch["labels"].to(dev)[:, 1:].reshape(-1), ignore_index=-100).item())
    model.train(was_training)
    return math.exp(sum(losses) / len(losses))
""",
        "no shift: logits at t scored against the label at t": _PPL_HEAD + """
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            labels = batch["labels"].to(dev)
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                                   reduction="sum").item()
            n += int((labels != -100).sum())
    model.train(was_training)
    return math.exp(nll / n)
""",
        "counts the ignored (-100) positions in the number of tokens": _PPL_HEAD + """
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            targets = batch["labels"].to(dev)[:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            n += targets.numel()
    model.train(was_training)
    return math.exp(nll / n)
""",
        "averages the per-batch perplexities": _PPL_HEAD + """
    ppls = []
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                   batch["labels"].to(dev)[:, 1:].reshape(-1), ignore_index=-100)
            ppls.append(math.exp(loss.item()))
    model.train(was_training)
    return sum(ppls) / len(ppls)
""",
        "leaves the model in eval mode": """
def perplexity(model, batches):
    model.eval()
    dev = next(model.parameters()).device
    nll, n = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            logits = model(batch["input_ids"].to(dev))
            targets = batch["labels"].to(dev)[:, 1:]
            nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            n += int((targets != -100).sum())
    return math.exp(nll / n)
""",
    },
    "forward_flops": {
        "counts multiply-adds (1 per weight per token), not FLOPs": _flops(TWO="1"),
        "counts every routed expert, not only the top-k": _flops(EXPERTS="n_experts"),
        "forgets the attention products (the S^2 part)": _flops(ATTENTION="0"),
        "causal half of the attention scores only": _flops(
            ATTENTION="batch_size * module.n_heads * seq_len * (seq_len + 1) * (module.qk_head_dim + module.v_head_dim)"),
        "forgets the gate": _flops(GATE="0"),
        "value size read from qk_nope_head_dim (equal in the default config)": _flops(
            ATTENTION="2 * batch_size * module.n_heads * seq_len * seq_len * (module.qk_head_dim + module.qk_nope_head_dim)"),
        "counts the embedding look-up as a matmul": _flops(EMBEDDING="2 * tokens * module.num_embeddings * module.embedding_dim"),
    },
    "mtp_loss": {
        "the report's equation order: hidden half first (the released eh_proj reads embedding first)": _mtp(
            CONCAT="(module.hnorm(h[:, :S - k]), module.enorm(next_embeds))"),
        "targets not shifted by the depth: predicts the token it embeds, t_{i+k}": _mtp(
            LOGITS="logits", TARGETS="input_ids[:, k:]"),
        "every depth predicts t_{i+2} (shift of the first depth only)": _mtp(
            LOGITS="logits[:, :S - k - 1]", TARGETS="input_ids[:, 2:S - k + 1]"),
        "embeds t_{i+k-1}, the token the previous depth already saw": _mtp(
            EMBEDDED="input_ids[:, k - 1:S - 1]"),
        "the main model's final norm instead of the module's own shared_head.norm": _mtp(
            HEAD="model.lm_head(model.norm(h_k))"),
        "a head of its own: logits from the embedding matrix instead of the shared lm_head": _mtp(
            HEAD="module.shared_head.norm(h_k) @ model.embed_tokens.weight.T"),
        "no chain: every depth starts again from the main model's hidden states": _mtp(CHAIN="hidden"),
        "passes the normalised state (after shared_head.norm) to the next depth": _mtp(
            CHAIN="module.shared_head.norm(h_k)"),
        "detaches h^0: the MTP loss no longer trains the main model": _mtp(HIDDEN="hidden.detach()"),
        "sums the depths without dividing by D": _mtp(TOTAL="weight * torch.stack(losses).sum()"),
        "averages the depths but forgets the weight lambda": _mtp(TOTAL="torch.stack(losses).mean()"),
    },
}
