"""The project's own plumbing: pins, environment check, backend dispatch rule."""

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch

import deepseek_mini
from deepseek_mini import backend, paths

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_requirements():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for name, extra in project["optional-dependencies"].items():
        reqs += [r for r in extra if not r.startswith("deepseek-mini")]
    return reqs


def _environment_yml_pip_requirements():
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    reqs = []
    for line in lines[start + 1 :]:
        m = re.match(r"^\s+- (.+?)\s*(#.*)?$", line)
        if not m:
            break
        if not m.group(1).startswith("-e"):
            reqs.append(m.group(1))
    return reqs


def _normalise(req: str) -> str:
    return re.sub(r"\s+", "", req)


def test_environment_yml_mirrors_pyproject():
    ours = sorted(map(_normalise, _pyproject_requirements()))
    conda = sorted(map(_normalise, _environment_yml_pip_requirements()))
    missing = sorted(set(ours) - set(conda))
    extra = sorted(set(conda) - set(ours))
    assert not missing and not extra, (
        f"environment.yml drifted from pyproject.toml: missing {missing}, not in pyproject {extra}"
    )


def test_torch_and_triton_are_pinned():
    reqs = {_normalise(r).split(";")[0] for r in _pyproject_requirements()}
    assert "torch==2.13.0" in reqs, "torch must be pinned to the CPU build 2.13.0"
    assert "triton==3.8.0" in reqs, "triton must be pinned to 3.8.0"


def test_installed_torch_is_the_pinned_cpu_build():
    assert torch.__version__.split("+")[0] == "2.13.0"


def test_version_is_exposed():
    assert re.fullmatch(r"\d+\.\d+\.\d+", deepseek_mini.__version__)


def test_unknown_attribute_names_itself():
    with pytest.raises(AttributeError, match="no_such_thing"):
        deepseek_mini.no_such_thing


def test_doctor_reports_on_a_cpu_machine():
    out = subprocess.run(
        [sys.executable, "-m", "deepseek_mini", "doctor"], capture_output=True, text=True, timeout=120
    )
    text = out.stdout
    for label in ("python", "torch", "triton", "device", "interpreter", "ops run as", "nbgrader",
                  "MNIST bundled", "text corpus"):
        assert re.search(rf"^\s+{re.escape(label)}\s", text, re.M), f"doctor does not report {label!r}:\n{text}"
    assert out.returncode == 0, f"doctor found problems on the test machine:\n{text}\n{out.stderr}"
    if not torch.cuda.is_available():
        assert "no CUDA device" in text


def test_doctor_rejects_unknown_command():
    out = subprocess.run([sys.executable, "-m", "deepseek_mini", "frobnicate"], capture_output=True, text=True)
    assert out.returncode == 2 and "frobnicate" in out.stderr


def test_dispatch_rule():
    cpu = torch.zeros(2)
    with backend.forced("auto"):
        assert backend.use_triton(cpu) is False
    with backend.forced("torch"):
        assert backend.use_triton(cpu) is False
    with backend.forced("triton"):
        assert backend.use_triton(cpu) is backend.triton_available()
    with pytest.raises(ValueError, match="backend must be one of"):
        backend.forced("cuda")


def test_bad_backend_env_var_is_a_clear_error():
    out = subprocess.run(
        [sys.executable, "-c", "import deepseek_mini.backend"],
        capture_output=True, text=True, env={"DEEPSEEK_MINI_BACKEND": "gpu", "PATH": "/usr/bin"},
        cwd=ROOT,
    )
    assert out.returncode != 0 and "DEEPSEEK_MINI_BACKEND='gpu'" in out.stderr


def test_forcing_triton_on_cpu_turns_on_the_interpreter():
    if torch.cuda.is_available():
        pytest.skip("CUDA present: forcing triton uses the GPU")
    out = subprocess.run(
        [sys.executable, "-c", "import os, deepseek_mini.kernels; print(os.environ.get('TRITON_INTERPRET'))"],
        capture_output=True, text=True, env={"DEEPSEEK_MINI_BACKEND": "triton", "PATH": "/usr/bin"}, cwd=ROOT,
    )
    assert out.stdout.strip() == "1", out.stderr


def test_workshop_home_comes_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DEEPSEEK_MINI_HOME", str(tmp_path))
    monkeypatch.delenv("DEEPSEEK_MINI_DATA", raising=False)
    assert paths.home() == tmp_path
    assert paths.data_dir() == tmp_path / "data"
    assert paths.models_dir() == tmp_path / "models"
