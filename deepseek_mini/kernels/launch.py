"""What every kernel launcher shares: the autotune style, grids, and a few constants.

One autotune style for all kernels: a list of GPU candidates (`config(...)` each) and one small
configuration for the Triton interpreter, which cannot time kernels. `autotune(...)` wraps a
kernel in `triton.autotune` over the GPU list on a GPU, or over the single interpreter config on
a CPU (a one-config autotuner launches without benchmarking), so a launcher never branches.
"""

import functools
import math

import torch
import triton
import triton.language as tl

from deepseek_mini.backend import interpreting

# exp(x) = exp2(x * LOG2E): kernels use exp2, the fast path on GPUs. A constexpr, because
# @triton.jit functions may read only constexpr globals.
LOG2E = tl.constexpr(1.0 / math.log(2.0))


def config(meta: dict, num_warps: int = 4, num_stages: int = 1) -> triton.Config:
    """One autotune candidate: tile sizes (`meta`) and how many warps and pipeline stages run them."""
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def autotune(gpu_configs: list, interpreter_meta: dict, key: list):
    """Decorator: triton.autotune over `gpu_configs` on a GPU, over `interpreter_meta` alone in
    the interpreter. `key`: the kernel arguments whose change asks for a new tuning."""
    configs = [config(interpreter_meta)] if interpreting() else gpu_configs
    return triton.autotune(configs=configs, key=key)


def grid_2d(rows: int, cols: int, row_block: str = "BLOCK_M", col_block: str = "BLOCK_N"):
    """Grid for a tiled 2-D output: one program per (row tile, column tile), tile sizes read
    from the autotuned meta-parameters named `row_block` and `col_block`."""
    return lambda meta: (triton.cdiv(rows, meta[row_block]), triton.cdiv(cols, meta[col_block]))


@functools.cache
def sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of a CUDA device, which launchers size their grids by; None for
    the CPU (the interpreter), where they pick small fixed tiles instead. Cached: launchers ask
    on every call, and decode calls are microseconds long."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else None
