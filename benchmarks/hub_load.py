"""How many students can run assignment 01 at the same time on this machine?

Starts N Jupyter kernels at once, each executing the whole of assignment 01 (MNIST MLP: load
data, train, plot) the way a student with correct answers runs it, for N = 1, 2, 4, ... until a
run fails, runs past --max-minutes, or the kernels' memory passes --max-memory of RAM. Every
run is bounded: kernels still busy at the time limit are killed.

    python benchmarks/hub_load.py                      # N = 1, 2, 4, 8, 16
    python benchmarks/hub_load.py --counts 1,4 --max-minutes 5

Each kernel gets what jupyterhub_config.py gives a student's server: OMP_NUM_THREADS from
--threads (the hub's per-user CPU limit) and DEEPSEEK_MINI_HOME pointing at one shared folder.
It also measures one idle Jupyter server, the other per-student process a hub runs. Prints a
markdown table; docs/workshop-load.md records a run.
"""

import argparse
import math
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "solutions" / "01_mnist_mlp" / "01_mnist_mlp.ipynb"

# One student: execute the notebook in its own kernel, in its own working folder.
STUDENT = """
import sys, time, nbformat
from nbclient import NotebookClient
nb = nbformat.read(sys.argv[1], as_version=4)
start = time.time()
NotebookClient(nb, timeout=None, kernel_name="python3",
               resources={"metadata": {"path": sys.argv[2]}}).execute()
print(f"done {time.time() - start:.1f}")
"""


def tree_rss(proc: psutil.Process) -> int:
    """Resident memory of a process and all its children (the kernel), in bytes."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def kernel_cpu(proc: psutil.Process, seen: dict) -> None:
    """Record the CPU seconds (user + system) each kernel under a driver has used so far."""
    for child in proc.children(recursive=True):
        try:
            t = child.cpu_times()
            seen[child.pid] = t.user + t.system
        except psutil.NoSuchProcess:
            pass


def kernel_rss(proc: psutil.Process) -> int:
    """Resident memory of the kernels under one student's driver (the driver not counted)."""
    return tree_rss(proc) - proc.memory_info().rss


def run_students(n: int, notebook: Path, threads: int, max_seconds: float, home: Path):
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               DEEPSEEK_MINI_HOME=str(home), TQDM_DISABLE="1", MPLBACKEND="Agg")
    work = Path(tempfile.mkdtemp(prefix="hub-load-"))
    procs = []
    start = time.time()
    for i in range(n):
        folder = work / f"student{i}"
        folder.mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", STUDENT, str(notebook), str(folder)],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    handles = [psutil.Process(p.pid) for p in procs]
    finished = {}
    cpu = [{} for _ in range(n)]  # per student: kernel pid -> CPU seconds, last seen
    peak_total = peak_one = 0
    low_memory = False
    while len(finished) < n and time.time() - start < max_seconds:
        if psutil.virtual_memory().available < 0.1 * psutil.virtual_memory().total:
            low_memory = True  # stop before the machine starts killing processes
            break
        sizes = []
        for i, (p, h) in enumerate(zip(procs, handles)):
            if i in finished:
                continue
            if p.poll() is not None:
                finished[i] = time.time() - start
                continue
            try:
                sizes.append(kernel_rss(h))
                kernel_cpu(h, cpu[i])
            except psutil.NoSuchProcess:
                pass
        if sizes:
            peak_total = max(peak_total, sum(sizes))
            peak_one = max(peak_one, max(sizes))
        time.sleep(0.5)
    timed_out = [i for i in range(n) if i not in finished]
    for i in timed_out:  # bounded: nobody keeps running past the limit
        for child in handles[i].children(recursive=True):
            child.kill()
        procs[i].kill()
    failures = []
    for i, p in enumerate(procs):
        out, err = p.communicate()
        if i not in timed_out and p.returncode != 0:
            # nbclient's error ends with the cell's exception: keep its last non-empty lines
            lines = [line for line in err.splitlines() if line.strip()]
            failures.append(" / ".join(lines[-3:]) if lines else f"exit {p.returncode}")
    shutil.rmtree(work, ignore_errors=True)
    cpu_seconds = [sum(seen.values()) for i, seen in enumerate(cpu) if i in finished]
    if low_memory:
        failures.append("machine below 10% free memory")
    return {"n": n, "times": sorted(finished.values()), "timed_out": len(timed_out),
            "cpu": max(cpu_seconds, default=0.0), "load": os.getloadavg()[0],
            "failures": failures, "peak_total": peak_total, "peak_one": peak_one}


def idle_server_rss() -> int:
    """Resident memory of one idle Jupyter server (what a hub runs per logged-in student)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runtime = tempfile.mkdtemp(prefix="hub-load-runtime-")
    cmd = [sys.executable, "-m", "jupyter_server", f"--port={port}", "--ip=127.0.0.1",
           "--IdentityProvider.token=load", "--no-browser", f"--ServerApp.root_dir={runtime}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    proc = subprocess.Popen(cmd, env=dict(os.environ, JUPYTER_RUNTIME_DIR=runtime),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        import urllib.request
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token=load", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        time.sleep(2)
        return psutil.Process(proc.pid).memory_info().rss
    finally:
        proc.terminate()
        proc.wait(30)
        shutil.rmtree(runtime, ignore_errors=True)


def gib(b):
    return b / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--counts", default="1,2,4,8,16", help="numbers of concurrent students to try")
    parser.add_argument("--notebook", type=Path, default=NOTEBOOK)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per kernel (the hub's per-user CPU limit)")
    parser.add_argument("--max-minutes", type=float, default=15.0,
                        help="a run holds only if every student finishes within this")
    parser.add_argument("--max-memory", type=float, default=0.8,
                        help="a run holds only if the kernels stay under this fraction of RAM")
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.counts.split(",")]
    if any(c < 1 for c in counts):
        raise SystemExit(f"--counts must be positive integers, got {args.counts!r}")
    if not args.notebook.is_file():
        raise SystemExit(f"--notebook {args.notebook} does not exist")

    ram = psutil.virtual_memory().total
    print(f"machine: {os.cpu_count()} cores, {gib(ram):.1f} GiB RAM, {platform.processor() or platform.machine()}")
    print(f"notebook: {args.notebook.relative_to(REPO) if args.notebook.is_relative_to(REPO) else args.notebook}; "
          f"{args.threads} torch thread(s) per kernel; limit {args.max_minutes:g} min, "
          f"{args.max_memory:.0%} of RAM\n")
    home = Path(tempfile.mkdtemp(prefix="hub-load-home-"))  # one shared DEEPSEEK_MINI_HOME
    server = idle_server_rss()

    rows, held, worst_kernel, worst_cpu = [], 0, 0, 0.0
    for n in counts:
        r = run_students(n, args.notebook, args.threads, args.max_minutes * 60, home)
        worst_kernel = max(worst_kernel, r["peak_one"])
        too_big = r["peak_total"] >= args.max_memory * ram
        ok = not r["failures"] and not r["timed_out"] and not too_big
        held = n if ok else held
        limit = f"> {args.max_minutes * 60:.0f}"
        fastest = f"{r['times'][0]:.0f}" if r["times"] else limit
        slowest = limit if r["timed_out"] else f"{r['times'][-1]:.0f}"
        why = r["failures"][:1] or (["past the time limit"] if r["timed_out"] else []) or \
            (["past the memory limit"] if too_big else [])
        worst_cpu = max(worst_cpu, r["cpu"])
        rows.append(f"| {n} | {fastest} | {slowest} | {r['cpu']:.0f} | {gib(r['peak_one']):.2f} | "
                    f"{gib(r['peak_total']):.2f} | {r['load']:.1f} | {'yes' if ok else 'no: ' + why[0]} |")
        print(rows[-1], flush=True)
        if not ok:
            break
    shutil.rmtree(home, ignore_errors=True)

    print("\n| students | fastest (s) | slowest (s) | CPU s per kernel | one kernel, peak RSS (GiB) "
          "| all kernels, peak RSS (GiB) | load avg (1 min) | held |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    print(f"\nidle Jupyter server per student: {gib(server):.2f} GiB")
    print(f"largest count that held: {held}")
    if worst_kernel:
        # Memory alone would allow this many (kernel + its server per student); CPU is shared,
        # so each student's notebook takes longer as the count grows (the table above).
        by_memory = math.floor(args.max_memory * ram / (worst_kernel + server))
        print(f"memory bound at {args.max_memory:.0%} of RAM: {by_memory} students")
    if worst_cpu:
        # On an otherwise idle machine the cores are shared fairly, so N students all finish
        # within the limit when N * (CPU seconds per run) <= cores * limit.
        by_cpu = math.floor(os.cpu_count() * args.max_minutes * 60 / worst_cpu)
        print(f"CPU bound, everyone done within {args.max_minutes:g} min on {os.cpu_count()} idle cores: "
              f"{by_cpu} students")
    return held


if __name__ == "__main__":
    main()
