"""The README's first command, ./scripts/course, as a learner runs it."""

import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
URL = re.compile(r"deepseek-mini course: (http://\S+?/lab/tree/course/START_HERE\.ipynb)\?token=(\S+)")


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


class Course:
    """./scripts/course running in its own session, its output collected line by line."""

    def __init__(self, env):
        env = dict(env)
        env.pop("DISPLAY", None)
        self.proc = subprocess.Popen(
            [str(ROOT / "scripts" / "course")], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, start_new_session=True,
            # a learner's Ctrl-C: make sure SIGINT is not inherited as "ignored" from a background CI shell
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for_url(self, timeout=180):
        """The (URL, token) the command printed; fails if it exits or prints none in time."""
        deadline = time.time() + timeout
        while not (found := URL.search(self.output)):
            assert self.proc.poll() is None or self.reader.is_alive(), \
                f"course command exited without printing a URL:\n{self.output[-3000:]}"
            assert time.time() < deadline, f"no URL printed in {timeout} s:\n{self.output[-3000:]}"
            time.sleep(0.2)
        return found.group(1), found.group(2)

    def stop(self):
        """Ctrl-C (SIGINT to the server the script exec'd into); returns its exit code."""
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        self.reader.join(timeout=30)
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def _env(tmp_path, **settings):
    return dict(os.environ, JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"), **settings)


def test_course_command_serves_lab_with_nbgrader_and_stops_on_ctrl_c(tmp_path):
    port, token = _free_port(), "test-token-123"
    course = Course(_env(tmp_path, DEEPSEEK_MINI_PORT=str(port), DEEPSEEK_MINI_TOKEN=token))
    try:
        # the URL is printed once the server answers there
        assert course.wait_for_url() == (f"http://127.0.0.1:{port}/lab/tree/course/START_HERE.ipynb", token)
        base = f"http://127.0.0.1:{port}"
        status, body = _get(f"{base}/api/status", token)
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

        # Ctrl-C stops it cleanly, once
        assert course.stop() == 0, course.output
        assert "Shutting down" in course.output or "Interrupted" in course.output
    finally:
        course.kill()


def test_two_starts_at_the_same_moment_get_two_live_servers(tmp_path):
    """Started together on the same first port, each command prints its own URL, and both
    servers answer there: neither picks the other's port and dies after printing it."""
    port = _free_port()
    env = _env(tmp_path, DEEPSEEK_MINI_PORT=str(port))  # one account: one runtime folder
    courses = [Course(env), Course(env)]
    try:
        urls = [course.wait_for_url() for course in courses]
        ports = {int(re.search(r":(\d+)/", url).group(1)) for url, _ in urls}
        assert len(ports) == 2 and port in ports, urls
        for (url, token), course in zip(urls, courses):
            assert course.proc.poll() is None, f"{url} was printed but its server exited:\n{course.output}"
            status, _ = _get(url.replace("/lab/tree/course/START_HERE.ipynb", "/api/status"), token)
            assert status == 200
        for course in courses:
            assert course.stop() == 0, course.output
    finally:
        for course in courses:
            course.kill()


@pytest.fixture
def other_account():
    """A real second account on this machine (created for the test, removed after)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a second account (useradd)")
    if not (shutil.which("useradd") and shutil.which("runuser")):
        pytest.skip("useradd/runuser are not installed")
    name = f"dsm{secrets.token_hex(3)}o"
    subprocess.run(["useradd", "--no-create-home", "--shell", "/bin/sh", name], check=True)
    try:
        yield name
    finally:
        subprocess.run(["pkill", "-KILL", "-u", name], capture_output=True)
        subprocess.run(["userdel", name], capture_output=True)


def test_login_token_is_hidden_from_other_accounts(tmp_path, other_account):
    """Another account on the machine sees the server's processes, but not its token: not in
    any command line (/proc/PID/cmdline, ps), and the environment that carries it is private."""
    token = secrets.token_hex(24)
    course = Course(_env(tmp_path, DEEPSEEK_MINI_PORT=str(_free_port()), DEEPSEEK_MINI_TOKEN=token))
    try:
        url, _ = course.wait_for_url()
        deadline = time.time() + 120
        while True:  # the command prints the URL once the server answers; make sure of it
            try:
                _get(url.replace("/lab/tree/course/START_HERE.ipynb", "/api/status"), token)
                break
            except OSError:
                assert time.time() < deadline, "the server never answered at the printed URL"
                time.sleep(1)
        server = course.proc.pid

        def as_other(script):
            return subprocess.run(["runuser", "-u", other_account, "--", "sh", "-c", script],
                                  capture_output=True, text=True, cwd="/", timeout=60)

        if as_other(f"test -e /proc/{server}").returncode != 0:
            pytest.skip("/proc is mounted with hidepid here: other accounts see no processes at all")
        cmdlines = as_other("cat /proc/[0-9]*/cmdline | tr '\\0' ' '")
        assert "jupyter-lab" in cmdlines.stdout, "the other account should see the server's command line"
        assert token not in cmdlines.stdout, "the login token is readable in /proc/PID/cmdline"
        assert token not in as_other("ps -eo args").stdout
        environ = as_other(f"cat /proc/{server}/environ")
        assert environ.returncode != 0 and token not in environ.stdout
        assert course.stop() == 0, course.output
    finally:
        course.kill()


def test_setup_is_idempotent():
    """A second run of the shared setup does not reinstall anything."""
    out = subprocess.run(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "environment up to date" in out.stdout and "installing" not in out.stdout


def test_setup_waits_while_another_setup_runs():
    """Two first runs must not install into one environment at the same time: while another
    setup holds the environment's lock, the setup says it is waiting and does not go on."""
    venv = Path(os.environ.get("DEEPSEEK_MINI_VENV", ROOT / ".venv"))
    with open(venv / ".deepseek-mini-setup.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as a first run busy installing would
        proc = subprocess.Popen(["bash", "-c", f"source {ROOT}/scripts/bootstrap.sh"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            waiting = proc.stderr.readline()  # blocks until the setup says something on stderr
            assert "waiting for another" in waiting, (waiting, proc.stderr.read())
            assert proc.poll() is None, "the setup went on while another held the lock"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "environment up to date" in out
