"""Where the library keeps what it builds or downloads.

A workshop pre-builds data and the tiny model once into a shared folder and points every
student at it with DEEPSEEK_MINI_HOME; a self-learner gets a folder in the user cache.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def home() -> Path:
    """Root of everything cached: $DEEPSEEK_MINI_HOME, else ~/.cache/deepseek_mini."""
    env = os.environ.get("DEEPSEEK_MINI_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "deepseek_mini"


def data_dir() -> Path:
    """Datasets (e.g. MNIST IDX files): $DEEPSEEK_MINI_DATA, else <home>/data."""
    env = os.environ.get("DEEPSEEK_MINI_DATA")
    return Path(env).expanduser() if env else home() / "data"


def models_dir() -> Path:
    """Cached checkpoints such as the tiny pretrained model: <home>/models."""
    return home() / "models"
