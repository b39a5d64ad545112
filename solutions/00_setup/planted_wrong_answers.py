"""Typical wrong answers to the graded exercises of 00_setup (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

WRONG_ANSWERS = {
    "standardize": {
        "normalises each row (dim=1) instead of each column": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=1, keepdim=True)) / (x.std(dim=1, keepdim=True, correction=0) + eps)
""",
        "sample standard deviation (divides by n - 1)": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=0)) / (x.std(dim=0) + eps)
""",
        "no eps: a constant column becomes nan": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=0)) / x.std(dim=0, correction=0)
""",
        "eps added to the variance under the square root, not to the std": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=0)) / torch.sqrt(x.var(dim=0, correction=0) + eps)
""",
        "eps as a lower bound on the std (clamp) instead of added to it": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=0)) / x.std(dim=0, correction=0).clamp_min(eps)
""",
        "ignores the eps argument (a fixed 1e-5)": """
def standardize(x, eps=1e-5):
    return (x - x.mean(dim=0)) / (x.std(dim=0, correction=0) + 1e-5)
""",
        "modifies x in place (x -= mean)": """
def standardize(x, eps=1e-5):
    x -= x.mean(dim=0)
    return x / (x.std(dim=0, correction=0) + eps)
""",
    },
    "scaled_add_kernel": {
        "no mask: the last block writes past the end": """
@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offsets)
    y = tl.load(y_ptr + offsets)
    tl.store(out_ptr + offsets, alpha * x + y)
""",
        "every program handles the first block (offsets miss pid * BLOCK)": """
@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, alpha * x + y, mask=mask)
""",
        "mask offsets <= n: one element written past the end": """
@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets <= n
    x = tl.load(x_ptr + offsets, mask=mask)
    y = tl.load(y_ptr + offsets, mask=mask)
    tl.store(out_ptr + offsets, alpha * x + y, mask=mask)
""",
        "masked loads but an unmasked store": """
@triton.jit
def scaled_add_kernel(x_ptr, y_ptr, out_ptr, alpha, n, BLOCK: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offsets < n
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    y = tl.load(y_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, alpha * x + y)
""",
    },
}
