import time, torch
torch.set_num_threads(1)
from deepseek_mini import moe
def bench(N, D, I, E, K, grad):
    torch.manual_seed(0)
    x = torch.randn(N, D, requires_grad=grad); g = (torch.randn(E, I, D) * .1).requires_grad_(grad)
    u = torch.randn(E, I, D) * .1; d = torch.randn(E, D, I) * .1
    idx = torch.rand(N, E).topk(K, -1).indices; w = torch.rand(N, K)
    a = moe.routed_experts_loop(x, idx, w, g, u, d); b = moe.routed_experts_grouped(x, idx, w, g, u, d)
    err = (a - b).abs().max().item()
    res = {}
    for name, f in (("loop", moe.routed_experts_loop), ("grouped", moe.routed_experts_grouped)):
        def run():
            y = f(x, idx, w, g, u, d)
            if grad: (y * y).sum().backward()
        run(); t = time.perf_counter(); n = 0
        while time.perf_counter() - t < 1.0: run(); n += 1
        res[name] = (time.perf_counter() - t) / n * 1e3
    print(f"N={N} D={D} I={I} E={E} K={K} grad={grad}: loop {res['loop']:.2f} ms, grouped {res['grouped']:.2f} ms, "
          f"ratio {res['loop']/res['grouped']:.2f}x, max diff {err:.1e}", flush=True)
for grad in (False, True):
    for cfg in ((256, 64, 32, 8, 2), (1024, 64, 32, 8, 2), (512, 128, 64, 16, 4), (2048, 256, 128, 64, 6), (4, 64, 32, 8, 2)):
        bench(*cfg, grad)
