"""deepseek_mini.kernels.guarded: guarded buffers catch out-of-bounds reads and writes of real
Triton kernels (the interpreter on a CPU, tests/conftest.py switches it on), whatever the kernel's
source, and stay silent for a correct kernel."""

import pytest
import torch
import triton
import triton.language as tl

from deepseek_mini.kernels.guarded import MIN_MARGIN, GuardedBuffers, bits

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, factor, BLOCK: tl.constexpr, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr):
    """out = x * factor; the masks can be left out to make the typical mistakes."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inside = offsets < n
    x = tl.load(x_ptr + offsets, mask=inside, other=0.0) if MASK_LOAD else tl.load(x_ptr + offsets)
    if MASK_STORE:
        tl.store(out_ptr + offsets, x * factor, mask=inside)
    else:
        tl.store(out_ptr + offsets, x * factor)


def _scale(x, factor=2.0, block=8, mask_load=True, mask_store=True):
    out = torch.empty_like(x)
    _scale_kernel[(triton.cdiv(x.numel(), block),)](x, out, x.numel(), factor, BLOCK=block,
                                                    MASK_LOAD=mask_load, MASK_STORE=mask_store)
    return out


@triton.jit
def _row_sum_kernel(x_ptr, w_ptr, out_ptr, row_stride, n_cols, BLOCK: tl.constexpr, MASK_W: tl.constexpr):
    """out[r] = sum_c x[r, c] * w[c]: x's masked lanes load 0, so an unmasked w is multiplied by 0."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + row * row_stride + cols, mask=cols < n_cols, other=0.0)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0) if MASK_W else tl.load(w_ptr + cols)
    tl.store(out_ptr + row, tl.sum(x * w, axis=0))


def _row_sum(x, w, mask_w=True):
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    _row_sum_kernel[(x.shape[0],)](x, w, out, x.stride(0), x.shape[1],
                                   BLOCK=triton.next_power_of_2(x.shape[1]), MASK_W=mask_w)
    return out


def test_a_copy_holds_the_values_between_guards():
    x = torch.randn(3, 5, device=DEVICE)
    guards = GuardedBuffers()
    for gap in (0, 4):
        copy = guards.copy(x, "x", row_gap=gap)
        assert torch.equal(copy, x) and copy.dtype == x.dtype and copy.device == x.device
        assert copy.stride() == (5 + gap, 1) and copy.is_contiguous() == (gap == 0)
        buffer = guards.tensors[-1][2]
        assert torch.isnan(buffer[:MIN_MARGIN]).all() and torch.isnan(buffer[-MIN_MARGIN:]).all()
        assert torch.isnan(buffer).sum().item() == buffer.numel() - x.numel(), "every element outside the view is a guard"
    guards.check()


def test_the_guard_is_at_least_as_large_as_the_tensor():
    """A kernel may overrun by a whole tile of rows: the guard must hold it, not other memory."""
    guards = GuardedBuffers()
    guards.allocate((10, 300), torch.float32, DEVICE, row_gap=20)
    buffer, inside = guards.tensors[0][2], guards.tensors[0][4]
    first, last = inside.nonzero().flatten()[[0, -1]].tolist()
    assert first >= 3200 and len(buffer) - 1 - last >= 3200, "3,200 elements (with the gaps) need 3,200 of guard each side"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_each_float_buffer_gets_its_own_nan(dtype):
    guards = GuardedBuffers()
    a, b = (guards.allocate((4,), dtype, DEVICE) for _ in range(2))
    c = GuardedBuffers().allocate((4,), dtype, DEVICE)  # a later block: inputs kept from an earlier one must differ too
    assert torch.isnan(a).all() and torch.isnan(b).all(), "outputs start as NaN: an unwritten element stays NaN"
    assert not torch.equal(bits(a), bits(b)), "two buffers need different NaN payloads to tell a copied guard"
    assert not torch.equal(bits(a), bits(c)), "buffers of two blocks need different NaN payloads too"


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.int64, torch.uint8, torch.bool])
def test_integer_buffers_get_a_sentinel(dtype):
    guards = GuardedBuffers()
    t = guards.allocate((2, 3), dtype, DEVICE)
    if dtype == torch.bool:
        assert t.all()
    else:
        assert (t >= torch.iinfo(dtype).max - 7).all() and (t == t.flatten()[0]).all(), "one sentinel near the largest value"
    t.zero_()  # writing inside the tensor is fine
    guards.check()
    guards.tensors[0][2][0] = 0  # the guard just before it
    with pytest.raises(AssertionError, match="1 before its first element"):
        guards.check()


def test_a_correct_kernel_passes_and_outputs_are_guarded():
    empty, empty_like = torch.empty, torch.empty_like
    with GuardedBuffers("scale") as guards:
        x = guards.copy(torch.randn(21, device=DEVICE), "x")
        out = _scale(x)
    assert torch.equal(out, x * 2.0)
    assert [name for name, *_ in guards.tensors] == ["x", "the output allocated with torch.empty_like"]
    assert torch.empty is empty and torch.empty_like is empty_like, "torch.empty must be restored after the block"


def test_an_unmasked_store_is_caught_after_the_launch():
    with pytest.raises(AssertionError, match=r"scale wrote outside the output allocated with torch.empty_like "
                                             r"\(shape \(21,\)\): 3 elements .* 3 after its last"):
        with GuardedBuffers("scale") as guards:
            _scale(guards.copy(torch.randn(21, device=DEVICE), "x"), mask_store=False)


def test_a_copied_guard_counts_as_a_write():
    """Unmasked load and store: the tail lanes copy x's guard (NaN) into out's guard (NaN). Only the
    distinct payloads show it."""
    with pytest.raises(AssertionError, match="3 after its last"):
        with GuardedBuffers("copy") as guards:
            _scale(guards.copy(torch.randn(21, device=DEVICE), "x"), factor=1.0, mask_load=False, mask_store=False)


def test_an_unmasked_read_multiplied_by_zero_poisons_the_result():
    """x's padded lanes load 0, so an unmasked weight read is multiplied by 0: invisible with finite
    padding, NaN with a guard."""
    x, w = torch.randn(4, 6, device=DEVICE), torch.randn(6, device=DEVICE)
    padded_w = torch.cat((w, torch.full((10,), 7.0, device=DEVICE)))[:6]  # finite numbers after w
    assert torch.allclose(_row_sum(x, padded_w, mask_w=False), x @ w), "finite padding hides the stray read"
    with GuardedBuffers("row sum") as guards:
        got = _row_sum(guards.copy(x, "x", row_gap=3), guards.copy(w, "w"), mask_w=False)
    assert torch.isnan(got).all(), "the guard's NaN must reach every row that read it"
    with GuardedBuffers("row sum") as guards:
        got = _row_sum(guards.copy(x, "x", row_gap=3), guards.copy(w, "w"))
    assert torch.allclose(got, x @ w)


def test_a_write_between_rows_is_located():
    guards = GuardedBuffers("row writer")
    x = guards.copy(torch.zeros(3, 4, device=DEVICE), "x", row_gap=2)
    x.as_strided((3, 6), (6, 1))[1, 5] = 1.0  # the gap after row 1
    with pytest.raises(AssertionError, match=r"row writer wrote outside x \(shape \(3, 4\)\): 1 elements around it "
                                             r"changed \(0 before its first element, 0 after its last, 1 in the gaps"):
        guards.check()


def test_torch_empty_forms_and_errors_inside_the_block():
    with GuardedBuffers() as guards:
        a = torch.empty(2, 3)
        b = torch.empty((4,), dtype=torch.int16, device=DEVICE)
        c = torch.empty_like(b, dtype=torch.float16)
        d = torch.empty(3, requires_grad=True)  # left to torch
    assert a.shape == (2, 3) and a.dtype == torch.get_default_dtype() and torch.isnan(a).all()
    assert b.dtype == torch.int16 and (b >= torch.iinfo(torch.int16).max - 7).all(), "a sentinel near the largest value"
    assert c.dtype == torch.float16 and c.shape == (4,) and torch.isnan(c).all()
    assert d.requires_grad and len(guards.tensors) == 3
    empty_like = torch.empty_like
    with pytest.raises(ValueError, match="from the code under test"):  # an error inside is not replaced by the check
        with GuardedBuffers() as guards:
            torch.empty(2)
            guards.tensors[0][2][0] = 0.0  # a damaged guard too: the original error still comes out
            raise ValueError("from the code under test")
    assert torch.empty_like is empty_like
