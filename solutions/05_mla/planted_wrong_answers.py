"""Typical wrong answers to the graded exercises of 05_mla (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_GQA_HEAD = """
def gqa_attention(q, k, v, scale=None):
    group = q.shape[1] // k.shape[1]
"""

_GQA_SCORES = """
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
"""

_MASK_AFTER_CACHE = """
    S, T = q.shape[2], k.shape[2]
    allowed = torch.ones(S, T, dtype=torch.bool).tril(diagonal=T - S)
    scores = scores.masked_fill(~allowed, float("-inf"))
"""

_KV_BYTES_HEAD = """
def kv_bytes_per_token(kind, cfg, n_kv_heads=8, bytes_per_value=2):
    heads = {"mha": cfg.num_attention_heads, "gqa": n_kv_heads, "mqa": 1, "mla": 1}[kind]
    k_dim = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
"""

_COMPRESS = """
def compress_kv(attn, x):
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    return attn.kv_a_layernorm(c_kv), k_pe
"""

_EXPAND = """
def expand_kv(attn, c_kv):
    B, T, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(B, T, attn.n_heads, -1).transpose(1, 2)
    return kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
"""

_NAIVE_HEAD = """
def mla_naive(attn, x, cos, sin):
    B, S, _ = x.shape
    q_nope, q_pe = attn.project_q(x)
    c_kv, k_pe = compress_kv(attn, x)
    k_nope, v = expand_kv(attn, c_kv)
    k_pe = apply_rope(k_pe[:, None], cos, sin, attn.rope_interleaved).expand(-1, attn.n_heads, -1, -1)
"""

_ABSORBED_HEAD = """
def mla_absorbed(attn, x, cos, sin):
    B, S, _ = x.shape
    H, nope, v_dim, rank = attn.n_heads, attn.qk_nope_head_dim, attn.v_head_dim, attn.kv_lora_rank
    q_nope, q_pe = attn.project_q(x)
    c_kv, k_pe = compress_kv(attn, x)
    c_kv = c_kv[:, None]
    q_pe = apply_rope(q_pe, cos, sin, attn.rope_interleaved)
"""

_ABSORBED_TAIL = """
    q_latent = torch.einsum("bhsd,hdr->bhsr", q_nope, w_uk)
    out = gqa_attention(torch.cat((q_latent, q_pe), -1), torch.cat((c_kv, k_pe), -1), c_kv, scale=scale)
    out = torch.einsum("bhsr,hvr->bhsv", out, w_uv)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, H * v_dim))
"""

_PER_HEAD_W = """
    w = attn.kv_b_proj.weight.view(H, nope + v_dim, rank)
    w_uk, w_uv = w[:, :nope], w[:, nope:]
"""

WRONG_ANSWERS = {
    "gqa_attention": {
        "tiles the kv heads with repeat (head h reads kv head h % Hkv)": _GQA_HEAD + """
    k = k.repeat(1, group, 1, 1)
    v = v.repeat(1, group, 1, 1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
""" + _MASK_AFTER_CACHE + """
    return torch.softmax(scores, dim=-1) @ v
""",
        "no 1/sqrt(D) scale": _GQA_HEAD + """
    k = k.repeat_interleave(group, dim=1)
    v = v.repeat_interleave(group, dim=1)
    scores = q @ k.transpose(-2, -1)
    if scale is not None:
        scores = scores * scale
""" + _MASK_AFTER_CACHE + """
    return torch.softmax(scores, dim=-1) @ v
""",
        "mask hides the past instead of the future": _GQA_HEAD + _GQA_SCORES + """
    S, T = q.shape[2], k.shape[2]
    allowed = torch.ones(S, T, dtype=torch.bool).triu(diagonal=T - S)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
""",
        "off by T - S after a cache: mask built as if queries started at position 0": _GQA_HEAD + _GQA_SCORES + """
    S, T = q.shape[2], k.shape[2]
    allowed = torch.ones(S, T, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v
""",
        "softmax over the queries (dim=-2)": _GQA_HEAD + _GQA_SCORES + _MASK_AFTER_CACHE + """
    return torch.softmax(scores, dim=-2) @ v
""",
    },
    "kv_bytes_per_token": {
        "counts the keys but forgets the values": _KV_BYTES_HEAD + """
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if kind == "mla" else heads * k_dim
    return cfg.num_hidden_layers * per_layer * bytes_per_value
""",
        "one layer only": _KV_BYTES_HEAD + """
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if kind == "mla" else heads * (k_dim + cfg.v_head_dim)
    return per_layer * bytes_per_value
""",
        "MLA latent cached once per head": _KV_BYTES_HEAD + """
    if kind == "mla":
        per_layer = cfg.num_attention_heads * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:
        per_layer = heads * (k_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * bytes_per_value
""",
        "keys without their RoPE part, MLA without the RoPE key": _KV_BYTES_HEAD + """
    per_layer = cfg.kv_lora_rank if kind == "mla" else heads * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer * bytes_per_value
""",
        "value size read from qk_nope_head_dim (equal to v_head_dim in V2 and V3, not in general)": _KV_BYTES_HEAD + """
    per_layer = cfg.kv_lora_rank + cfg.qk_rope_head_dim if kind == "mla" else heads * (k_dim + cfg.qk_nope_head_dim)
    return cfg.num_hidden_layers * per_layer * bytes_per_value
""",
    },
    "compress_expand": {
        "forgets the RMSNorm on the latent": """
def compress_kv(attn, x):
    c_kv, k_pe = attn.kv_a_proj_with_mqa(x).split([attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    return c_kv, k_pe
""" + _EXPAND,
        "takes the RoPE key from the front of kv_a_proj_with_mqa's output": """
def compress_kv(attn, x):
    k_pe, c_kv = attn.kv_a_proj_with_mqa(x).split([attn.qk_rope_head_dim, attn.kv_lora_rank], dim=-1)
    return attn.kv_a_layernorm(c_kv), k_pe
""" + _EXPAND,
        "no transpose: heads stay after the positions": _COMPRESS + """
def expand_kv(attn, c_kv):
    B, T, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(B, T, attn.n_heads, -1)
    return kv.split([attn.qk_nope_head_dim, attn.v_head_dim], dim=-1)
""",
        "value first, key second in each head's slice": _COMPRESS + """
def expand_kv(attn, c_kv):
    B, T, _ = c_kv.shape
    kv = attn.kv_b_proj(c_kv).view(B, T, attn.n_heads, -1).transpose(1, 2)
    v, k_nope = kv.split([attn.v_head_dim, attn.qk_nope_head_dim], dim=-1)
    return k_nope, v
""",
        "cuts kv_b_proj's output into all keys then all values (not head by head)": _COMPRESS + """
def expand_kv(attn, c_kv):
    B, T, _ = c_kv.shape
    H = attn.n_heads
    k_all, v_all = attn.kv_b_proj(c_kv).split([H * attn.qk_nope_head_dim, H * attn.v_head_dim], dim=-1)
    return k_all.view(B, T, H, -1).transpose(1, 2), v_all.view(B, T, H, -1).transpose(1, 2)
""",
    },
    "mla_naive": {
        "merges the heads without the transpose": _NAIVE_HEAD + """
    q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, attn.rope_interleaved)), -1)
    out = gqa_attention(q, torch.cat((k_nope, k_pe), -1), v, scale=attn.softmax_scale)
    return attn.o_proj(out.reshape(B, S, -1))
""",
        "scale 1/sqrt(qk_nope_head_dim): forgets the RoPE dimensions": _NAIVE_HEAD + """
    q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, attn.rope_interleaved)), -1)
    out = gqa_attention(q, torch.cat((k_nope, k_pe), -1), v, scale=attn.qk_nope_head_dim ** -0.5)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
""",
        "rotates the key but not the query": _NAIVE_HEAD + """
    q = torch.cat((q_nope, q_pe), -1)
    out = gqa_attention(q, torch.cat((k_nope, k_pe), -1), v, scale=attn.softmax_scale)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
""",
        "computes its own 1/sqrt(d) instead of attn.softmax_scale": _NAIVE_HEAD + """
    q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, attn.rope_interleaved)), -1)
    out = gqa_attention(q, torch.cat((k_nope, k_pe), -1), v)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
""",
        "RoPE layout hard-coded as interleaved instead of attn.rope_interleaved": _NAIVE_HEAD.replace(
            "attn.rope_interleaved", "True") + """
    q = torch.cat((q_nope, apply_rope(q_pe, cos, sin, True)), -1)
    out = gqa_attention(q, torch.cat((k_nope, k_pe), -1), v, scale=attn.softmax_scale)
    return attn.o_proj(out.transpose(1, 2).reshape(B, S, -1))
""",
    },
    "mla_absorbed": {
        "no scale passed: 1/sqrt(rank + rope) of the longer query": _ABSORBED_HEAD + """
    k_pe = apply_rope(k_pe[:, None], cos, sin, attn.rope_interleaved)
    scale = None
""" + _PER_HEAD_W + _ABSORBED_TAIL,
        "W_UK as the first H*nope rows of kv_b_proj.weight (heads are interleaved with values)": _ABSORBED_HEAD + """
    k_pe = apply_rope(k_pe[:, None], cos, sin, attn.rope_interleaved)
    scale = attn.softmax_scale
    w = attn.kv_b_proj.weight
    w_uk, w_uv = w[:H * nope].view(H, nope, rank), w[H * nope:].view(H, v_dim, rank)
""" + _ABSORBED_TAIL,
        "forgets to rotate the shared RoPE key": _ABSORBED_HEAD + """
    k_pe = k_pe[:, None]
    scale = attn.softmax_scale
""" + _PER_HEAD_W + _ABSORBED_TAIL,
        "RoPE layout hard-coded as interleaved instead of attn.rope_interleaved": _ABSORBED_HEAD.replace(
            "attn.rope_interleaved", "True") + """
    k_pe = apply_rope(k_pe[:, None], cos, sin, True)
    scale = attn.softmax_scale
""" + _PER_HEAD_W + _ABSORBED_TAIL,
    },
}
