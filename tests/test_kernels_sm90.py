"""The GPU kernels compile for an H100/H200 (sm_90) at the tile sizes their launchers pick there.

CI has no GPU, and the interpreter (how the other kernel tests run on CPU) checks the arithmetic,
not whether the GPU compiler accepts a kernel at its real tiles. Here each new or reworked
kernel goes through triton.compile for sm_90 down to a cubin (ptxas ships in the triton wheel),
in a subprocess without TRITON_INTERPRET (see deepseek_mini/kernels/aot.py), and must not spill
registers to local memory: a spilling tile would run far below bandwidth on the device.
`pytest -s` prints registers per thread and shared memory for each kernel.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

triton = pytest.importorskip("triton", reason="Triton is not installed on this platform (Linux x86-64 only)")

REPO = Path(__file__).resolve().parents[1]
QM = "deepseek_mini.kernels.quant_matmul"


def _ptxas_present():
    try:
        from triton.backends.nvidia.compiler import knobs

        return os.path.exists(knobs.nvidia.ptxas.path)
    except Exception:
        return False


pytestmark = [
    pytest.mark.slow,  # ~30 compiles: a minute or more on 2 cores with an empty triton cache
    pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the real JIT compiles these (pytest -m gpu)"),
    pytest.mark.skipif(not _ptxas_present(), reason="this triton wheel has no ptxas for CUDA"),
]


def _gemv(scheme, n=4096, k=4096):
    """The split-K GEMV as `quant_matmul._gemv_launch` configures it on an H100 (132 SMs)."""
    from deepseek_mini.kernels.quant_matmul import _gemv_launch

    group_k = {"int8": 1024, "int4": 128, "fp8": 128}[scheme]
    block_n, block_k, _, _, warps = _gemv_launch(n, k, scheme == "int4", group_k, sms=132)
    w_type = {"int8": "*i8", "int4": "*u8", "fp8": "*fp8e4nv"}[scheme]
    return {"id": f"gemv {scheme}", "kernel": f"{QM}:_weight_only_gemv_kernel", "num_warps": warps,
            "types": {"w_ptr": w_type, "scale_ptr": "*fp32", "zp_ptr": "*i32", "part_ptr": "*fp32"},
            "constexprs": {"GROUP_N": 128 if scheme == "fp8" else 1, "GROUP_K": group_k, "INT4": scheme == "int4",
                           "HAS_ZP": scheme == "int8", "HAS_BIAS": True, "UPCAST": False,
                           "BLOCK_M": 16, "BLOCK_N": block_n, "BLOCK_K": block_k}}


def _lora_update(rank):
    from deepseek_mini.kernels.fused_lora import update_tiles

    block_m, block_n, warps = update_tiles(interpreter=False)
    return {"id": f"lora update r{rank}", "kernel": "deepseek_mini.kernels.fused_lora:_lora_update_kernel",
            "num_warps": warps, "floats": ["scaling"],
            "constexprs": {"UPCAST": False, "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_R": rank}}


def _rmsnorm_backward(rows, cols):
    import triton as tr
    from deepseek_mini.kernels.rmsnorm import _backward_launch

    block = tr.next_power_of_2(cols)
    block_r, warps, _ = _backward_launch(rows, block, sms=132)
    return {"id": f"rmsnorm bwd {rows}x{cols}", "kernel": "deepseek_mini.kernels.rmsnorm:_rmsnorm_bwd_kernel",
            "num_warps": warps, "types": {"rstd_ptr": "*fp32", "dw_partial_ptr": "*fp32"},
            "constexprs": {"BLOCK_R": block_r, "BLOCK": block}}


def _rope_rows(seq, block_half):
    from deepseek_mini.kernels.rope import rows_per_program

    return rows_per_program(seq, block_half)


def _mla_decode(heads, c=512, r=64):
    """DeepSeek-V3's latent cache (C=512, R=64) as mla_decode launches the split kernel."""
    from deepseek_mini.kernels.mla_decode import launch_config

    block_h, block_n, warps = launch_config(heads, interpreting=False)
    return {"id": f"mla decode {heads} heads", "kernel": "deepseek_mini.kernels.mla_decode:_mla_decode_split_kernel",
            "num_warps": warps, "num_stages": 2, "floats": ["scale"],
            "types": {"lens_ptr": "*i32", "o_part_ptr": "*fp32", "lse_part_ptr": "*fp32"},
            "constexprs": {"HAS_LENS": True, "UPCAST": False, "BLOCK_H": block_h, "BLOCK_N": block_n,
                           "BLOCK_C": c, "BLOCK_R": r}}


def _flash(kind, d, dv):
    """A flash-attention kernel at one of its autotune candidates for these head dims: the first
    forward one; for the backward the 64 x 32, 8-warp tile, the candidate meant to run without
    spills at wide heads (the others spill on sm_90 at 192/128; the autotuner times them all)."""
    from deepseek_mini.kernels import flash_attention as fa

    blocks = fa.head_blocks(d, dv)
    configs = fa._gpu_configs(blocks, "fwd" if kind == "fwd" else "bwd")
    config = configs[0] if kind == "fwd" else next(
        c for c in configs if c.kwargs == {"BLOCK_M": 64, "BLOCK_N": 32} and c.num_warps == 8)
    kernel = {"fwd": "_attn_fwd_kernel", "dkdv": "_attn_bwd_dkdv_kernel", "dq": "_attn_bwd_dq_kernel"}[kind]
    return {"id": f"flash {kind} {d}/{dv}", "kernel": f"deepseek_mini.kernels.flash_attention:{kernel}",
            "num_warps": config.num_warps, "num_stages": config.num_stages, "floats": ["scale"],
            "types": {"lse_ptr": "*fp32", "delta_ptr": "*fp32"},
            "constexprs": {"CAUSAL": True, "HAS_WINDOW": True, "UPCAST": False, **blocks, **config.kwargs}}


def _autotuned(spec_id, kernel, types, constexprs, floats=()):
    """An autotuned kernel at its first GPU config."""
    return {"id": spec_id, "kernel": kernel, "config": 0, "types": types, "constexprs": constexprs, "floats": floats}


_MOE = "deepseek_mini.kernels.fused_moe"
_GEMM_TYPES = {"scale_ptr": "*fp32", "sorted_ids_ptr": "*i32", "block_expert_ptr": "*i32"}
_WEIGHT_ONLY_TYPES = {"scale_ptr": "*fp32", "zp_ptr": "*i32"}

SPECS = [
    _gemv("int8"), _gemv("int4"), _gemv("fp8"),
    # RoPE as rope_rotate launches it at head dim 64 (pairs) and 128 (halves)
    *[{"id": f"rope {layout}", "kernel": "deepseek_mini.kernels.rope:_rope_kernel", "num_warps": 4,
       "types": {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}, "floats": ["sin_sign"],
       "constexprs": {"INTERLEAVED": layout == "pairs", "BLOCK_S": _rope_rows(4096, half), "BLOCK_HALF": half}}
      for layout, half in (("pairs", 32), ("halves", 64))],
    _mla_decode(16), _mla_decode(128),
    # kernels whose compile check lived in test_kernels_attention.py (moved here: one mechanism)
    {"id": "rmsnorm fwd 7168", "kernel": "deepseek_mini.kernels.rmsnorm:_rmsnorm_fwd_kernel", "num_warps": 16,
     "types": {"rstd_ptr": "*fp32"}, "floats": ["eps"], "constexprs": {"BLOCK": 8192}},
    *[{"id": f"swiglu {kind}", "kernel": f"deepseek_mini.kernels.swiglu:_swiglu_{kind}_kernel",
       "constexprs": {"BLOCK": 1024}} for kind in ("fwd", "bwd")],
    *[_flash(kind, d, dv) for kind in ("fwd", "dkdv", "dq") for d, dv in ((128, 128), (192, 128))],
    {"id": "flash bwd delta", "kernel": "deepseek_mini.kernels.flash_attention:_attn_bwd_delta_kernel",
     "types": {"delta_ptr": "*fp32"}, "constexprs": {"BLOCK_M": 64, "BLOCK_DV": 128}},
    {"id": "mla decode combine", "kernel": "deepseek_mini.kernels.mla_decode:_mla_decode_combine_kernel",
     "types": {"o_part_ptr": "*fp32", "lse_part_ptr": "*fp32"}, "constexprs": {"BLOCK_S": 16, "BLOCK_C": 512}},
    _autotuned("moe gemm swiglu", f"{_MOE}:_grouped_gemm_kernel", _GEMM_TYPES,
               {"A_ROW_DIV": 6, "HAS_SCALE": False, "SWIGLU": True, "SAVE": True, "UPCAST": False, "BLOCK_M": 64}),
    _autotuned("moe gemm scaled", f"{_MOE}:_grouped_gemm_kernel", _GEMM_TYPES,
               {"A_ROW_DIV": 1, "HAS_SCALE": True, "SWIGLU": False, "SAVE": False, "UPCAST": False, "BLOCK_M": 64}),
    _autotuned("moe weight grad", f"{_MOE}:_grouped_weight_grad_kernel",
               {"scale_ptr": "*fp32", "sorted_ids_ptr": "*i32", "expert_offsets_ptr": "*i32"},
               {"X_ROW_DIV": 6, "Y_ROW_DIV": 1, "HAS_SCALE": True, "UPCAST": False}),
    *[_autotuned(f"weight-only gemm {name}", f"{QM}:_weight_only_large_m", {**_WEIGHT_ONLY_TYPES, "w_ptr": w},
                 {"GROUP_N": gn, "GROUP_K": gk, "INT4": name == "int4", "HAS_ZP": name == "int8",
                  "HAS_BIAS": True, "UPCAST": False})
      for name, w, gn, gk in (("int8", "*i8", 1, 1024), ("int4", "*u8", 1, 128), ("fp8", "*fp8e4nv", 128, 128))],
    _lora_update(16), _lora_update(64),
    _rmsnorm_backward(4096, 4096), _rmsnorm_backward(32768, 512), _rmsnorm_backward(16384, 7168),
    _autotuned("fp8 block gemm", f"{QM}:_fp8_block_gemm_kernel",
               {"a_ptr": "*fp8e4nv", "a_scale_ptr": "*fp32", "b_ptr": "*fp8e4nv", "b_scale_ptr": "*fp32"},
               {"UPCAST": False, "BLOCK_K": 128}),
]
# Kernels that predate this check and spill at the config compiled here: the test still proves
# they compile. The fused MoE gate/up GEMM with the SwiGLU epilogue keeps two accumulators and
# spills at its first autotune config (64 x 64 tiles, 4 warps); on a GPU the autotuner may pick
# another config. A lead for issue 17's "fused MoE fwd 0.51x at 512 tokens".
MAY_SPILL = {"moe gemm swiglu"}


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "DEEPSEEK_MINI_BACKEND")}
    run = subprocess.run([sys.executable, "-m", "deepseek_mini.kernels.aot", json.dumps(SPECS)],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"compiling for sm_90 failed:\n{run.stderr[-4000:]}"
    results = {r["id"]: r for r in map(json.loads, run.stdout.splitlines())}
    for r in results.values():
        print(f"{r['id']:<28} {r['registers']:>3} registers/thread, {r['num_warps']} warps, "
              f"{r['shared']} B shared, spills {r['stack'] + r['local']} B")
    return results


@pytest.mark.parametrize("spec_id", [s["id"] for s in SPECS])
def test_kernel_compiles_for_sm90_without_spilling(compiled, spec_id):
    r = compiled[spec_id]
    assert r["ptx_target"].startswith("sm_90"), r
    assert r["cubin_bytes"] > 0
    if spec_id not in MAY_SPILL:
        assert r["stack"] == 0 and r["local"] == 0, f"{spec_id} spills registers on sm_90: {r}"
    assert r["registers"] <= 255
    assert r["shared"] <= 232448, f"{spec_id} needs {r['shared']} B of shared memory, sm_90 has 227 KiB a block"
