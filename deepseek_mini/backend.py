"""The one place that decides how ops run.

Rule: CUDA tensors -> fused Triton kernels; CPU tensors -> the pure-PyTorch reference.
Two environment variables change it, both read once at import:

    DEEPSEEK_MINI_BACKEND=auto       (default) the rule above
    DEEPSEEK_MINI_BACKEND=torch      always the PyTorch reference, even on CUDA
    DEEPSEEK_MINI_BACKEND=triton     always Triton; on CPU tensors this means the Triton
                                     interpreter, so TRITON_INTERPRET=1 is set for you

The interpreter must be switched on before any @triton.jit runs, which is why this module
sets TRITON_INTERPRET itself and why `deepseek_mini.kernels` imports it first. It is the only
place in the library that sets it: tests and notebooks call `use_interpreter_if_no_gpu()`, and
everything else asks `interpreting()`.
"""

import os
import time

_CHOICES = ("auto", "torch", "triton")

BACKEND = os.environ.get("DEEPSEEK_MINI_BACKEND", "auto").strip().lower()
if BACKEND not in _CHOICES:
    raise ValueError(
        f"DEEPSEEK_MINI_BACKEND={BACKEND!r} is not one of {_CHOICES}; unset it to use 'auto'"
    )


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def use_interpreter_if_no_gpu() -> bool:
    """Without CUDA, switch Triton's interpreter on (TRITON_INTERPRET=1) so kernels run on CPU
    tensors. Call it before `import triton` or any kernel module: @triton.jit reads it once, when
    a kernel is defined. Returns whether the interpreter is on."""
    if not _cuda_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return interpreting()


def interpreting() -> bool:
    """True when Triton kernels run in the interpreter on CPU tensors (TRITON_INTERPRET=1):
    launchers then compute in float32 (its bfloat16 math is wrong) with one fixed tile config."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if BACKEND == "triton":
    use_interpreter_if_no_gpu()


def triton_available() -> bool:
    """True when triton imports (it is not installed on macOS/Windows or non-x86 Linux)."""
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def use_triton(*tensors) -> bool:
    """Should an op on these tensors run its Triton kernel?"""
    if BACKEND == "torch" or not triton_available():
        return False
    if BACKEND == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def device():
    """The device a notebook should put its model on: CUDA if present, else CPU."""
    import torch

    return torch.device("cuda" if _cuda_available() else "cpu")


class forced:
    """Context manager that overrides the backend choice, e.g. tests running the Triton path
    on CPU through the interpreter: `with backend.forced("triton"): ...`."""

    def __init__(self, name: str):
        if name not in _CHOICES:
            raise ValueError(f"backend must be one of {_CHOICES}, got {name!r}")
        self.name = name

    def __enter__(self):
        global BACKEND
        self.previous, BACKEND = BACKEND, self.name
        return self

    def __exit__(self, *exc):
        global BACKEND
        BACKEND = self.previous
        return False


def describe() -> str:
    """One line for notebooks and the doctor: which path ops take here."""
    if BACKEND == "torch":
        return "PyTorch reference ops (DEEPSEEK_MINI_BACKEND=torch)"
    if not triton_available():
        return "PyTorch reference ops (triton is not installed on this platform)"
    if BACKEND == "triton":
        mode = "Triton interpreter on CPU" if interpreting() else "Triton kernels"
        return f"{mode} for every op (DEEPSEEK_MINI_BACKEND=triton)"
    if _cuda_available():
        return "Triton kernels on CUDA tensors, PyTorch reference on CPU tensors"
    return "PyTorch reference ops on CPU (no CUDA device; Triton kernels run only on a GPU)"


def time_it(fn, *, repeats: int = 10, warmup: int = 1, best: bool = False, cpu_clock: bool = False) -> float:
    """Seconds per call of fn(), the mean of `repeats` calls after `warmup` untimed ones.

    best=True: the fastest single call instead of the mean (a busy machine only ever adds time).
    cpu_clock=True: this process's CPU time instead of the wall clock, on a CPU run: time the
    machine spent on other programs is then not counted (with one thread, the work's duration).
    Waits for the GPU before reading the clock (CUDA runs asynchronously), so what is measured
    is the work, not the launch."""
    if repeats < 1 or warmup < 0:
        raise ValueError(f"time_it: repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    import torch

    def sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    clock = time.process_time if cpu_clock and not torch.cuda.is_available() else time.perf_counter
    for _ in range(warmup):
        fn()
    sync()
    if best:
        times = []
        for _ in range(repeats):
            start = clock()
            fn()
            sync()
            times.append(clock() - start)
        return min(times)
    start = clock()
    for _ in range(repeats):
        fn()
    sync()
    return (clock() - start) / repeats
