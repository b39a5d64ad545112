"""Shared test setup.

Without CUDA, the Triton interpreter is switched on here, before any test module imports
`deepseek_mini.kernels`, so kernel tests can run the Triton path on CPU tensors
(`with backend.forced("triton")` or by calling a kernel launcher directly).
"""

import shutil

import pytest
import torch

from deepseek_mini import backend

backend.use_interpreter_if_no_gpu()

HAS_CUDA = torch.cuda.is_available()

# Test shapes are tiny: one thread is fastest, and immune to other processes on the machine
# (a notebook kernel, JupyterLab) competing for the 2 cores, where two spinning OpenMP threads
# made small ops up to 100x slower. Notebooks run in their own kernels and are not affected.
torch.set_num_threads(1)
# ./scripts/system-deps installs these where it can; tests skip only where it could not.
HAS_CHROMIUM = shutil.which("chromium") is not None
HAS_PROXY = shutil.which("configurable-http-proxy") is not None


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    skip_browser = pytest.mark.skip(
        reason="needs Debian's chromium on PATH (./scripts/system-deps installs it as root)")
    skip_hub = pytest.mark.skip(
        reason="needs configurable-http-proxy on PATH (./scripts/system-deps installs it with npm)")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
        if "browser" in item.keywords and not HAS_CHROMIUM:
            item.add_marker(skip_browser)
        if "hub" in item.keywords and not HAS_PROXY:
            item.add_marker(skip_hub)


@pytest.fixture(autouse=True)
def _seed():
    """Every test starts from the same random state, so failures reproduce."""
    torch.manual_seed(0)
    yield
