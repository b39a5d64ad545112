"""Run every benchmarks/bench_*.py script and record the tables.

    python benchmarks/run_all.py            # all scripts
    python benchmarks/run_all.py norms moe  # only scripts whose name contains one of the words
    python benchmarks/run_all.py --with-tests --budget 480   # what gpu_session.sh runs

--with-tests first runs `pytest -m gpu tests/test_kernels_*.py` and puts its summary in the
record. --budget SECONDS bounds the whole run so that one slow script cannot use up a GPU
session's time: the tests get a quarter of it (at most 150 s), then each script gets an even
share of what is left, time unused by one passing to the next; a script that runs out is
stopped and the record says so, keeping the tables it printed. With a budget the scripts of the
open issue run first (ORDER).

Measures the machine peak once (HBM copy bandwidth, bf16 matmul TFLOP/s), passes it to each
script, prints each script's markdown tables as they come, and writes them all to
benchmarks/results/<YYYY-MM-DD>-<device>.md (commit that file: it is the record).
Without CUDA it says so and exits 0: there is nothing to time on a CPU-only machine.
"""

import os
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import device_name, export_peaks, require_cuda  # noqa: E402


# most wanted first when time is short (issue 17's families), the rest after in name order
ORDER = ["bench_quant", "bench_lora", "bench_mla_decode", "bench_norms", "bench_attention", "bench_moe"]


def scripts(words):
    found = sorted(HERE.glob("bench_*.py"), key=lambda p: (ORDER.index(p.stem) if p.stem in ORDER else len(ORDER), p.name))
    if words:
        found = [s for s in found if any(w in s.stem for w in words)]
    return found


def _text(partial):
    """Output a TimeoutExpired caught: bytes (even with text=True), str or None."""
    if isinstance(partial, bytes):
        return partial.decode(errors="replace")
    return partial or ""


def gpu_tests(timeout):
    """Run the GPU kernel tests; return the markdown section for the record."""
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider",
           *sorted(str(p.relative_to(HERE.parent)) for p in (HERE.parent / "tests").glob("test_kernels_*.py"))]
    print("== pytest -m gpu", flush=True)
    try:
        run = subprocess.run(cmd, cwd=HERE.parent, capture_output=True, text=True, timeout=timeout)
        out, status = run.stdout + run.stderr, f"exit {run.returncode}"
    except subprocess.TimeoutExpired as exc:
        out, status = _text(exc.stdout), f"stopped after {timeout:.0f} s"
    print(out[-3000:], flush=True)
    lines = out.strip().splitlines()
    failures = [line for line in lines if line.startswith(("FAILED", "ERROR"))]
    summary = lines[-1] if lines else "(no output)"
    body = "\n".join(failures[:30]) or "(no failures)"
    return f"## GPU tests\n\n`pytest -m gpu tests/test_kernels_*.py`: {summary} ({status})\n\n```\n{body}\n```\n"


def main(argv):
    with_tests = "--with-tests" in argv
    budget = None
    if "--budget" in argv:
        budget = float(argv[argv.index("--budget") + 1])
        argv = [a for i, a in enumerate(argv) if a != "--budget" and argv[i - 1:i] != ["--budget"]]
    argv = [a for a in argv if a != "--with-tests"]
    deadline = time.time() + budget if budget else None
    todo = scripts(argv)
    if not todo:
        sys.exit(f"run_all.py: no benchmarks/bench_*.py script matches {argv}")
    require_cuda("run_all.py (" + ", ".join(s.name for s in todo) + ")")

    import torch
    import triton

    peaks = export_peaks()
    now = datetime.now(timezone.utc)
    device = device_name()
    out_path = HERE / "results" / f"{now:%Y-%m-%d}-{re.sub(r'[^A-Za-z0-9]+', '-', device).strip('-').lower()}.md"
    out_path.parent.mkdir(exist_ok=True)
    parts = [f"# Benchmarks {now:%Y-%m-%d %H:%M} UTC on {device}\n",
             f"torch {torch.__version__}, triton {triton.__version__}, CUDA {torch.version.cuda}. "
             f"Measured peak: {peaks['bandwidth_gbps']:.0f} GB/s copy bandwidth, "
             f"{peaks['bf16_tflops']:.0f} TFLOP/s bf16 matmul.\n",
             f"Command: `python benchmarks/run_all.py {' '.join(sys.argv[1:])}`.\n"]
    if with_tests:
        parts.append(gpu_tests(timeout=min(150.0, budget / 4) if budget else None))
        out_path.write_text("\n".join(parts))  # keep what we have if the session ends early
    failed = []
    for i, script in enumerate(todo):
        print(f"== {script.name}", flush=True)
        start = time.time()
        timeout = max(5.0, (deadline - start) / (len(todo) - i)) if deadline else None
        try:
            run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                                 env=os.environ.copy(), timeout=timeout)
            stdout, stderr, code = run.stdout, run.stderr, run.returncode
        except subprocess.TimeoutExpired as exc:
            stdout = _text(exc.stdout)
            stderr = f"stopped after its share of --budget ({timeout:.0f} s); the tables above are what it printed"
            code = "timeout"
        print(stdout, end="", flush=True)
        parts.append(f"## {script.name} ({time.time() - start:.0f} s)\n\n{stdout.strip()}\n")
        if code != 0:
            failed.append(script.name)
            tail = "\n".join(stderr.strip().splitlines()[-15:])
            print(tail, file=sys.stderr)
            parts.append(f"**{script.name} failed ({code if code == 'timeout' else f'exit {code}'}):**\n\n```\n{tail}\n```\n")
        out_path.write_text("\n".join(parts))
    print(f"\nwrote {out_path.relative_to(HERE.parent)}")
    if failed:
        sys.exit(f"run_all.py: {len(failed)} script(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
