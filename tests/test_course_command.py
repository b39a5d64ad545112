"""The README's first command, ./scripts/course, as a learner runs it."""

import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _non_loopback_ipv4():
    out = subprocess.run(["hostname", "-I"], capture_output=True, text=True).stdout.split()
    return [a for a in out if "." in a and not a.startswith("127.")]


def _get(url: str, token: str):
    req = urllib.request.Request(url, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.read().decode()


def test_course_command_serves_lab_with_nbgrader_and_stops_on_ctrl_c(tmp_path):
    port, token = _free_port(), "test-token-123"
    env = dict(os.environ, DEEPSEEK_MINI_PORT=str(port), DEEPSEEK_MINI_TOKEN=token,
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"))
    env.pop("DISPLAY", None)
    proc = subprocess.Popen(
        [str(ROOT / "scripts" / "course")], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
        # a learner's Ctrl-C: make sure SIGINT is not inherited as "ignored" from a background CI shell
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                status, body = _get(f"{base}/api/status", token)
                break
            except OSError:
                assert proc.poll() is None, f"course command exited early:\n{proc.stdout.read()}"
                assert time.time() < deadline, "JupyterLab did not answer /api/status within 120 s"
                time.sleep(1)
        assert status == 200 and "started" in json.loads(body)

        # bound to loopback only by default: the machine's other addresses do not answer
        for addr in _non_loopback_ipv4():
            with socket.socket() as s:
                s.settimeout(2)
                assert s.connect_ex((addr, port)) != 0, f"Lab answers on {addr}; it must bind 127.0.0.1"

        # the nbgrader lab extension is enabled and its server extension answers
        _, body = _get(f"{base}/lab/api/extensions", token)
        assert any(e["name"] == "@jupyter/nbgrader" or "nbgrader" in e["name"] and e["enabled"]
                   for e in json.loads(body)), "nbgrader lab extension is not enabled"
        status, _ = _get(f"{base}/formgrader/manage_assignments", token)
        assert status == 200
        # the start page exists and Lab serves it
        status, _ = _get(f"{base}/lab/tree/course/START_HERE.ipynb", token)
        assert status == 200

        # Ctrl-C (SIGINT to the server the script exec'd into) stops it cleanly, once
        os.kill(proc.pid, signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out
        assert f"http://127.0.0.1:{port}/lab/tree/course/START_HERE.ipynb?token={token}" in out, \
            "the command must print the URL with its token"
        assert "Shutting down" in out or "Interrupted" in out
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_setup_is_idempotent():
    """A second run of the shared setup does not reinstall anything."""
    out = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "environment up to date" in out.stdout and "installing" not in out.stdout
