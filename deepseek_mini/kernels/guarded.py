"""Guarded buffers: catch a kernel that reads or writes outside its tensors, whatever its source.

A Triton kernel addresses memory through raw pointers, so a missing or wrong mask does not raise:
it reads numbers that belong to no tensor, or writes over them. Tests that allocate fresh tensors
rarely notice. A stray read is often multiplied by a masked zero or lands in a lane the store
discards, and a stray write hits memory nobody looks at.

Here every tensor of a test lives in the middle of a larger buffer. The rest of the buffer, the
guard, holds NaN for floating-point dtypes and the dtype's largest value for integers:

* a stray read brings a NaN into the arithmetic, and NaN spreads through every result it touches
  (even 0 * NaN is NaN), so the output's comparison with the reference fails;
* a stray write changes the guard. After the launch, `check()` compares the guard bit for bit
  with what was put there. Each buffer's NaN has its own bit pattern (its payload), so a NaN
  copied from one buffer's guard into another's still counts as a change.

Outputs the code allocates itself with `torch.empty` / `torch.empty_like` get guards too while a
`GuardedBuffers` block is active, and are filled with NaN, so an element no program writes stays
NaN. A read whose value never reaches the output cannot be seen this way; nothing but a memory
checker sees that.

    with GuardedBuffers("softmax") as guards:
        x = guards.copy(torch.randn(5, 37), "x", row_gap=27)  # rows 64 apart, guards in between
        out = softmax(x)  # out comes from torch.empty_like: guarded and NaN-filled
    # leaving the block raises AssertionError if any guard element changed
"""

import itertools
import math

import torch

# Guard elements before a tensor's first element and after its last: at least MIN_MARGIN, and at
# least the tensor's own size, so that a kernel overrunning by up to a whole tensor (a tile of
# rows past the end, a whole extra head) still lands in the guard and never in other memory.
MIN_MARGIN = 1024

# quiet-NaN bit pattern and the number of free payload bits below it, per floating-point dtype
_NAN_BITS = {torch.float64: (0x7FF8000000000000, 51), torch.float32: (0x7FC00000, 22),
             torch.float16: (0x7E00, 9), torch.bfloat16: (0x7FC0, 6)}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_tags = itertools.count()  # one per buffer, across blocks: a tensor kept from an earlier block keeps its own NaN


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits of t as integers of the same size (NaN == NaN, and payloads compare)."""
    return t.view(_INT_OF_SIZE[t.element_size()])


def fill_guard(buffer: torch.Tensor, tag: int) -> torch.Tensor:
    """Fill `buffer` with its guard value; `tag` picks one of several NaN payloads or sentinels."""
    if buffer.dtype in _NAN_BITS:
        quiet_nan, payload_bits = _NAN_BITS[buffer.dtype]
        bits(buffer).fill_(quiet_nan | (tag % (2**payload_bits - 1) + 1))
    elif buffer.dtype.is_floating_point or buffer.dtype.is_complex:  # float8 formats have a single NaN
        buffer.fill_(float("nan"))
    elif buffer.dtype == torch.bool:
        buffer.fill_(True)
    else:
        buffer.fill_(torch.iinfo(buffer.dtype).max - tag % 8)
    return buffer


class GuardedBuffers:
    """Tensors inside guarded buffers, and the check that the guards are untouched.

    `copy(t)` returns a guarded copy of t (an input). While the block is active, `torch.empty` and
    `torch.empty_like` return guarded NaN-filled tensors (outputs). Leaving the block without an
    exception runs `check()`, which raises AssertionError naming the tensor and where its guard
    changed. `what` names the code under test in that message.
    """

    def __init__(self, what: str = "the kernel", min_margin: int = MIN_MARGIN, outputs: bool = True):
        self.what, self.min_margin, self.outputs = what, min_margin, outputs
        self.tensors = []  # (name, view, buffer, guard bits as allocated, mask of the view's elements)
        self._empty, self._empty_like = torch.empty, torch.empty_like

    def copy(self, t: torch.Tensor, name: str = "an input", row_gap: int = 0) -> torch.Tensor:
        """A copy of t in the middle of a guarded buffer. With row_gap > 0 the rows (last axis)
        are row_gap elements further apart than t's, with guard elements between them, for code
        that takes a row stride."""
        view = self.allocate(t.shape, t.dtype, t.device, name, row_gap)
        view.copy_(t)
        return view

    def allocate(self, shape, dtype, device, name: str = "an output", row_gap: int = 0) -> torch.Tensor:
        """A guarded tensor of this shape, filled with the guard value (NaN for floats)."""
        shape = torch.Size(shape)
        row = shape[-1] if len(shape) else 1
        n_rows = math.prod(shape[:-1]) if len(shape) else 1
        stride = row + row_gap
        margin = max(self.min_margin, n_rows * stride)
        buffer = fill_guard(self._empty(margin + n_rows * stride + margin, dtype=dtype, device=device),
                            tag=next(_tags))
        view = buffer[margin:margin + n_rows * stride].view(*shape[:-1], stride)[..., :row].view(shape) \
            if len(shape) else buffer[margin]
        inside = torch.zeros(buffer.shape, dtype=torch.bool, device=device)
        inside.as_strided(view.shape, view.stride(), view.storage_offset()).fill_(True)
        self.tensors.append((name, view, buffer, bits(buffer).clone(), inside))
        return view

    def check(self):
        """Raise AssertionError if a guard element of any tensor changed."""
        for name, view, buffer, allocated, inside in self.tensors:
            changed = ((bits(buffer) != allocated) & ~inside).nonzero().flatten()
            if not len(changed):
                continue
            first, last = inside.nonzero().flatten()[[0, -1]].tolist() if inside.any() else (len(buffer) // 2,) * 2
            before, after = (changed < first).sum().item(), (changed > last).sum().item()
            between = len(changed) - before - after
            raise AssertionError(
                f"{self.what} wrote outside {name} (shape {tuple(view.shape)}): {len(changed)} elements around it "
                f"changed ({before} before its first element, {after} after its last, {between} in the gaps "
                "between its rows); mask every tl.store so that only the tensor's own elements are written")

    # ------------------------------------------------------------------ torch.empty while active

    def __enter__(self):
        if self.outputs:
            torch.empty, torch.empty_like = self._guarded_empty, self._guarded_empty_like
        return self

    def __exit__(self, exc_type, exc, tb):
        torch.empty, torch.empty_like = self._empty, self._empty_like
        if exc_type is None:
            self.check()
        return False

    def _guarded_empty(self, *size, dtype=None, device=None, **rest):
        if rest.keys() - {"memory_format"}:  # out=, requires_grad=, pin_memory=...: leave to torch
            return self._empty(*size, dtype=dtype, device=device, **rest)
        shape = size[0] if len(size) == 1 and not isinstance(size[0], int) else size
        return self.allocate(shape, dtype or torch.get_default_dtype(), device or torch.get_default_device(),
                             name="the output allocated with torch.empty")

    def _guarded_empty_like(self, t, *, dtype=None, device=None, **rest):
        if rest.keys() - {"memory_format"}:
            return self._empty_like(t, dtype=dtype, device=device, **rest)
        return self.allocate(t.shape, dtype or t.dtype, device or t.device,
                             name="the output allocated with torch.empty_like")
