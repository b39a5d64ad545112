"""Fused Triton kernels, one file per op, each beside the PyTorch reference it is tested against.

Importing `deepseek_mini.backend` first matters: it switches the Triton interpreter on (when
DEEPSEEK_MINI_BACKEND=triton on a machine without CUDA) before any @triton.jit runs.
"""

from deepseek_mini import backend  # noqa: F401  (must run before kernels are defined)
