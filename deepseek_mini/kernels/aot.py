"""Compile Triton kernels for a GPU without having one (ahead of time), and read what the GPU
compiler made of them: registers per thread, spilled bytes, shared memory.

The interpreter (how CPU tests run the kernels) checks the arithmetic, not whether a kernel
compiles for a real GPU at its real tile sizes: an unsupported op, a dot shape the tensor cores
refuse, or a tile that spills registers only shows on the device. `triton.compile` with an
explicit signature goes all the way to a cubin with the ptxas that ships inside the triton
wheel, no driver needed; `cuobjdump` (also in the wheel) then reports the resources used.

Must run in a process where TRITON_INTERPRET is not set when the kernel modules are imported
(the interpreter replaces @triton.jit functions): `tests/test_kernels_sm90.py` runs
    python -m deepseek_mini.kernels.aot '<json list of specs>'
which prints one JSON result per spec. A spec names the kernel ("module:attribute"), its
constexprs and launch options (or "config": the index of an autotuned kernel's GPU config);
argument types follow the names (see `signature`).
"""

import json
import os
import re
import subprocess
import sys
import tempfile

from deepseek_mini import backend

# H100 / H200: compute capability 9.0 and a warp of 32 threads (what triton's CUDA driver reports
# for a real device; the third field of GPUTarget is the warp size)
TARGET = ("cuda", 90, 32)


def _jit_function(kernel):
    """The JITFunction under autotune/heuristics wrappers."""
    import triton

    while not isinstance(kernel, triton.runtime.jit.JITFunction):
        if not hasattr(kernel, "fn"):
            raise TypeError(f"{kernel!r} is not a @triton.jit kernel (is TRITON_INTERPRET set?)")
        kernel = kernel.fn
    return kernel


def signature(fn, constexprs, types=None, floats=()):
    """Argument types by name: constexprs are 'constexpr'; `types` overrides; names ending in
    _ptr are bf16 pointers; names in `floats` are fp32 scalars; everything else is i32."""
    types = types or {}
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            sig[name] = "*bf16"
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def resource_usage(cubin: bytes) -> dict:
    """Registers, local (spill) memory and static shared memory of the one kernel in a cubin."""
    from triton.backends.nvidia.compiler import knobs

    cuobjdump = os.path.join(os.path.dirname(knobs.nvidia.ptxas.path), "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {"registers": int(found["REG"]), "stack": int(found["STACK"]), "local": int(found["LOCAL"]),
            "static_shared": int(found["SHARED"])}


def compile_kernel(kernel, constexprs, types=None, floats=(), num_warps=4, num_stages=3, target=TARGET):
    """Compile one kernel for `target`; returns the resource usage plus cubin size, the PTX
    target line and the shared memory Triton allocates (metadata)."""
    import triton
    from triton.backends.compiler import GPUTarget

    fn = _jit_function(kernel)
    sig = signature(fn, constexprs, types, floats)
    # pointers 16-byte aligned, as torch allocations are (what the JIT assumes when launching)
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names) if sig[name].startswith("*")}
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget(*target), options={"num_warps": num_warps, "num_stages": num_stages})
    ptx_target = re.search(r"^\.target\s+(\S+)", compiled.asm["ptx"], re.M).group(1)
    return {"name": fn.__name__, "ptx_target": ptx_target, "cubin_bytes": len(compiled.asm["cubin"]),
            "shared": compiled.metadata.shared, "num_warps": num_warps,
            **resource_usage(compiled.asm["cubin"])}


def main(specs):
    import importlib

    results = []
    for spec in specs:
        module, attr = spec["kernel"].split(":")
        kernel = getattr(importlib.import_module(module), attr)
        constexprs, warps, stages = spec.get("constexprs", {}), spec.get("num_warps", 4), spec.get("num_stages", 3)
        if "config" in spec:  # an autotuned kernel: one of its GPU configs supplies tiles, warps, stages
            config = kernel.configs[spec["config"]]
            constexprs, warps, stages = {**constexprs, **config.kwargs}, config.num_warps, config.num_stages
        result = compile_kernel(kernel, constexprs, spec.get("types"), spec.get("floats", ()), warps, stages)
        results.append({"id": spec.get("id", spec["kernel"]), **result})
        print(json.dumps(results[-1]), flush=True)
    return results


if __name__ == "__main__":
    if backend.interpreting():
        sys.exit("aot.py: unset TRITON_INTERPRET (the interpreter replaces the kernels it compiles)")
    main(json.loads(sys.argv[1]))
