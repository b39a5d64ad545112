"""Typical wrong answers to the graded exercises of 03_attention (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_PADDING_RIGHT = """

def padding_mask(lengths, seq_len):
    positions = torch.arange(seq_len, device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]
"""

_CAUSAL_RIGHT = """
def causal_mask(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril()
"""

_MERGE_RIGHT = """

def merge_heads(x):
    B, H, S, d = x.shape
    return x.transpose(1, 2).reshape(B, S, H * d)
"""

_SPLIT_RIGHT = """
def split_heads(x, n_heads):
    B, S, D = x.shape
    if D % n_heads:
        raise ValueError("D must be divisible by n_heads")
    return x.reshape(B, S, n_heads, D // n_heads).transpose(1, 2)
"""

_ROPE_PAIRS = """
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
"""

WRONG_ANSWERS = {
    "attention": {
        "no 1/sqrt(d) scale": """
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights
""",
        "divides by d instead of sqrt(d)": """
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / q.shape[-1]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights
""",
        "softmax over the queries (dim=-2)": """
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-2)
    return weights @ v, weights
""",
        "mask direction inverted (fills -inf where the mask is True)": """
def attention(q, k, v, mask=None):
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    return weights @ v, weights
""",
        "zeroes masked weights after the softmax (rows no longer add up to 1)": """
def attention(q, k, v, mask=None):
    weights = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]), dim=-1)
    if mask is not None:
        weights = weights * mask
    return weights @ v, weights
""",
    },
    "masks": {
        "upper triangle: queries see the future": """
def causal_mask(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).triu()
""" + _PADDING_RIGHT,
        "diagonal left out: a token cannot see itself": """
def causal_mask(seq_len, device=None):
    return torch.ones(seq_len, seq_len, dtype=torch.bool, device=device).tril(-1)
""" + _PADDING_RIGHT,
        "padding mask inverted (True on the padding)": _CAUSAL_RIGHT + """

def padding_mask(lengths, seq_len):
    positions = torch.arange(seq_len, device=lengths.device)
    return (positions[None, :] >= lengths[:, None])[:, None, None, :]
""",
        "padding mask off by one (<= length)": _CAUSAL_RIGHT + """

def padding_mask(lengths, seq_len):
    positions = torch.arange(seq_len, device=lengths.device)
    return (positions[None, :] <= lengths[:, None])[:, None, None, :]
""",
        "padding mask left [B, T]: does not broadcast over heads and queries": _CAUSAL_RIGHT + """

def padding_mask(lengths, seq_len):
    positions = torch.arange(seq_len, device=lengths.device)
    return positions[None, :] < lengths[:, None]
""",
        "padding mask as long as the longest sequence, not seq_len": _CAUSAL_RIGHT + """

def padding_mask(lengths, seq_len):
    positions = torch.arange(int(lengths.max()), device=lengths.device)
    return (positions[None, :] < lengths[:, None])[:, None, None, :]
""",
    },
    "heads": {
        "split with a direct view to [B, H, S, d] (no transpose)": """
def split_heads(x, n_heads):
    B, S, D = x.shape
    if D % n_heads:
        raise ValueError("D must be divisible by n_heads")
    return x.reshape(B, n_heads, S, D // n_heads)
""" + _MERGE_RIGHT,
        "merge without the transpose back": _SPLIT_RIGHT + """

def merge_heads(x):
    B, H, S, d = x.shape
    return x.reshape(B, S, H * d)
""",
        "heads take every H-th feature ([B, S, d, H] layout)": """
def split_heads(x, n_heads):
    B, S, D = x.shape
    if D % n_heads:
        raise ValueError("D must be divisible by n_heads")
    return x.reshape(B, S, D // n_heads, n_heads).permute(0, 3, 1, 2)
""" + _MERGE_RIGHT,
        "no check that D is divisible by n_heads": """
def split_heads(x, n_heads):
    B, S, D = x.shape
    return x.reshape(B, S, n_heads, -1).transpose(1, 2)
""" + _MERGE_RIGHT,
        "validates with assert (AssertionError), not ValueError": """
def split_heads(x, n_heads):
    batch, seq, width = x.shape
    assert width % n_heads == 0, "D must be divisible by n_heads"
    return x.reshape(batch, seq, n_heads, width // n_heads).transpose(1, 2)
""" + _MERGE_RIGHT,
        "validation that raises only when S is not divisible either (by accident)": """
def split_heads(x, n_heads):
    batch, seq, width = x.shape
    if seq % n_heads and width % n_heads:
        raise ValueError(f"cannot split {width} features into {n_heads} heads")
    return x.reshape(batch, seq, n_heads, width // n_heads).transpose(1, 2)
""" + _MERGE_RIGHT,
    },
    "rope": {
        "frequencies theta**(-i/d) instead of theta**(-2i/d)": """
def rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(d // 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
""" + _ROPE_PAIRS,
        "rotates the wrong way (sign of sin swapped)": """
def rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), -angles.sin()
""" + _ROPE_PAIRS,
        "pairs x[i] with x[i + d/2] (rotate_half layout)": """
def rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
    first, second = x[..., : d // 2], x[..., d // 2:]
    return torch.cat((first * cos - second * sin, first * sin + second * cos), dim=-1)
""",
        "ignores the theta argument": """
def rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = 10000.0 ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = positions.to(x.device, torch.float32)[:, None] * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
""" + _ROPE_PAIRS,
        "positions counted from 1": """
def rope(x, positions, theta=10000.0):
    d = x.shape[-1]
    inv_freq = theta ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float32) / d)
    angles = (positions.to(x.device, torch.float32)[:, None] + 1) * inv_freq[None, :]
    cos, sin = angles.cos(), angles.sin()
""" + _ROPE_PAIRS,
    },
    "sliding_window": {
        "off by one: W + 1 keys (i - W <= j)": """
def sliding_window_mask(seq_len, window, n_global=0, device=None):
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & ((j >= i - window) | (j < n_global))
""",
        "symmetric window: sees W - 1 future keys": """
def sliding_window_mask(seq_len, window, n_global=0, device=None):
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return ((i - j).abs() < window) | (j < n_global)
""",
        "global tokens visible to earlier queries (future leak)": """
def sliding_window_mask(seq_len, window, n_global=0, device=None):
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return ((j <= i) & (j > i - window)) | (j < n_global)
""",
        "ignores n_global": """
def sliding_window_mask(seq_len, window, n_global=0, device=None):
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (j > i - window)
""",
    },
}
