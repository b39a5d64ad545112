"""Quantization: each scheme meets the error bound its rounding implies, int4 packing is exact,
FP8 blocks dequantize like a plain per-block loop (and like transformers' FP8 loader), and
QuantLinear / quantize_model compute with exactly the dequantized weight."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek_mini.quant import (
    FP8_DTYPE, FP8_MAX, QuantLinear, dequantize_fp8_activation, dequantize_fp8_block,
    dequantize_fp8_state_dict, dequantize_int4, dequantize_int8, pack_int4, quantization_error, quantize_fp8_activation,
    quantize_fp8_block, quantize_int4, quantize_int8, quantize_model, unpack_int4,
)

# float32 slack on top of the exact rounding bounds (w / scale and q * scale each round once)
EPS = 1e-6


def heavy_tailed(n, k):
    """Weights with outliers and an all-zero row, closer to real layers than a plain randn."""
    w = torch.randn(n, k) * torch.rand(n, 1) * 0.1
    w[0, 3] = 2.5
    w[-1] = 0.0
    return w


# ---------------------------------------------------------------------------------------------
# int8
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_absmax_error_at_most_half_a_step(per_channel):
    w = heavy_tailed(33, 70)
    q, scale, zp = quantize_int8(w, per_channel=per_channel, symmetric=True)
    assert q.dtype == torch.int8 and zp is None and scale.dtype == torch.float32
    assert q.abs().max() <= 127
    if per_channel:  # one scale per output row = that row's absmax / 127
        assert scale.shape == (33,)
        expected = w.abs().amax(dim=1) / 127
        expected[-1] = 1.0  # all-zero row: any scale works, we use 1 (never divide by 0)
        torch.testing.assert_close(scale, expected)
        step = scale[:, None]
    else:
        assert scale.shape == ()
        torch.testing.assert_close(scale, w.abs().max() / 127)
        step = scale
    w_hat = dequantize_int8(q, scale)
    assert ((w_hat - w).abs() <= step / 2 * (1 + EPS)).all()
    assert (w_hat[-1] == 0).all()  # the zero row comes back exactly
    # the largest weight (of each row, or of the tensor) lands on code +-127: the full range is used
    assert q.abs().amax(dim=1)[:-1].eq(127).all() if per_channel else q.abs().max() == 127


@pytest.mark.parametrize("per_channel", [True, False])
def test_int8_zero_point_error_and_exact_zero(per_channel):
    # one-sided data (like post-ReLU activations) is where a zero point pays off
    w = torch.rand(20, 64) * 3 + 0.5
    w[:, 5] = 0.0
    w[3, 7] = -0.25
    q, scale, zp = quantize_int8(w, per_channel=per_channel, symmetric=False)
    assert zp is not None and zp.dtype == torch.int32 and zp.shape == scale.shape
    lo = w.amin(dim=1).clamp(max=0) if per_channel else w.min().clamp(max=0)
    hi = w.amax(dim=1) if per_channel else w.max()
    torch.testing.assert_close(scale, (hi - lo) / 255)
    step = scale[:, None] if per_channel else scale
    w_hat = dequantize_int8(q, scale, zp)
    assert ((w_hat - w).abs() <= step / 2 * (1 + EPS) + EPS).all()
    assert (w_hat[:, 5] == 0).all()  # 0.0 is exactly representable
    assert q.min() == -128 and q.max() == 127  # all 256 codes in use
    # on one-sided data the zero point halves the step compared with absmax
    _, sym_scale, _ = quantize_int8(w, per_channel=per_channel, symmetric=True)
    assert (scale < 0.6 * sym_scale).all()


def test_int8_bad_inputs():
    with pytest.raises(TypeError, match="w must be a float"):
        quantize_int8(torch.ones(2, 2, dtype=torch.int32))
    with pytest.raises(ValueError, match="inf or NaN"):
        quantize_int8(torch.tensor([[1.0, float("nan")]]))
    q, scale, _ = quantize_int8(torch.randn(4, 8))
    with pytest.raises(ValueError, match=r"scale must have shape \(\) .* \(4,\)"):
        dequantize_int8(q, scale[:3])
    with pytest.raises(TypeError, match="q must be a torch.int8"):
        dequantize_int8(q.float(), scale)


# ---------------------------------------------------------------------------------------------
# int4
# ---------------------------------------------------------------------------------------------

def test_int4_packing_round_trips_all_16_values_with_documented_layout():
    values = torch.arange(-8, 8, dtype=torch.int8)
    q = torch.stack([values, values.flip(0)])  # every value in both the low and the high nibble
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (2, 8)
    assert torch.equal(unpack_int4(packed), q)
    # low nibble = even column, two's complement: (-8, 7) -> 0x8 | 0x7 << 4; (-1, 1) -> 0xF | 0x1 << 4
    assert pack_int4(torch.tensor([[-8, 7, -1, 1]], dtype=torch.int8)).tolist() == [[0x78, 0x1F]]
    every_byte = torch.arange(256, dtype=torch.int32).to(torch.uint8).reshape(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("group_size", [2, 16, 64])
def test_int4_group_error_at_most_half_a_step(group_size):
    w = heavy_tailed(24, 128)
    packed, scales = quantize_int4(w, group_size=group_size)
    assert packed.shape == (24, 64) and scales.shape == (24, 128 // group_size)
    groups = w.reshape(24, -1, group_size)
    expected = groups.abs().amax(dim=-1) / 7
    torch.testing.assert_close(scales[:-1], expected[:-1])
    q = unpack_int4(packed)
    assert q.min() >= -7 and q.max() <= 7
    w_hat = dequantize_int4(packed, scales, group_size)
    step = scales.repeat_interleave(group_size, dim=1)
    assert ((w_hat - w).abs() <= step / 2 * (1 + EPS)).all()
    assert (w_hat[-1] == 0).all()
    # smaller groups isolate the outlier at [0, 3]: row 0 beyond its first group keeps precision
    if group_size < 128:
        assert (w_hat[0, group_size:] - w[0, group_size:]).abs().max() < 2.5 / 14


def test_int4_bad_inputs():
    with pytest.raises(ValueError, match="K=100 columns, not divisible by group_size=64"):
        quantize_int4(torch.randn(4, 100), group_size=64)
    with pytest.raises(ValueError, match="group_size must be an even integer"):
        quantize_int4(torch.randn(4, 99), group_size=3)
    with pytest.raises(ValueError, match="w must be 2-D"):
        quantize_int4(torch.randn(4, 8, 8), group_size=8)
    with pytest.raises(ValueError, match=r"must lie in \[-8, 7\]"):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))
    with pytest.raises(ValueError, match="K even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    packed, scales = quantize_int4(torch.randn(4, 64), group_size=32)
    with pytest.raises(ValueError, match=r"scales must have shape \(4, 2\)"):
        dequantize_int4(packed, scales[:, :1], group_size=32)


# ---------------------------------------------------------------------------------------------
# FP8 e4m3, 128x128 weight blocks, 1x128 activation tiles
# ---------------------------------------------------------------------------------------------

def loop_dequant_fp8(w_fp8, scale_inv, bs):
    """The plainest possible reference: visit each block and multiply it by its own scale."""
    out = torch.empty(w_fp8.shape)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            block = w_fp8[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs].float()
            out[i * bs:(i + 1) * bs, j * bs:(j + 1) * bs] = block * scale_inv[i, j]
    return out


def random_fp8_checkpoint_tensor(n, k, bs):
    """A (weight, weight_scale_inv) pair as a checkpoint stores it: arbitrary finite e4m3 codes
    (every bit pattern except NaN) and positive float32 scales of different magnitudes."""
    codes = torch.randint(0, 256, (n, k), dtype=torch.int32).to(torch.uint8)
    codes[(codes & 0x7F) == 0x7F] = 0  # 0x7F / 0xFF are NaN in e4m3fn
    w_fp8 = codes.view(FP8_DTYPE)
    scale_inv = torch.rand(-(-n // bs), -(-k // bs)) * 10.0 ** torch.randint(-6, 0, (1,)).item()
    return w_fp8, scale_inv


@pytest.mark.parametrize("n,k,bs", [(256, 384, 128), (300, 200, 128), (37, 50, 16), (5, 3, 4)])
def test_fp8_block_dequant_equals_per_block_loop(n, k, bs):
    w_fp8, scale_inv = random_fp8_checkpoint_tensor(n, k, bs)
    torch.testing.assert_close(dequantize_fp8_block(w_fp8, scale_inv, bs),
                               loop_dequant_fp8(w_fp8, scale_inv, bs), rtol=0, atol=0)


def test_fp8_block_dequant_matches_transformers_fp8_loader():
    """transformers' own dequantization of DeepSeek-V3 FP8 checkpoints (private helper of its
    finegrained-FP8 integration, pinned transformers==5.23.0) on a ragged 300x200 weight."""
    from transformers.integrations.finegrained_fp8 import _dequantize_fp8_weight

    w_fp8, scale_inv = random_fp8_checkpoint_tensor(300, 200, 128)
    theirs = _dequantize_fp8_weight(w_fp8, scale_inv, [128, 128], torch.float32)
    torch.testing.assert_close(dequantize_fp8_block(w_fp8, scale_inv), theirs, rtol=0, atol=0)


def fp8_bound(x, scale):
    """e4m3 has 3 mantissa bits: rounding a normal number errs by <= 2^-4 of its magnitude;
    below the smallest normal (2^-6) the grid spacing is 2^-9, so the error is <= 2^-10.
    In original units (value = code * scale) that is max(2^-4 |x|, 2^-10 scale)."""
    return torch.maximum(x.abs() * 2.0 ** -4, scale * 2.0 ** -10) * (1 + 1e-5)


@pytest.mark.parametrize("n,k", [(256, 256), (300, 200), (1, 129)])
def test_fp8_block_quantize_error_bound_and_layout(n, k):
    w = heavy_tailed(n, k)
    w_fp8, scale_inv = quantize_fp8_block(w)
    assert w_fp8.dtype == FP8_DTYPE and w_fp8.shape == (n, k)
    assert scale_inv.dtype == torch.float32 and scale_inv.shape == (math.ceil(n / 128), math.ceil(k / 128))
    for i in range(scale_inv.shape[0]):  # each block's largest value maps to +-448
        for j in range(scale_inv.shape[1]):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            if block.abs().max() > 0:
                torch.testing.assert_close(scale_inv[i, j], block.abs().max() / FP8_MAX)
                assert w_fp8[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float().abs().max() == FP8_MAX
    w_hat = dequantize_fp8_block(w_fp8, scale_inv)
    scale = scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    assert ((w_hat - w).abs() <= fp8_bound(w, scale)).all()


def test_fp8_activation_one_scale_per_128_values():
    x = torch.randn(2, 3, 300) * torch.logspace(-3, 2, 300)  # tiles of very different magnitude
    x_fp8, scale = quantize_fp8_activation(x)
    assert x_fp8.dtype == FP8_DTYPE and x_fp8.shape == x.shape and scale.shape == (2, 3, 3)
    for t in range(3):  # the tile's absmax sets its scale; the ragged last tile has 44 values
        torch.testing.assert_close(scale[..., t], x[..., t * 128:(t + 1) * 128].abs().amax(-1) / FP8_MAX)
    x_hat = dequantize_fp8_activation(x_fp8, scale)
    full_scale = scale.repeat_interleave(128, dim=-1)[..., :300]
    assert ((x_hat - x).abs() <= fp8_bound(x, full_scale)).all()
    # per-tile scales keep the small tiles accurate; one scale for the whole row would not
    assert ((x_hat - x).abs() / x.abs().clamp(min=1e-12))[..., :128].median() < 2.0 ** -4


def test_fp8_checkpoint_state_dict_dequantizes(tmp_path):
    """A safetensors shard laid out like DeepSeek-V3's FP8 release (fp8 `weight` + float32
    `weight_scale_inv`, float norms) turns into plain float tensors."""
    w_q, s_q = random_fp8_checkpoint_tensor(300, 200, 128)
    w_o, s_o = random_fp8_checkpoint_tensor(64, 300, 128)
    norm = torch.rand(200)
    save_file({"layers.0.self_attn.q_b_proj.weight": w_q, "layers.0.self_attn.q_b_proj.weight_scale_inv": s_q,
               "layers.0.self_attn.o_proj.weight": w_o, "layers.0.self_attn.o_proj.weight_scale_inv": s_o,
               "layers.0.input_layernorm.weight": norm}, tmp_path / "model-00001-of-00001.safetensors")
    tensors = dequantize_fp8_state_dict(load_file(tmp_path / "model-00001-of-00001.safetensors"), dtype=torch.float32)
    assert sorted(tensors) == ["layers.0.input_layernorm.weight", "layers.0.self_attn.o_proj.weight",
                               "layers.0.self_attn.q_b_proj.weight"]
    torch.testing.assert_close(tensors["layers.0.self_attn.q_b_proj.weight"], loop_dequant_fp8(w_q, s_q, 128),
                               rtol=0, atol=0)
    torch.testing.assert_close(tensors["layers.0.self_attn.o_proj.weight"], loop_dequant_fp8(w_o, s_o, 128),
                               rtol=0, atol=0)
    torch.testing.assert_close(tensors["layers.0.input_layernorm.weight"], norm, rtol=0, atol=0)
    with pytest.raises(KeyError, match="has no 'a.weight_scale_inv'"):
        dequantize_fp8_state_dict({"a.weight": w_q})
    with pytest.raises(KeyError, match="has no matching 'a.weight'"):
        dequantize_fp8_state_dict({"a.weight_scale_inv": s_q})


def test_fp8_bad_inputs():
    with pytest.raises(ValueError, match=r"scale_inv must have shape \(3, 2\)"):
        dequantize_fp8_block(torch.zeros(300, 200, dtype=FP8_DTYPE), torch.ones(2, 2))
    with pytest.raises(TypeError, match="w_fp8 must be a torch.float8_e4m3fn"):
        dequantize_fp8_block(torch.zeros(3, 3), torch.ones(1, 1))
    with pytest.raises(ValueError, match="block_size must be a positive integer"):
        quantize_fp8_block(torch.randn(4, 4), block_size=0)
    x_fp8, scale = quantize_fp8_activation(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"scale must have shape \(4, 2\)"):
        dequantize_fp8_activation(x_fp8, scale[:, :1])


# ---------------------------------------------------------------------------------------------
# QuantLinear and quantize_model
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int4", "fp8"])
@pytest.mark.parametrize("bias", [True, False])
def test_quantlinear_forward_equals_dequantized_linear(scheme, bias):
    linear = nn.Linear(192, 72, bias=bias)
    layer = QuantLinear.from_linear(linear, scheme, group_size=64)
    w_hat = layer.dequantize_weight()
    assert not torch.equal(w_hat, linear.weight)  # it really is quantized
    reference = nn.Linear(192, 72, bias=bias)
    with torch.no_grad():
        reference.weight.copy_(w_hat)
        if bias:
            reference.bias.copy_(linear.bias)
    x = torch.randn(2, 5, 192)
    torch.testing.assert_close(layer(x), reference(x))
    # the quantized weight is frozen by construction; only the bias is a parameter
    assert [n for n, _ in layer.named_parameters()] == (["bias"] if bias else [])


def test_quantlinear_state_dict_round_trip_and_fp8_checkpoint_keys(tmp_path):
    layer = QuantLinear.from_linear(nn.Linear(300, 200, bias=False), "fp8")
    save_file(layer.state_dict(), tmp_path / "layer.safetensors")
    tensors = load_file(tmp_path / "layer.safetensors")
    # the names and dtypes a DeepSeek-V3 FP8 checkpoint uses for one linear layer
    assert {k: v.dtype for k, v in tensors.items()} == {"weight": FP8_DTYPE, "weight_scale_inv": torch.float32}
    assert tensors["weight_scale_inv"].shape == (2, 3)
    fresh = QuantLinear(300, 200, "fp8", bias=False)
    fresh.load_state_dict(tensors)
    x = torch.randn(4, 300)
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)


def test_quantlinear_bad_inputs():
    with pytest.raises(ValueError, match="scheme must be one of"):
        QuantLinear(8, 8, "int3")
    layer = QuantLinear.from_linear(nn.Linear(16, 4), "int8")
    with pytest.raises(ValueError, match="last dimension in_features=16"):
        layer(torch.randn(2, 15))
    with pytest.raises(ValueError, match=r"w must have shape \(4, 16\)"):
        layer.set_weight(torch.randn(16, 4))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 128)
        self.blocks = nn.ModuleList([nn.ModuleDict({"up": nn.Linear(128, 256), "down": nn.Linear(256, 128)})
                                     for _ in range(2)])
        self.lm_head = nn.Linear(128, 10, bias=False)

    def forward(self, ids):
        h = self.embed(ids)
        for b in self.blocks:
            h = h + b["down"](F.gelu(b["up"](h)))
        return self.lm_head(h)


@pytest.mark.parametrize("scheme", ["int8", "int8-asym", "int4", "fp8"])
def test_quantize_model_replaces_linears_and_reports_errors(scheme):
    model = Tiny()
    original = copy.deepcopy(model)
    report = quantize_model(model, scheme, group_size=64, skip=["lm_head"])
    names = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down"]
    assert [r.name for r in report] == names
    assert isinstance(model.lm_head, nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    for r in report:
        layer, w = model.get_submodule(r.name), original.get_submodule(r.name).weight.detach()
        assert isinstance(layer, QuantLinear) and layer.scheme == scheme and r.shape == tuple(w.shape)
        err = (layer.dequantize_weight() - w).double()
        assert r.max_abs_error == pytest.approx(err.abs().max().item())
        assert r.mean_abs_error == pytest.approx(err.abs().mean().item())
        assert r.snr_db == pytest.approx(10 * math.log10((w.double() ** 2).sum() / (err ** 2).sum()))
        assert r.as_dict()["snr_db"] == r.snr_db
    ids = torch.randint(0, 10, (2, 7))
    out, ref = model(ids), original(ids)
    assert out.shape == ref.shape and not torch.equal(out, ref)
    assert quantization_error(ref, out).snr_db > 15  # quantized model still computes nearly the same


def test_more_bits_give_higher_snr():
    """On the same Gaussian weights: int8 per-channel (8 bits) > fp8 (3 mantissa bits) > int4."""
    torch.manual_seed(1)
    snr = {scheme: quantize_model(Tiny(), scheme, skip=["lm_head"])[0].snr_db
           for scheme in ["int8", "fp8", "int4"]}
    assert snr["int8"] > snr["fp8"] > snr["int4"] > 10


def test_quantize_model_bad_inputs_leave_model_untouched():
    model = Tiny()
    model.blocks[1]["odd"] = nn.Linear(100, 8)
    with pytest.raises(ValueError, match=r"layer 'blocks.1.odd' has in_features=100, not divisible by group_size=64"):
        quantize_model(model, "int4", group_size=64)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    report = quantize_model(model, "int4", group_size=64, skip=["odd"])
    assert "blocks.1.odd" not in [r.name for r in report]
    with pytest.raises(ValueError, match="scheme must be one of"):
        quantize_model(Tiny(), "int2")
    with pytest.raises(TypeError, match="skip must be a list"):
        quantize_model(Tiny(), "int8", skip="lm_head")


@pytest.mark.parametrize("scheme,kernel", [("int8", "int8_matmul"), ("int8-asym", "int8_matmul"),
                                           ("int4", "int4_matmul"), ("fp8", "fp8_weight_matmul")])
def test_quantlinear_dispatches_to_triton_kernel_with_same_result(scheme, kernel, monkeypatch):
    """On CUDA tensors (here: forced, through the Triton interpreter) forward runs the
    quantized-matmul kernel, which must give the reference's output and input gradient."""
    from deepseek_mini import backend
    from deepseek_mini.kernels import quant_matmul

    calls = []
    real = getattr(quant_matmul, kernel)
    monkeypatch.setattr(quant_matmul, kernel, lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = QuantLinear.from_linear(nn.Linear(64, 48), scheme, group_size=32, block_size=32)  # ragged fp8 rows
    x = torch.randn(2, 3, 64, requires_grad=True)
    expected = layer(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    with backend.forced("triton"):
        out = layer(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert calls == [1]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ["int8-asym", "int4", "fp8"])
def test_model_dtype_cast_keeps_quantized_buffers(scheme):
    """model.to(torch.bfloat16) casts the float parameters (bias) but must leave the codes and
    the float32 scales alone: casting fp8 codes would break dequantization, and bf16 scales
    would add error."""
    layer = QuantLinear.from_linear(nn.Linear(64, 32), scheme, group_size=32)
    before = {k: v.clone() for k, v in layer.named_buffers()}
    layer.to(torch.bfloat16)
    assert layer.bias.dtype == torch.bfloat16
    for name, b in layer.named_buffers():
        assert b.dtype == before[name].dtype and torch.equal(b, before[name]), name
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = F.linear(x.float(), layer.dequantize_weight(), layer.bias.float())
    torch.testing.assert_close(layer(x).float(), expected, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("scheme", ["int8", "int4", "fp8"])
def test_quantize_model_quantizes_stacked_moe_experts_per_expert(scheme):
    from deepseek_mini.model import DeepseekConfig, DeepseekModel
    from deepseek_mini.moe import Experts, routed_experts
    from deepseek_mini.quant import QuantExperts

    config = DeepseekConfig(vocab_size=64, hidden_size=32, moe_intermediate_size=16, num_hidden_layers=2,
                            q_lora_rank=16, kv_lora_rank=16, n_routed_experts=4, num_experts_per_tok=2)
    model = DeepseekModel(config).eval()
    with torch.no_grad():  # experts of very different scales: each must get its own scales
        model.layers[1].mlp.experts.gate_proj[2] *= 50
    original = copy.deepcopy(model)
    report = quantize_model(model, scheme, group_size=16, skip=["lm_head"])
    experts, float_experts = model.layers[1].mlp.experts, original.layers[1].mlp.experts
    assert isinstance(experts, QuantExperts) and isinstance(float_experts, Experts)
    by_name = {r.name: r for r in report}
    gate_hat, up_hat, down_hat = experts.dequantize_weights()
    for tensor_name, w_hat in zip(["gate_proj", "up_proj", "down_proj"], [gate_hat, up_hat, down_hat]):
        w = getattr(float_experts, tensor_name).detach()
        assert w_hat.shape == w.shape
        err = (w_hat - w).double()
        assert by_name[f"layers.1.mlp.experts.{tensor_name}"].max_abs_error == pytest.approx(err.abs().max().item())
    # expert 0's error is untouched by expert 2's 50x larger weights: scales are per expert
    gate = float_experts.gate_proj.detach()
    relative = [((gate_hat[e] - gate[e]).abs().max() / gate[e].abs().max()).item() for e in range(4)]
    assert max(relative) < 3 * min(relative)

    x = torch.randn(10, 32)
    idx = torch.stack([torch.randperm(4)[:2] for _ in range(10)])
    weight = torch.rand(10, 2)
    torch.testing.assert_close(experts(x, idx, weight), routed_experts(x, idx, weight, gate_hat, up_hat, down_hat))
    ids = torch.randint(0, 64, (2, 8))
    assert quantization_error(original(ids), model(ids)).snr_db > {"int8": 30, "fp8": 20, "int4": 10}[scheme]

    untouched = copy.deepcopy(original)
    quantize_model(untouched, scheme, group_size=16, experts=False)
    assert isinstance(untouched.layers[1].mlp.experts, Experts)


def test_quantlinear_fp8_activations_w8a8(monkeypatch):
    """fp8_activations=True: the input is rounded to FP8 in 1 x 128 tiles before the matmul
    (DeepSeek-V3's FP8 linear), gradients pass straight through the rounding, and inference on
    the Triton backend runs the FP8 x FP8 GEMM kernel."""
    from deepseek_mini import backend
    from deepseek_mini.kernels import quant_matmul

    linear = nn.Linear(200, 48)
    layer = QuantLinear.from_linear(linear, "fp8", fp8_activations=True, block_size=64)
    weight_only = QuantLinear.from_linear(linear, "fp8", block_size=64)
    x = torch.randn(3, 5, 200) * torch.logspace(-2, 1, 200)
    x_rounded = dequantize_fp8_activation(*quantize_fp8_activation(x, 64), 64)
    assert not torch.equal(x_rounded, x)
    w_hat = layer.dequantize_weight()
    torch.testing.assert_close(layer(x), F.linear(x_rounded, w_hat, linear.bias))
    assert not torch.allclose(layer(x), weight_only(x), rtol=0, atol=1e-6)  # the activations really are rounded

    x.requires_grad_(True)
    layer(x).square().sum().backward()
    with torch.no_grad():
        dy = 2 * F.linear(x_rounded, w_hat, linear.bias)
    torch.testing.assert_close(x.grad, dy @ w_hat)  # straight-through: d(round(x))/dx = 1
    torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)))

    calls = []
    real = quant_matmul.fp8_block_linear
    monkeypatch.setattr(quant_matmul, "fp8_block_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    with backend.forced("triton"):
        with torch.no_grad():
            out = layer(x)
        assert calls == [1]
        torch.testing.assert_close(out, F.linear(x_rounded, w_hat, linear.bias), rtol=1e-4, atol=1e-4)
        layer(x).sum().backward()  # the kernel has no backward, so training takes the reference path
        assert calls == [1]

    with pytest.raises(ValueError, match="fp8_activations=True needs scheme='fp8'"):
        QuantLinear(64, 64, "int8", fp8_activations=True)
    with pytest.raises(ValueError, match="fp8_activations=True needs scheme='fp8'"):
        quantize_model(Tiny(), "int4", fp8_activations=True)
    model = Tiny()
    quantize_model(model, "fp8", fp8_activations=True)
    assert model.lm_head.fp8_activations and isinstance(model.blocks[0]["up"], QuantLinear)
