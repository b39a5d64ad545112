"""Flash attention and MLA decode Triton kernels against `deepseek_mini.attention`.

CPU runs go through the Triton interpreter on small ragged shapes (sequence lengths that are
not multiples of the blocks, head dims that are not powers of two, q/k and v head dims that
differ), fp32 and fp16, forward and backward, with NaN-poisoned outputs. The `gpu` tests repeat
the checks at model sizes and in bf16 when CUDA is present.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepseek_mini import attention, backend, rope
from deepseek_mini.kernels import flash_attention as fa
from deepseek_mini.kernels._checks import poison_empty
from deepseek_mini.kernels.mla_decode import mla_decode

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO = Path(__file__).resolve().parents[1]


def _assert_close(actual, expected, tol, what):
    """Max error relative to the largest reference value: robust across magnitudes and dtypes."""
    actual, expected = actual.float(), expected.float()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values (an element was never written?)"
    err = (actual - expected).abs().max().item() / max(expected.abs().max().item(), 1e-6)
    assert err <= tol, f"{what}: max error {err:.2e} of the largest value, allowed {tol:.0e}"


def _reference_lse(q, k, causal, window, scale):
    """log-sum-exp of the masked, scaled scores, per query row (what the kernel saves)."""
    group = q.shape[1] // k.shape[1]
    scores = (q.float() @ k.float().repeat_interleave(group, 1).transpose(-2, -1)) * scale
    mask = attention.attention_mask(q.shape[2], k.shape[2], causal=causal, window=window, device=q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, -1)


def _check_flash(B, Hq, Hkv, S, T, D, DV, causal, window, dtype, tol):
    q = torch.randn(B, Hq, S, D, device=DEVICE).to(dtype)
    k = torch.randn(B, Hkv, T, D, device=DEVICE).to(dtype)
    v = torch.randn(B, Hkv, T, DV, device=DEVICE).to(dtype)
    do = torch.randn(B, Hq, S, DV, device=DEVICE).to(dtype)
    scale = 0.7 * D ** -0.5  # not the default, so a kernel that ignores `scale` fails
    # reference in fp32 on the same (rounded) inputs
    leaves_ref = [t.detach().float().requires_grad_(True) for t in (q, k, v)]
    with backend.forced("torch"):  # the reference, even where CUDA would pick the kernel
        out_ref = attention.scaled_dot_product_attention(*leaves_ref, causal=causal, window=window, scale=scale)
    grads_ref = torch.autograd.grad(out_ref, leaves_ref, do.float())
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    with poison_empty():
        out = fa.flash_attention(*leaves, causal=causal, window=window, scale=scale)
        grads = torch.autograd.grad(out, leaves, do)
    assert out.shape == (B, Hq, S, DV) and out.dtype == dtype
    _assert_close(out, out_ref, tol, "out")
    for name, g, g_ref in zip("qkv", grads, grads_ref):
        assert g.shape == g_ref.shape and g.dtype == dtype
        _assert_close(g, g_ref, 2 * tol, f"d{name}")
    _, lse = fa.flash_attention_forward(q, k, v, causal, window, scale)
    _assert_close(lse, _reference_lse(q, k, causal, window, scale), tol, "lse")


# (B, Hq, Hkv, S, T, D, DV, causal, window)
FLASH_CASES = {
    "causal": (1, 2, 2, 37, 37, 16, 16, True, None),
    "gqa-after-cache": (1, 4, 2, 20, 45, 24, 8, True, None),
    # W=18: query 32, alone in the last query block, is the last one that sees key block 0
    "window-mqa": (2, 2, 1, 33, 33, 16, 16, True, 18),
    "window-after-cache": (1, 2, 2, 9, 40, 16, 16, True, 12),
    "full": (1, 2, 2, 19, 30, 16, 32, False, None),
    "decode": (1, 2, 1, 1, 50, 32, 32, True, None),
    # q/k head dim 48 = 32 + 16 (head_blocks cuts it in two, like MLA's 192 = 128 + 64), v 32
    "split-head-dim": (1, 2, 2, 21, 21, 48, 32, True, None),
    "split-head-dim-gqa-cache": (1, 4, 2, 13, 30, 40, 16, True, 9),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(FLASH_CASES))
def test_flash_attention_matches_reference(case, dtype, tol):
    _check_flash(*FLASH_CASES[case], dtype, tol)


def test_flash_attention_strided_inputs():
    # [B, S, H, D] projections viewed as [B, H, S, D], as attention modules produce them
    B, S, H, D = 1, 21, 2, 16
    q, k, v = (torch.randn(B, S, H, D, device=DEVICE).transpose(1, 2) for _ in range(3))
    out = fa.flash_attention(q, k, v)
    with backend.forced("torch"):
        _assert_close(out, attention.scaled_dot_product_attention(q, k, v), 1e-5, "out")


def test_flash_attention_saves_only_lse():
    q, k, v = (torch.randn(1, 2, 24, 16, device=DEVICE, requires_grad=True) for _ in range(3))
    out = fa.flash_attention(q, k, v)
    saved = sorted(tuple(t.shape) for t in out.grad_fn.saved_tensors)
    # q, k, v, out and the [B, H, S] log-sum-exp: nothing of size S x T
    assert saved == sorted([(1, 2, 24, 16)] * 4 + [(1, 2, 24)])


def test_flash_attention_rejects_bad_input():
    q, k = torch.randn(1, 3, 8, 16), torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple of key/value heads \(2\)"):
        fa.flash_attention_forward(q, k, k)
    q = torch.randn(1, 2, 9, 16)
    with pytest.raises(ValueError, match="k has 8 positions, fewer than the 9 queries"):
        fa.flash_attention_forward(q, k, k)
    with pytest.raises(ValueError, match="window needs causal=True"):
        fa.flash_attention_forward(q[:, :, :8], k, k, causal=False, window=4)
    with pytest.raises(TypeError, match="q is float32, k is float16"):
        fa.flash_attention_forward(q[:, :, :8], k.half(), k.half())
    with pytest.raises(ValueError, match=r"k has shape \(1, 2, 8, 16\), expected \(1, \*, \*, 32\)"):
        fa.flash_attention_forward(torch.randn(1, 2, 8, 32), k, k)
    with pytest.raises(ValueError, match="unit-stride last dimension"):
        fa.flash_attention_forward(q[..., ::2], k[..., ::2], k[..., ::2])


# ----------------------------------------------------------------------------------------------
# MLA decode
# ----------------------------------------------------------------------------------------------

def _reference_mla(q_latent, q_rope, kv, k_rope, scale, lens=None):
    """The absorbed-MLA step as the library computes it: MQA over [latent, rope key] with the
    latent as value, one sequence at a time so each sees only its valid cache."""
    outs = []
    for b in range(q_latent.shape[0]):
        n = kv.shape[1] if lens is None else int(lens[b])
        q = torch.cat((q_latent[b:b + 1], q_rope[b:b + 1]), -1).float()[:, :, None]
        k = torch.cat((kv[b:b + 1, :n], k_rope[b:b + 1, :n]), -1).float()[:, None]
        with backend.forced("torch"):
            outs.append(attention.scaled_dot_product_attention(q, k, kv[b:b + 1, :n].float()[:, None],
                                                               causal=True, scale=scale)[:, :, 0])
    return torch.cat(outs)


def _check_mla(B, H, C, R, T, lens, splits, dtype, tol):
    q_latent = torch.randn(B, H, C, device=DEVICE).to(dtype)
    q_rope = torch.randn(B, H, R, device=DEVICE).to(dtype)
    # the cache as the MLA module keeps it, [B, 1, T, dim]; the kernel reads [:, 0] views
    kv = torch.randn(B, 1, T, C, device=DEVICE).to(dtype)
    k_rope = torch.randn(B, 1, T, R, device=DEVICE).to(dtype)
    lens = None if lens is None else torch.tensor(lens, device=DEVICE)
    scale = (C + R) ** -0.5 * 1.3
    with poison_empty():
        out = mla_decode(q_latent, q_rope, kv[:, 0], k_rope[:, 0], scale=scale, cache_seqlens=lens, num_splits=splits)
    assert out.shape == (B, H, C) and out.dtype == dtype
    _assert_close(out, _reference_mla(q_latent, q_rope, kv[:, 0], k_rope[:, 0], scale, lens), tol, "o_latent")


# (B, H, C, R, T, cache_seqlens, num_splits)
MLA_CASES = {
    "one-split": (2, 3, 32, 16, 37, None, 1),
    "splits-ragged-lengths": (3, 20, 48, 8, 50, [50, 1, 17], 5),
    "more-splits-than-blocks": (1, 16, 32, 16, 20, None, 8),
    "auto-splits": (2, 4, 24, 8, 33, [33, 30], None),
}


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 4e-3)], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", list(MLA_CASES))
def test_mla_decode_matches_reference(case, dtype, tol):
    _check_mla(*MLA_CASES[case], dtype, tol)


def test_mla_decode_rejects_bad_input():
    q, qr = torch.randn(2, 4, 32), torch.randn(2, 4, 8)
    kv, kr = torch.randn(2, 10, 32), torch.randn(2, 10, 8)
    with pytest.raises(ValueError, match=r"kv_latent has shape \(2, 10, 16\), expected \(2, 10, 32\)"):
        mla_decode(q, qr, kv[..., :16].contiguous(), kr, scale=0.1)
    with pytest.raises(ValueError, match=r"k_rope has shape \(2, 9, 8\), expected \(2, 10, 8\)"):
        mla_decode(q, qr, kv, kr[:, :9], scale=0.1)
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[1, 10\]"):
        mla_decode(q, qr, kv, kr, scale=0.1, cache_seqlens=torch.tensor([3, 11]))
    with pytest.raises(TypeError, match="cache_seqlens has dtype float32"):
        mla_decode(q, qr, kv, kr, scale=0.1, cache_seqlens=torch.tensor([3.0, 4.0]))
    with pytest.raises(TypeError, match="q_latent is float32, q_rope is float16"):
        mla_decode(q, qr.half(), kv, kr, scale=0.1)


# ----------------------------------------------------------------------------------------------
# the library's attention modules take the kernels on the Triton backend
# ----------------------------------------------------------------------------------------------

def test_attention_module_dispatches_to_flash_attention():
    torch.manual_seed(0)
    mha = attention.MultiHeadAttention(32, n_heads=4, n_kv_heads=2, window=6)
    x = torch.randn(2, 19, 32, requires_grad=True)
    cos, sin = rope.precompute_rope(8, 19)
    with backend.forced("torch"):
        expected = mha(x, cos, sin)
        expected_grads = torch.autograd.grad(expected.square().sum(), [x, mha.q_proj.weight])
    with backend.forced("triton"):
        out = mha(x, cos, sin)
        grads = torch.autograd.grad(out.square().sum(), [x, mha.q_proj.weight])
        q = torch.randn(1, 2, 5, 8, requires_grad=True)
        fused = attention.scaled_dot_product_attention(q, q, q)
    assert type(fused.grad_fn).__name__ == "FlashAttentionFunctionBackward"
    _assert_close(out, expected, 1e-5, "MultiHeadAttention output")
    for g, g_ref in zip(grads, expected_grads):
        _assert_close(g, g_ref, 1e-5, "MultiHeadAttention grads")


def test_absorbed_mla_decode_uses_the_kernel_and_matches_naive(monkeypatch):
    torch.manual_seed(0)
    mla = attention.MultiHeadLatentAttention(dim=48, n_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
                                             qk_rope_head_dim=8, v_head_dim=16, q_lora_rank=24)
    x = torch.randn(2, 13, 48)
    cos, sin = rope.precompute_rope(8, 13)
    import deepseek_mini.kernels.mla_decode as mla_module

    calls, original = [], mla_module.mla_decode

    def counting(*args, **kwargs):  # records the cache each call reads, then runs the kernel
        calls.append(args[2].shape)
        return original(*args, **kwargs)

    def generate(absorb):
        """Prefill 10 tokens, then decode 3 one at a time; the outputs of the decode steps."""
        cache, outs = attention.KVCache(), []
        mla(x[:, :10], cos[:10], sin[:10], cache=cache, absorb=absorb)
        for t in range(10, 13):
            outs.append(mla(x[:, t:t + 1], cos[t:t + 1], sin[t:t + 1], cache=cache, absorb=absorb))
        return torch.cat(outs, 1)

    with torch.no_grad():
        with backend.forced("torch"):
            expected = generate(absorb=False)
        monkeypatch.setattr(mla_module, "mla_decode", counting)
        with backend.forced("triton"):
            got = generate(absorb=True)
    assert calls == [(2, 11, 32), (2, 12, 32), (2, 13, 32)]  # one kernel call per decode step
    _assert_close(got, expected, 1e-5, "absorbed MLA decode")


@pytest.mark.parametrize("script", ["bench_attention.py", "bench_mla_decode.py", "run_all.py"])
def test_benchmark_scripts_say_they_need_cuda(script):
    if torch.cuda.is_available():
        pytest.skip("this checks the message printed on a machine without CUDA")
    run = subprocess.run([sys.executable, str(REPO / "benchmarks" / script)], capture_output=True,
                         text=True, timeout=300, cwd=REPO)
    assert run.returncode == 0, run.stderr
    assert "needs CUDA" in run.stdout


# ----------------------------------------------------------------------------------------------
# GPU: model sizes, bf16
# ----------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3), (torch.float32, 4e-3)],
                         ids=["bf16", "fp16", "fp32-tf32"])
@pytest.mark.parametrize("case", [
    (2, 16, 16, 1024, 1024, 128, 128, True, None),
    (2, 16, 4, 777, 1500, 64, 64, True, None),
    (1, 8, 2, 2048, 2048, 128, 128, True, 256),
    (2, 16, 16, 512, 512, 192, 128, True, None),  # MLA prefill: qk 128 + 64 rope, v 128
    (2, 8, 8, 300, 300, 64, 64, False, None),
], ids=["causal", "gqa-cache", "window", "mla-dims", "full"])
def test_flash_attention_gpu_model_sizes(case, dtype, tol):
    _check_flash(*case, dtype, tol)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 4e-3)], ids=["bf16", "fp16"])
def test_mla_decode_gpu_model_sizes(dtype, tol):
    _check_mla(32, 16, 512, 64, 4096, None, None, dtype, tol)
    _check_mla(8, 128, 512, 64, 3000, [3000, 1, 2048, 17, 999, 3000, 1500, 64], None, dtype, tol)
