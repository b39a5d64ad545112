"""Typical wrong answers to the graded exercises of 02_mnist_cnn (never released to students).

tests/test_grading.py puts each one in place of its answer cell and checks that the exercise's
hidden tests fail on it with an assertion message. Keys: the answer cell's grade_id; values:
{what the mistake is: the code a student might write}.
"""

_CNN_INIT = """
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3, padding=1)
        self.fc1 = nn.Linear(32 * 7 * 7, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.embed(self.conv_maps(x)))
"""

_CNN_EMBED = """
    def embed(self, maps):
        flat = F.max_pool2d(maps, 2).flatten(1)
        return F.dropout(F.relu(self.fc1(flat)), 0.25, self.training)
"""

_CNN_MAPS = """
    def conv_maps(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return F.relu(self.conv2(x))
"""

_GRAD_CAM_HEAD = """
def grad_cam(model, x, target):
    maps = model.conv_maps(x)
    logits = model.fc2(model.embed(maps))
"""

_PGD_HEAD = """
def pgd_attack(model, x, y, eps, step_size, steps, generator=None):
    was_training = model.training
    model.eval()
    x = x.detach()
"""

_PGD_START = """    u = torch.rand(x.shape, generator=generator, device=x.device)
    x_adv = (x + eps * (2 * u - 1)).clamp(0, 1)
"""

_PGD_LOOP = """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
"""

_PGD_END = """    model.train(was_training)
    return x_adv.detach()
"""

WRONG_ANSWERS = {
    "cnn": {
        "average pooling instead of max pooling": _CNN_INIT + """
    def conv_maps(self, x):
        x = F.avg_pool2d(F.relu(self.conv1(x)), 2)
        return F.relu(self.conv2(x))
""" + _CNN_EMBED,
        "no ReLU after conv2": _CNN_INIT + """
    def conv_maps(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        return self.conv2(x)
""" + _CNN_EMBED,
        "dropout left on in evaluation mode": _CNN_INIT + _CNN_MAPS + """
    def embed(self, maps):
        flat = F.max_pool2d(maps, 2).flatten(1)
        return F.dropout(F.relu(self.fc1(flat)), 0.25)
""",
        "convolutions without padding (and fc1 sized to match)": """
class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, kernel_size=3)
        self.conv2 = nn.Conv2d(16, 32, kernel_size=3)
        self.fc1 = nn.Linear(32 * 5 * 5, 128)
        self.fc2 = nn.Linear(128, 10)

    def forward(self, x):
        return self.fc2(self.embed(self.conv_maps(x)))
""" + _CNN_MAPS + _CNN_EMBED,
        "dropout as a bare 0/1 mask: the kept features are not scaled by 1/(1-p)": _CNN_INIT + _CNN_MAPS + """
    def embed(self, maps):
        h = F.relu(self.fc1(F.max_pool2d(maps, 2).flatten(1)))
        return h * (torch.rand_like(h) > 0.25) if self.training else h
""",
        "dropout on the wrong tensor (fc1's input, not its output)": _CNN_INIT + _CNN_MAPS + """
    def embed(self, maps):
        flat = F.max_pool2d(maps, 2).flatten(1)
        return F.relu(self.fc1(F.dropout(flat, 0.25, self.training)))
""",
    },
    "train_step": {
        "no autocast: the forward pass runs in float32": """
def train_step(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()
""",
        "casts the model to bfloat16 instead of autocasting": """
def train_step(model, optimizer, x, y):
    model.train()
    model.bfloat16()
    optimizer.zero_grad()
    loss = F.cross_entropy(model(x.bfloat16()), y)
    loss.backward()
    optimizer.step()
    return loss.item()
""",
        "never clears the old gradients": """
def train_step(model, optimizer, x, y):
    model.train()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()
""",
        "forgets optimizer.step()": """
def train_step(model, optimizer, x, y):
    model.train()
    optimizer.zero_grad()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    return loss.item()
""",
        "forgets model.train() (dropout stays off)": """
def train_step(model, optimizer, x, y):
    optimizer.zero_grad()
    with torch.autocast(x.device.type, dtype=torch.bfloat16):
        loss = F.cross_entropy(model(x), y)
    loss.backward()
    optimizer.step()
    return loss.item()
""",
    },
    "grad_cam": {
        "no ReLU on the weighted sum": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = (grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True)
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)).detach()
""",
        "channel weights averaged over the channel axis instead of the positions": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=1, keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)).detach()
""",
        "explains the predicted class, not the target": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.max(dim=1).values.sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)).detach()
""",
        "normalised by the batch's maximum, not each image's": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.max().clamp_min(1e-8)).detach()
""",
        "nearest-neighbour upsampling": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="nearest")[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)).detach()
""",
        "no clamp on the maximum: an all-zero heatmap becomes nan": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True)).detach()
""",
        "returns the heatmaps without detaching them": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    return cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)
""",
        "upsamples to (W, H): only square images hide the swap": _GRAD_CAM_HEAD + """
    grads, = torch.autograd.grad(logits.gather(1, target[:, None]).sum(), maps)
    cam = F.relu((grads.mean(dim=(2, 3), keepdim=True) * maps).sum(dim=1, keepdim=True))
    cam = F.interpolate(cam, size=(x.shape[-1], x.shape[-2]), mode="bilinear", align_corners=False)[:, 0]
    return (cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-8)).detach()
""",
    },
    "pca": {
        "does not centre the data": """
def pca(x, k):
    _, _, vh = torch.linalg.svd(x, full_matrices=False)
    return x @ vh[:k].T, vh[:k]
""",
        "takes the directions of smallest variance (the last rows of Vh)": """
def pca(x, k):
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[-k:].T, vh[-k:]
""",
        "projects the uncentred data": """
def pca(x, k):
    centred = x - x.mean(dim=0, keepdim=True)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return x @ vh[:k].T, vh[:k]
""",
        "centres with the mean of the whole matrix, not of each column": """
def pca(x, k):
    centred = x - x.mean()
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    return centred @ vh[:k].T, vh[:k]
""",
    },
    "fgsm": {
        "steps against the gradient (lowers the loss)": """
def fgsm(model, x, y, eps):
    x = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x - eps * grad.sign()).clamp(0, 1).detach()
""",
        "no clipping to [0, 1]": """
def fgsm(model, x, y, eps):
    x = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).detach()
""",
        "the gradient itself instead of its sign": """
def fgsm(model, x, y, eps):
    x = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad).clamp(0, 1).detach()
""",
        "returns x_adv still attached to the graph": """
def fgsm(model, x, y, eps):
    x = x.detach().clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1)
""",
        "loss.backward() leaves gradients in the model's parameters": """
def fgsm(model, x, y, eps):
    x = x.detach().clone().requires_grad_(True)
    F.cross_entropy(model(x), y).backward()
    return (x + eps * x.grad.sign()).clamp(0, 1).detach()
""",
    },
    "pgd_attack": {
        'no random start: begins at x itself': _PGD_HEAD + """    x_adv = x.clone()
""" + _PGD_LOOP + _PGD_END,
        'random start in [0, eps) only: every pixel starts brighter': _PGD_HEAD + """    u = torch.rand(x.shape, generator=generator, device=x.device)
    x_adv = (x + eps * u).clamp(0, 1)
""" + _PGD_LOOP + _PGD_END,
        'Gaussian random start (eps * randn): leaves the eps-ball': _PGD_HEAD + """    x_adv = (x + eps * torch.randn(x.shape, generator=generator, device=x.device)).clamp(0, 1)
""" + _PGD_LOOP + _PGD_END,
        'random start not clipped to [0, 1]': _PGD_HEAD + """    u = torch.rand(x.shape, generator=generator, device=x.device)
    x_adv = x + eps * (2 * u - 1)
""" + _PGD_LOOP + _PGD_END,
        'no projection onto the eps-ball (only the pixel range)': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = (x_adv.detach() + step_size * grad.sign()).clamp(0, 1)
""" + _PGD_END,
        'no clip to [0, 1] (only the eps-ball)': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps)
""" + _PGD_END,
        'projects onto the eps-ball around the random start, not around x': _PGD_HEAD + _PGD_START + """    x_start = x_adv.clone()
    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x_start - eps), x_start + eps).clamp(0, 1)
""" + _PGD_END,
        'projects only once, after the last step': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()
    x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
""" + _PGD_END,
        'steps against the gradient (lowers the loss)': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() - step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
""" + _PGD_END,
        'the gradient itself instead of its sign': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + step_size * grad
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
""" + _PGD_END,
        'the gradient taken once, at the start, and reused for every step': _PGD_HEAD + _PGD_START + """    x_adv.requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
    x_adv = x_adv.detach()
    for _ in range(steps):
        x_adv = x_adv + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
""" + _PGD_END,
        "loss.backward() leaves gradients in the model's parameters": _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        F.cross_entropy(model(x_adv), y).backward()
        x_adv = x_adv.detach() + step_size * x_adv.grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
""" + _PGD_END,
        "freezes the model's parameters for speed and leaves them frozen": _PGD_HEAD + """    for p in model.parameters():
        p.requires_grad_(False)
""" + _PGD_START + _PGD_LOOP + _PGD_END,
        'attacks in training mode (dropout on)': """
def pgd_attack(model, x, y, eps, step_size, steps, generator=None):
    x = x.detach()
""" + _PGD_START + _PGD_LOOP + """    return x_adv.detach()
""",
        'switches to eval mode and leaves the model there': _PGD_HEAD + _PGD_START + _PGD_LOOP + """    return x_adv.detach()
""",
        'always hands the model back in training mode': _PGD_HEAD + _PGD_START + _PGD_LOOP + """    model.train()
    return x_adv.detach()
""",
        'never detaches: x_adv stays part of a growing graph': _PGD_HEAD + _PGD_START + """    for _ in range(steps):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv + step_size * grad.sign()
        x_adv = torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp(0, 1)
    model.train(was_training)
    return x_adv
""",
    },
}
