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
    },
}
