"""Input checks shared by every kernel launcher.

A Triton kernel trusts its pointers: a wrong shape, a strided view or a tensor on another
device gives garbage or a crash, not an error. Each launcher calls these first so that bad
input fails in Python with a message that names the argument and what was expected.
"""

import torch

from deepseek_mini import backend
from deepseek_mini.kernels.guarded import fill_guard

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def float_tensors(*tensors) -> bool:
    """True when every tensor (None skipped) has a dtype the kernels take; anything else
    (float64 for gradcheck, say) stays on the PyTorch reference. Kernels' supports() start here."""
    return all(t is None or t.dtype in FLOAT_DTYPES for t in tensors)


def check_tensor(op, name, t, *, ndim=None, shape=None, dtypes=FLOAT_DTYPES, contiguous=True):
    """Raise a clear error unless `t` is a tensor of the expected rank, shape, dtype and layout.

    `shape` is a tuple whose entries are ints (must match) or None (any size).
    `contiguous=True` asks for `t.is_contiguous()`; `"last"` only for a unit-stride last
    dimension (kernels that take every other stride as an argument, e.g. a transposed view of
    [batch, seq, heads, dim]); False for no layout check.
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if shape is not None:
        if t.dim() != len(shape) or any(s is not None and s != n for s, n in zip(shape, t.shape)):
            want = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)}, expected {want}")
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}, expected one of {names}")
    if contiguous == "last":
        if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit-stride last dimension (got strides "
                             f"{t.stride()} for shape {tuple(t.shape)}); call .contiguous() first")
    elif contiguous and not t.is_contiguous():
        raise ValueError(f"{op}: {name} must be contiguous (got strides {t.stride()} for shape "
                         f"{tuple(t.shape)}); call .contiguous() first")
    return t


def check_same_device(op, **tensors):
    """All tensors on one device, and a device Triton can run on (CUDA, or CPU under the
    interpreter)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"{op}: all inputs must be on the same device, got {listing}")
    device = next(iter(devices.values()))
    if device.type == "cpu" and not backend.interpreting():
        raise RuntimeError(f"{op}: inputs are on the CPU but the Triton interpreter is off; "
                           "set TRITON_INTERPRET=1 before importing deepseek_mini (or "
                           "DEEPSEEK_MINI_BACKEND=triton), or use the PyTorch reference")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"{op}: Triton kernels run on CUDA (or CPU through the interpreter), got {device}")
    return device


def check_same_dtype(op, **tensors):
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        listing = ", ".join(f"{name} is {str(d).replace('torch.', '')}" for name, d in dtypes.items())
        raise TypeError(f"{op}: inputs must share one dtype, got {listing}")
    return next(iter(dtypes.values()))


class poison_empty:
    """Test helper: while active, `torch.empty` / `torch.empty_like` return tensors filled with
    NaN (floats) or the dtype's largest value (integers) instead of whatever memory held.

    Launchers allocate their outputs with these, so a kernel that forgets to write an element
    (a wrong mask, a missed tail block) leaves a NaN that the comparison with the reference
    catches, instead of a lucky zero.
    """

    def __enter__(self):
        self._empty, self._empty_like = torch.empty, torch.empty_like
        torch.empty = self._poisoned(self._empty)
        torch.empty_like = self._poisoned(self._empty_like)
        return self

    def __exit__(self, *exc):
        torch.empty, torch.empty_like = self._empty, self._empty_like
        return False

    @staticmethod
    def _poisoned(allocate):
        def wrapper(*args, **kwargs):
            return fill_guard(allocate(*args, **kwargs), tag=0)  # the guards' "never written" values

        return wrapper
