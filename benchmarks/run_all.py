"""Run every benchmarks/bench_*.py script and record the tables.

    python benchmarks/run_all.py            # all scripts
    python benchmarks/run_all.py norms moe  # only scripts whose name contains one of the words

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


def scripts(words):
    found = sorted(HERE.glob("bench_*.py"))
    if words:
        found = [s for s in found if any(w in s.stem for w in words)]
    return found


def main(argv):
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
             f"Command: `python benchmarks/run_all.py {' '.join(argv)}`.\n"]
    failed = []
    for script in todo:
        print(f"== {script.name}", flush=True)
        start = time.time()
        run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=os.environ.copy())
        print(run.stdout, end="", flush=True)
        parts.append(f"## {script.name} ({time.time() - start:.0f} s)\n\n{run.stdout.strip()}\n")
        if run.returncode != 0:
            failed.append(script.name)
            tail = "\n".join(run.stderr.strip().splitlines()[-15:])
            print(tail, file=sys.stderr)
            parts.append(f"**{script.name} failed (exit {run.returncode}):**\n\n```\n{tail}\n```\n")
    out_path.write_text("\n".join(parts))
    print(f"\nwrote {out_path.relative_to(HERE.parent)}")
    if failed:
        sys.exit(f"run_all.py: {len(failed)} script(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main(sys.argv[1:])
