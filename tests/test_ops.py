"""deepseek_mini.ops: the one dispatch module.

Each op runs the PyTorch reference on CPU tensors, the Triton kernel when the backend is forced
to Triton (here through the interpreter) and the kernel's supports() accepts the inputs, and the
reference again when it does not (float64, weights asked for). Bad input fails once, at ops,
with a message naming the problem.
"""

import time

import pytest
import torch

from deepseek_mini import backend, layers, lora, moe, ops, quant, rope
from deepseek_mini import attention as attention_math
from deepseek_mini.kernels import flash_attention, fused_lora, fused_moe, mla_decode, quant_matmul, rmsnorm, swiglu
from deepseek_mini.kernels import rope as rope_kernel


def _spy(monkeypatch, module, name):
    """Wrap module.name so that each call is recorded; returns the list of calls."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a, **k: calls.append(1) or real(*a, **k))
    return calls


def _routing(n, e, k):
    idx = torch.rand(n, e).topk(k, dim=-1).indices
    return idx, torch.rand(n, k)


def _cases():
    """(name, kernel module, kernel function, op call) for every op, on small float32 inputs."""
    x, w = torch.randn(3, 5, 16), torch.rand(16) + 0.5
    q, k, v = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    cos, sin = rope.precompute_rope(8, 6)
    idx, weight = _routing(7, 4, 2)
    experts = [torch.randn(4, 8, 16) * 0.1, torch.randn(4, 8, 16) * 0.1, torch.randn(4, 16, 8) * 0.1]
    xe = torch.randn(7, 16)
    ql, qr, kv, kr = torch.randn(2, 4, 1, 16), torch.randn(2, 4, 1, 8), torch.randn(2, 1, 9, 16), torch.randn(2, 1, 9, 8)
    base, a, b = torch.randn(12, 16), torch.randn(4, 16), torch.randn(12, 4)
    qlayer = quant.QuantLinear.from_linear(torch.nn.Linear(32, 24), "int8")
    xq = torch.randn(3, 32)
    return [
        ("rms_norm", rmsnorm, "rms_norm", lambda: ops.rms_norm(x, w)),
        ("swiglu", swiglu, "swiglu", lambda: ops.swiglu(x, x * 2)),
        ("apply_rope", rope_kernel, "apply_rope", lambda: ops.apply_rope(q, cos, sin, True)),
        ("attention", flash_attention, "flash_attention", lambda: ops.attention(q, k, v)),
        ("latent_attention", mla_decode, "mla_decode", lambda: ops.latent_attention(ql, qr, kv, kr, scale=0.2)),
        ("routed_experts", fused_moe, "fused_moe", lambda: ops.routed_experts(xe, idx, weight, *experts)),
        ("lora_linear", fused_lora, "fused_lora_linear", lambda: ops.lora_linear(x, base, None, a, b, 2.0)),
        ("quant_linear", quant_matmul, "int8_matmul", lambda: ops.quant_linear(qlayer, xq)),
    ]


@pytest.mark.parametrize("case", range(8), ids=[c[0] for c in _cases()])
def test_cpu_runs_the_reference_and_forced_triton_runs_the_kernel_with_the_same_result(case, monkeypatch):
    name, module, kernel, call = _cases()[case]
    calls = _spy(monkeypatch, module, kernel)
    with torch.no_grad():  # latent_attention uses its decode kernel only without gradients
        with backend.forced("auto"):  # CPU tensors: the reference
            expected = call()
        assert calls == [], f"ops.{name} ran the Triton kernel on CPU tensors"
        with backend.forced("triton"):
            got = call()
    assert calls == [1], f"ops.{name} did not run {module.__name__}.{kernel} on the forced Triton backend"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_inputs_the_kernels_do_not_support_stay_on_the_reference(monkeypatch):
    flash = _spy(monkeypatch, flash_attention, "flash_attention")
    norm = _spy(monkeypatch, rmsnorm, "rms_norm")
    decode = _spy(monkeypatch, mla_decode, "mla_decode")
    q = torch.randn(1, 2, 4, 8)
    with backend.forced("triton"):
        out, weights = ops.attention(q, q, q, return_weights=True)  # flash never forms the weights
        ops.attention(q.double(), q.double(), q.double())           # float64 (gradcheck)
        ops.rms_norm(torch.randn(2, 8, dtype=torch.float64), torch.ones(8, dtype=torch.float64))
        assert (flash, norm) == ([], [])
        ql = torch.randn(1, 2, 1, 8, requires_grad=True)  # the decode kernel has no backward: flash attention
        ops.latent_attention(ql, torch.randn(1, 2, 1, 4), torch.randn(1, 1, 5, 8), torch.randn(1, 1, 5, 4), scale=0.3)
    assert (flash, decode) == ([1], [])
    assert weights.shape == (1, 2, 4, 4)


def test_grouped_expert_reference_matches_the_loop_in_value_and_gradient():
    idx, weight = _routing(40, 8, 2)
    tensors = [torch.randn(40, 16), weight, torch.randn(8, 24, 16) * 0.1, torch.randn(8, 24, 16) * 0.1,
               torch.randn(8, 16, 24) * 0.1]
    tensors = [t.requires_grad_() for t in tensors]

    def run(fn):
        x, w, g, u, d = tensors
        y = fn(x, idx, w, g, u, d)
        return (y, *torch.autograd.grad((y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum(), tensors))

    for got, want in zip(run(moe.routed_experts_grouped), run(moe.routed_experts_loop)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # an expert that no token picked, and float64 (no grouped matmul there: the loop runs)
    idx[:] = 0
    torch.testing.assert_close(moe.routed_experts_grouped(tensors[0], idx, *tensors[1:]),
                               moe.routed_experts_loop(tensors[0], idx, *tensors[1:]), atol=1e-5, rtol=1e-5)
    assert not moe.grouped_supported(*(t.double() for t in (tensors[0], *tensors[2:])))
    # rows of 5 floats (20 bytes) are not a multiple of 16 bytes: the grouped matmul refuses them
    assert not moe.grouped_supported(torch.randn(3, 5), torch.randn(2, 4, 5), torch.randn(2, 4, 5), torch.randn(2, 5, 4))
    assert moe.grouped_supported(torch.randn(3, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 8, 4))


def test_flop_counter_counts_the_grouped_experts_like_the_loop():
    from torch.utils.flop_counter import FlopCounterMode

    idx, weight = _routing(12, 4, 2)
    tensors = [torch.randn(12, 16, requires_grad=True), torch.randn(4, 8, 16, requires_grad=True),
               torch.randn(4, 8, 16, requires_grad=True), torch.randn(4, 16, 8, requires_grad=True)]
    counts = []
    for fn in (moe.routed_experts_loop, moe.routed_experts_grouped):
        with FlopCounterMode(display=False) as counter:
            y = fn(tensors[0], idx, weight, *tensors[1:])
            (y * y).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 3 * (2 * 12 * 2 * 3 * 16 * 8), counts  # 3x the forward's matmuls


def test_ops_routed_experts_picks_the_grouped_reference_for_training_and_the_loop_for_big_inference(monkeypatch):
    grouped = _spy(monkeypatch, moe, "routed_experts_grouped")
    loop = _spy(monkeypatch, moe, "routed_experts_loop")
    gate, up, down = (torch.randn(4, 8, 16) * 0.1).requires_grad_(), torch.randn(4, 8, 16), torch.randn(4, 16, 8)
    idx, weight = _routing(200, 4, 2)  # 100 rows per expert
    x = torch.randn(200, 16)
    ops.routed_experts(x, idx, weight, gate, up, down)
    assert (len(grouped), len(loop)) == (1, 0)
    with torch.no_grad():
        ops.routed_experts(x, idx, weight, gate, up, down)
    assert (len(grouped), len(loop)) == (1, 1)


@pytest.mark.parametrize("call,error,message", [
    (lambda: ops.rms_norm(torch.randn(2, 8), torch.ones(7)), ValueError, r"rms_norm: weight has shape \(7,\)"),
    (lambda: ops.swiglu(torch.randn(2, 8), torch.randn(2, 9)), ValueError, "swiglu: gate .* must have the same shape"),
    (lambda: ops.apply_rope(torch.randn(1, 2, 6, 8), torch.randn(5, 4), torch.randn(6, 4), True), ValueError,
     r"apply_rope: cos has shape \(5, 4\), expected \(6, 4\)"),
    (lambda: ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)), ValueError,
     r"query heads \(3\) must be a multiple of key/value heads \(2\)"),
    (lambda: ops.routed_experts(torch.randn(3, 4), torch.tensor([[0], [6], [1]]), torch.ones(3, 1),
                                torch.randn(4, 2, 4), torch.randn(4, 2, 4), torch.randn(4, 4, 2)), ValueError,
     r"topk_idx values must lie in \[0, 4\)"),
    (lambda: ops.lora_linear(torch.randn(2, 4), torch.randn(3, 4), None, torch.randn(2, 5), torch.randn(3, 2), 1.0),
     ValueError, "lora_A must be"),
    (lambda: ops.quant_linear(quant.QuantLinear.from_linear(torch.nn.Linear(8, 4), "int8"), torch.randn(2, 9)),
     ValueError, "in_features=8"),
    (lambda: ops.quant_linear(quant.QuantLinear.from_linear(torch.nn.Linear(8, 4), "int8"), torch.ones(2, 8).long()),
     TypeError, "token ids go through an embedding"),
])
@pytest.mark.parametrize("mode", ["torch", "triton"])
def test_bad_input_is_a_clear_error_on_both_paths(call, error, message, mode):
    with backend.forced(mode), pytest.raises(error, match=message):
        call()


def test_the_public_functions_of_each_file_still_dispatch_and_references_do_not():
    x = torch.randn(2, 3, 8, requires_grad=True)
    with backend.forced("triton"):
        assert type(layers.rms_norm(x, torch.ones(8)).grad_fn).__name__ == "RMSNormFunctionBackward"
        assert "RMSNorm" not in type(layers.rms_norm_reference(x, torch.ones(8)).grad_fn).__name__
        q = torch.randn(1, 2, 4, 8, requires_grad=True)
        assert type(attention_math.scaled_dot_product_attention(q, q, q).grad_fn).__name__ == "FlashAttentionFunctionBackward"
        # moe.routed_experts and lora.lora_linear are the references the kernels are tested against
        idx, weight = _routing(5, 3, 1)
        y = moe.routed_experts(x[0, :, :], idx[:3], weight[:3], torch.randn(3, 4, 8), torch.randn(3, 4, 8), torch.randn(3, 8, 4))
        assert "FusedMoE" not in type(y.grad_fn).__name__
        y = lora.lora_linear(x, torch.randn(4, 8), None, torch.randn(2, 8), torch.randn(4, 2), 1.0)
        assert "FusedLoRA" not in type(y.grad_fn).__name__


def test_time_it_measures_and_refuses_bad_arguments():
    calls = []
    seconds = backend.time_it(lambda: calls.append(1), repeats=3, warmup=2)
    assert len(calls) == 5 and 0 <= seconds < 1
    sleeps = iter([0.05, 0.0, 0.02])  # wall clock: the fastest call; the CPU clock does not count sleeping
    assert 0.0 <= backend.time_it(lambda: time.sleep(next(sleeps)), repeats=3, warmup=0, best=True) < 0.015
    assert backend.time_it(lambda: time.sleep(0.05), repeats=2, warmup=0, cpu_clock=True) < 0.03
    assert backend.time_it(lambda: time.sleep(0.05), repeats=2, warmup=0) >= 0.05
    with pytest.raises(ValueError, match="repeats must be >= 1"):
        backend.time_it(lambda: None, repeats=0)
