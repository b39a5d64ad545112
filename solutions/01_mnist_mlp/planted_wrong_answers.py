"""Typical wrong answers to the graded exercises of 01_mnist_mlp (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_LINEAR_TAIL = """
    def parameters(self):
        return [self.weight, self.bias]
"""

_ADAM_HEAD = """
class Adam:
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8):
        self.params = list(params)
        self.lr, (self.beta1, self.beta2), self.eps = lr, betas, eps
        self.t = 0
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    def zero_grad(self):
        for p in self.params:
            p.grad = None
"""

WRONG_ANSWERS = {
    "linear": {
        "weights drawn from a standard normal (not scaled by 1/sqrt(in))": """
class Linear:
    def __init__(self, in_features, out_features, device=None):
        self.weight = torch.randn(out_features, in_features, device=device, requires_grad=True)
        self.bias = torch.zeros(out_features, device=device, requires_grad=True)

    def __call__(self, x):
        return x @ self.weight.T + self.bias
""" + _LINEAR_TAIL,
        "forgets the bias in the forward pass": """
class Linear:
    def __init__(self, in_features, out_features, device=None):
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.empty(out_features, in_features, device=device).uniform_(-bound, bound).requires_grad_()
        self.bias = torch.zeros(out_features, device=device, requires_grad=True)

    def __call__(self, x):
        return x @ self.weight.T
""" + _LINEAR_TAIL,
        "stores the weight as [in, out] and computes x @ weight": """
class Linear:
    def __init__(self, in_features, out_features, device=None):
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.empty(in_features, out_features, device=device).uniform_(-bound, bound).requires_grad_()
        self.bias = torch.zeros(out_features, device=device, requires_grad=True)

    def __call__(self, x):
        return x @ self.weight + self.bias
""" + _LINEAR_TAIL,
        "bias sized by in_features (only runs when in == out)": """
class Linear:
    def __init__(self, in_features, out_features, device=None):
        bound = 1 / math.sqrt(in_features)
        self.weight = torch.empty(out_features, in_features, device=device).uniform_(-bound, bound).requires_grad_()
        self.bias = torch.zeros(in_features, device=device, requires_grad=True)

    def __call__(self, x):
        return x @ self.weight.T + self.bias
""" + _LINEAR_TAIL,
    },
    "softmax_cross_entropy": {
        "no max subtraction: exp overflows for large logits": """
def softmax_cross_entropy(logits, targets):
    log_probs = logits - torch.log(torch.exp(logits).sum(dim=1, keepdim=True))
    return -log_probs[torch.arange(len(targets)), targets].mean()
""",
        "sums over the batch instead of averaging": """
def softmax_cross_entropy(logits, targets):
    m = logits.max(dim=1, keepdim=True).values
    log_probs = logits - m - torch.log(torch.exp(logits - m).sum(dim=1, keepdim=True))
    return -log_probs[torch.arange(len(targets)), targets].sum()
""",
        "softmax over the batch axis (dim=0)": """
def softmax_cross_entropy(logits, targets):
    m = logits.max(dim=0, keepdim=True).values
    log_probs = logits - m - torch.log(torch.exp(logits - m).sum(dim=0, keepdim=True))
    return -log_probs[torch.arange(len(targets)), targets].mean()
""",
        "batch-wide maximum: a row far below the others underflows": """
def softmax_cross_entropy(logits, targets):
    m = logits.max()
    log_probs = logits - m - torch.log(torch.exp(logits - m).sum(dim=1, keepdim=True))
    return -log_probs[torch.arange(len(targets)), targets].mean()
""",
    },
    "sgd_step": {
        "climbs the gradient (adds it)": """
def sgd_step(params, lr):
    with torch.no_grad():
        for p in params:
            p += lr * p.grad
            p.grad.zero_()
""",
        "never resets the gradients": """
def sgd_step(params, lr):
    with torch.no_grad():
        for p in params:
            p -= lr * p.grad
""",
        "rebinds the loop variable instead of updating in place": """
def sgd_step(params, lr):
    for p in params:
        p = p - lr * p.grad
        p.grad = None
""",
    },
    "adam": {
        "no bias correction": _ADAM_HEAD + """
    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            p -= self.lr * m / (v.sqrt() + self.eps)
""",
        "eps inside the square root": _ADAM_HEAD + """
    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            m_hat = m / (1 - self.beta1 ** self.t)
            v_hat = v / (1 - self.beta2 ** self.t)
            p -= self.lr * m_hat / (v_hat + self.eps).sqrt()
""",
        "second moment of g instead of g squared": _ADAM_HEAD + """
    @torch.no_grad()
    def step(self):
        self.t += 1
        for p, m, v in zip(self.params, self.m, self.v):
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).add_(p.grad.abs(), alpha=1 - self.beta2)
            m_hat = m / (1 - self.beta1 ** self.t)
            v_hat = v / (1 - self.beta2 ** self.t)
            p -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
""",
        "step counter advanced once per parameter, not once per step": _ADAM_HEAD + """
    @torch.no_grad()
    def step(self):
        for p, m, v in zip(self.params, self.m, self.v):
            self.t += 1
            m.mul_(self.beta1).add_(p.grad, alpha=1 - self.beta1)
            v.mul_(self.beta2).addcmul_(p.grad, p.grad, value=1 - self.beta2)
            m_hat = m / (1 - self.beta1 ** self.t)
            v_hat = v / (1 - self.beta2 ** self.t)
            p -= self.lr * m_hat / (v_hat.sqrt() + self.eps)
""",
    },
}
