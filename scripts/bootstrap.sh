# Sourced by ./scripts/course and ./scripts/test: make sure the local virtual environment
# exists and matches pyproject.toml. Idempotent: re-runs skip pip unless pyproject.toml (or
# this file) changed since the last successful install. Two runs at the same moment take turns
# (a lock in the environment's folder), so two first runs never install into one venv at once.
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

# wait_for_lock PYTHON FD WHAT: take an exclusive flock(2) on the file open as FD, waiting (and
# saying so) while another process holds it. Python does the flock because macOS has no flock
# command. The lock belongs to the open file, not to Python: it lasts until every process
# holding FD has closed it (`exec FD>&-`, or exit).
wait_for_lock() {
    "$1" - "$2" "$3" <<'PY'
import fcntl, sys
fd, what = int(sys.argv[1]), sys.argv[2]
try:
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
except BlockingIOError:
    print(f"[setup] waiting for {what}", file=sys.stderr, flush=True)
    fcntl.flock(fd, fcntl.LOCK_EX)
PY
}

if mkdir -p "$VENV" 2>/dev/null && [ -w "$VENV" ]; then
    exec 8>>"$VENV/.deepseek-mini-setup.lock"
    if [ -x "$VENV/bin/python" ]; then lock_python="$VENV/bin/python"; else lock_python="$(find_python)"; fi
    wait_for_lock "$lock_python" 8 "another ./scripts/course or ./scripts/test to finish setting up $VENV"
fi

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
exec 8>&-   # set up: the next run may go (and the server ./scripts/course starts never holds it)

export PATH="$VENV/bin:$PATH"   # nbgrader runs `alembic` from PATH; Lab's formgrader needs it
