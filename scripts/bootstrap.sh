# Sourced by ./scripts/course and ./scripts/test: make sure the local virtual environment
# exists and matches pyproject.toml. Idempotent: re-runs skip pip unless pyproject.toml (or
# this file) changed since the last successful install.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${DEEPSEEK_MINI_VENV:-$REPO/.venv}"

find_python() {
    for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3 python; do
        [ -n "$candidate" ] || continue
        if command -v "$candidate" >/dev/null 2>&1 &&
            "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "deepseek-mini needs Python 3.11 or newer on PATH (or set PYTHON=/path/to/python3.11)" >&2
    return 1
}

if [ ! -x "$VENV/bin/python" ]; then
    py="$(find_python)"
    echo "[setup] creating virtual environment in $VENV with $($py --version)"
    "$py" -m venv "$VENV"
fi

stamp_file="$VENV/.deepseek-mini-installed"
stamp="$(cat "$REPO/pyproject.toml" "$REPO/scripts/bootstrap.sh" | "$VENV/bin/python" -c 'import hashlib,sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())')"
if [ "$(cat "$stamp_file" 2>/dev/null)" != "$stamp" ]; then
    echo "[setup] installing deepseek-mini and the course tools into $VENV (first run: a few minutes)"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
    # torch is pinned to the CPU build in pyproject.toml; installing it first, alone, keeps pip
    # from ever considering a multi-GB CUDA build for another package's looser range.
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$REPO[dev]"
    echo "$stamp" > "$stamp_file"
else
    echo "[setup] environment up to date ($VENV)"
fi

export PATH="$VENV/bin:$PATH"   # nbgrader runs `alembic` from PATH; Lab's formgrader needs it
