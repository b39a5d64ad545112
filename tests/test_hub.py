"""A whole workshop on a real JupyterHub on localhost, through the Hub's REST API.

setup_workshop.py prepares a throw-away root folder and three real system accounts (one
instructor, two students); course/hub/jupyterhub_config.py runs the hub unedited. Then, as the
people would: the instructor generates and releases an assignment from formgrader, each student
fetches it, answers (one right, one wrong) and submits through the assignment-list extension,
the instructor collects, autogrades and releases feedback, and each student fetches their own.
The gradebook scores must be exact, and the operating system must keep students out of each
other's files and out of the instructor's source notebooks.
"""

import json
import os
import pwd
import re
import runpy
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import nbformat
import pytest
import requests

from course_answers import answer, solution_code

REPO = Path(__file__).resolve().parent.parent
HUB_DIR = REPO / "course" / "hub"
ARTIFACTS = REPO / "test-artifacts"
COURSE_ID = "deepseek-mini"
ASSIGNMENT = "00_setup"  # the quickest assignment to autograde: keeps this test in budget
COURSE_SOURCE = REPO  # setup_workshop.py copies course/, solutions/, exercises/ from here

pytestmark = [pytest.mark.hub, pytest.mark.slow]

RUN = secrets.token_hex(3)  # unique account names per test run
INSTRUCTOR = f"dsm{RUN}i"
STUDENT_RIGHT = f"dsm{RUN}a"
STUDENT_WRONG = f"dsm{RUN}b"
STUDENTS = (STUDENT_RIGHT, STUDENT_WRONG)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def as_user(user, *cmd):
    """Run a command as `user` (a real login-less process with that uid)."""
    return subprocess.run(["runuser", "-u", user, "--", *cmd], capture_output=True, text=True,
                          cwd="/")


class Hub:
    """The hub's REST API as its admin service, and each user's server as that user."""

    def __init__(self, url, admin_token, root):
        self.url, self.root = url, root
        self.admin = requests.Session()
        self.admin.headers["Authorization"] = f"token {admin_token}"
        self.users = {}

    def api(self, method, path, **kwargs):
        r = self.admin.request(method, f"{self.url}/hub/api{path}", timeout=60, **kwargs)
        assert r.status_code < 400, f"{method} /hub/api{path} -> {r.status_code}: {r.text[:500]}"
        return r.json() if r.text else None

    def start_server(self, name):
        self.api("POST", f"/users/{name}/server")

    def wait_ready(self, name, timeout=180):
        deadline = time.time() + timeout
        while time.time() < deadline:
            server = self.api("GET", f"/users/{name}")["servers"].get("")
            if server and server["ready"]:
                return
            time.sleep(1)
        raise AssertionError(f"{name}'s server did not become ready in {timeout} s")

    def login_as(self, name):
        """A token the hub issues to `name` (as an admin would for a script), then a session."""
        token = self.api("POST", f"/users/{name}/tokens",
                         json={"note": "workshop test", "expires_in": 3600})["token"]
        s = requests.Session()
        s.headers["Authorization"] = f"token {token}"
        self.users[name] = s
        return s

    def server(self, name, method, path, **kwargs):
        """A request to `name`'s own Jupyter server, through the hub's proxy."""
        r = self.users[name].request(method, f"{self.url}/user/{name}{path}", timeout=300, **kwargs)
        assert r.status_code < 400, f"{name}: {method} {path} -> {r.status_code}: {r.text[:800]}"
        return r


def formgrader(hub, method, path, **kwargs):
    r = hub.server(INSTRUCTOR, method, f"/formgrader/api{path}", **kwargs)
    return r.json()


def assignment_action(hub, student, action):
    params = {"course_id": COURSE_ID, "assignment_id": ASSIGNMENT}
    r = hub.server(student, "POST", f"/assignments/{action}", data=params)
    reply = r.json()
    assert not (isinstance(reply, dict) and reply.get("success") is False), reply
    return reply


def list_assignments(hub, student):
    reply = hub.server(student, "GET", "/assignments", params={"course_id": COURSE_ID}).json()
    assert reply["success"], reply
    return reply["value"]


def server_environment(user):
    """The environment of `user`'s Jupyter server process, as the spawner set it."""
    for pid in subprocess.run(["pgrep", "-u", user, "-f", "jupyterhub.singleuser"],
                              capture_output=True, text=True).stdout.split():
        raw = Path(f"/proc/{pid}/environ").read_bytes()
        return dict(item.split("=", 1) for item in raw.decode().split("\0") if "=" in item)
    raise AssertionError(f"no server process running as {user}")


def readable_by_others(path: Path) -> bool:
    """Every folder from / down to `path` lets other accounts through (o+x)."""
    return all(os.stat(p).st_mode & 0o001 for p in [path.resolve(), *path.resolve().parents])


def stop_user_processes(user):
    """Anything still running as a test account (its server, kernels) must end before userdel."""
    pids = subprocess.run(["pgrep", "-u", user], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass


def hub_env(root, **settings):
    """The environment to run setup_workshop.py and the hub with, on free loopback ports."""
    port, api_port, proxy_port = free_port(), free_port(), free_port()
    env = dict(os.environ, DEEPSEEK_MINI_HUB_ROOT=str(root), DEEPSEEK_MINI_HUB_IP="127.0.0.1",
               DEEPSEEK_MINI_HUB_PORT=str(port), DEEPSEEK_MINI_HUB_API_PORT=str(api_port),
               DEEPSEEK_MINI_HUB_PROXY_API_PORT=str(proxy_port), DEEPSEEK_MINI_HUB_CPU="1")
    for name in ("DEEPSEEK_MINI_HUB_PASSWORD", "DEEPSEEK_MINI_HUB_ADMIN_PASSWORD",
                 "DEEPSEEK_MINI_HUB_API_TOKEN"):
        env.pop(name, None)
    env.update(settings)
    return env


@contextmanager
def running_hub(root, env, request):
    """JupyterHub on course/hub/jupyterhub_config.py, unedited; yields its URL. Its log is kept
    in test-artifacts/ when a test failed."""
    if shutil.which("configurable-http-proxy") is None:
        pytest.skip("configurable-http-proxy is not installed (./scripts/system-deps installs it)")
    log_path = root / "hub" / "jupyterhub.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f",
                                 str(HUB_DIR / "jupyterhub_config.py")],
                                cwd=root / "hub", env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{env['DEEPSEEK_MINI_HUB_PORT']}"
            deadline = time.time() + 60
            while True:
                try:
                    if requests.get(f"{url}/hub/api/", timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                if proc.poll() is not None or time.time() > deadline:
                    raise AssertionError("JupyterHub did not start:\n" + log_path.read_text()[-3000:])
                time.sleep(0.5)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)  # the hub stops the user servers, then the proxy
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if request.session.testsfailed:  # the hub's and the servers' own account of it
                ARTIFACTS.mkdir(exist_ok=True)
                shutil.copy2(log_path, ARTIFACTS / f"hub-{root.name}.log")


def setup_workshop(env, root, check=True):
    """Run setup_workshop.py (again) for this test's accounts."""
    return subprocess.run([sys.executable, str(HUB_DIR / "setup_workshop.py"), "--root", str(root),
                           "--instructor", INSTRUCTOR, "--students", ",".join(STUDENTS),
                           "--course-source", str(COURSE_SOURCE),
                           # the tiny model trains for minutes: not needed by assignment 00
                           "--skip-model"],
                          check=check, env=env, timeout=300, capture_output=not check, text=True)


@pytest.fixture(scope="module")
def hub(request):
    if os.geteuid() != 0:
        pytest.skip("the hub test creates system accounts and runs servers as them: run as root")
    private = [str(p) for p in (REPO, Path(sys.prefix)) if not readable_by_others(p)]
    if private:
        pytest.skip(f"{', '.join(private)} cannot be read by other accounts (a parent folder such "
                    "as /root is private), so the students' servers could not import the course")
    if not (COURSE_SOURCE / "solutions" / ASSIGNMENT).is_dir():
        pytest.skip(f"solutions/{ASSIGNMENT} is not in this checkout")
    root = Path(tempfile.mkdtemp(prefix=f"dsm-hub-{RUN}-", dir="/tmp"))
    root.chmod(0o755)  # users reach the shared env, data and exchange through it
    admin_token = secrets.token_hex(32)
    env = hub_env(root, DEEPSEEK_MINI_HUB_API_TOKEN=admin_token)
    try:
        setup_workshop(env, root)
        with running_hub(root, env, request) as url:
            hub = Hub(url, admin_token, root)
            hub.env = env
            yield hub
    finally:
        for user in (INSTRUCTOR, *STUDENTS):
            stop_user_processes(user)
            subprocess.run(["userdel", "--remove", user], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def source_notebooks():
    """The instructor's source notebooks of ASSIGNMENT, by file name."""
    folder = COURSE_SOURCE / "solutions" / ASSIGNMENT
    return {p.name: nbformat.read(p, as_version=4) for p in sorted(folder.glob("*.ipynb"))}


def hub_login(url, name, password):
    """Log in through the hub's login form, as a browser does; True if the hub let them in."""
    s = requests.Session()
    page = s.get(f"{url}/hub/login", timeout=30).text
    xsrf = re.search(r'name="_xsrf" value="([^"]+)"', page)
    r = s.post(f"{url}/hub/login", allow_redirects=False, timeout=60,
               data={"username": name, "password": password, "_xsrf": xsrf.group(1) if xsrf else ""})
    return r.status_code == 302 and any(c.name.startswith("jupyterhub-hub-login") for c in s.cookies)


def test_workshop_flow_through_the_hub(hub):
    # People log in with their own system password (PAM): never with a wrong or another's one.
    password = secrets.token_urlsafe(12)
    subprocess.run(["chpasswd"], input=f"{STUDENT_RIGHT}:{password}", text=True, check=True)
    assert hub_login(hub.url, STUDENT_RIGHT, password)
    assert not hub_login(hub.url, STUDENT_RIGHT, password + "x")
    assert not hub_login(hub.url, STUDENT_WRONG, password)

    people = (INSTRUCTOR, *STUDENTS)
    for name in people:
        hub.start_server(name)  # all three start at once, as at the start of a class
    for name in people:
        hub.wait_ready(name)
        hub.login_as(name)

    # Each server runs as its own system user, pointed at the shared course folders.
    for name in people:
        assert hub.server(name, "GET", "/api/contents/").json()["type"] == "directory"
        env = server_environment(name)
        assert env["DEEPSEEK_MINI_HOME"] == str(hub.root / "shared")
        assert env["DEEPSEEK_MINI_EXCHANGE"] == str(hub.root / "exchange")
        assert env["JUPYTER_CONFIG_PATH"] == str(hub.root / "etc" / "jupyter")
    users = hub.api("GET", "/users")
    assert {u["name"] for u in users} >= set(people)
    assert {u["name"] for u in users if u["admin"]} == {INSTRUCTOR}

    # Instructor, in formgrader: the class roster, then generate and release the assignment.
    for student in STUDENTS:
        formgrader(hub, "PUT", f"/student/{student}",
                   json={"first_name": student, "last_name": "Test", "email": None})
    generated = formgrader(hub, "POST", f"/assignment/{ASSIGNMENT}/assign")
    assert generated["success"], generated.get("log") or generated
    released = formgrader(hub, "POST", f"/assignment/{ASSIGNMENT}/release")
    assert released["success"], released.get("log") or released

    # Each student: fetch, answer in their own server (contents API), submit.
    sources = source_notebooks()
    wrong = {}
    for student in STUDENTS:
        listed = list_assignments(hub, student)
        assert [(a["assignment_id"], a["status"]) for a in listed] == [(ASSIGNMENT, "released")]
        assignment_action(hub, student, "fetch")
        for name, source in sources.items():
            path = f"{COURSE_ID}/{ASSIGNMENT}/{name}"
            nb = nbformat.from_dict(hub.server(student, "GET", f"/api/contents/{path}").json()["content"])
            assert "### BEGIN SOLUTION" not in json.dumps(nb), "students must not get the solutions"
            answer(nb, source)
            if student == STUDENT_WRONG:
                # one typical mistake, from the course's own list, in the first exercise
                grade_id, code = planted_mistake(source)
                cell = next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)
                cell.source = code
                wrong[student, name] = grade_id
            hub.server(student, "PUT", f"/api/contents/{path}",
                       json={"type": "notebook", "format": "json", "content": nb})
        assignment_action(hub, student, "submit")
        listed = list_assignments(hub, student)
        statuses = sorted(a["status"] for a in listed if a["assignment_id"] == ASSIGNMENT)
        assert statuses == ["fetched", "submitted"]

    # Instructor: collect, autograde each submission, generate and release feedback.
    collected = formgrader(hub, "POST", f"/assignment/{ASSIGNMENT}/collect")
    assert collected["success"], collected.get("log") or collected
    for student in STUDENTS:
        graded = formgrader(hub, "POST", f"/submission/{ASSIGNMENT}/{student}/autograde")
        assert graded["success"], graded.get("log") or graded
    for step in ("generate_feedback", "release_feedback"):
        done = formgrader(hub, "POST", f"/assignment/{ASSIGNMENT}/{step}")
        assert done["success"], done.get("log") or done

    # Exact scores in the gradebook: full marks for the right answers; for the wrong student,
    # full marks minus the points of the tests of the exercise with the mistake (the course's
    # own test suite checks that those tests fail on every planted mistake).
    max_points = {name: notebook_points(nb) for name, nb in sources.items()}
    expected = {(student, name): max_points[name] for student in STUDENTS for name in sources}
    for (student, name), grade_id in wrong.items():
        expected[student, name] -= points_depending_on(sources[name], grade_id)
    total = {s: sum(expected[s, name] for name in sources) for s in STUDENTS}
    assert total[STUDENT_WRONG] < total[STUDENT_RIGHT] == sum(max_points.values())
    submissions = formgrader(hub, "GET", f"/submissions/{ASSIGNMENT}")
    scores = {s["student"]: (s["score"], s["max_score"]) for s in submissions if s["student"] in STUDENTS}
    assert scores == {s: (total[s], sum(max_points.values())) for s in STUDENTS}

    # Each student fetches feedback and sees only their own: their score in every notebook.
    for student in STUDENTS:
        assignment_action(hub, student, "fetch_feedback")
        folder = f"{COURSE_ID}/{ASSIGNMENT}/feedback"
        stamps = hub.server(student, "GET", f"/api/contents/{folder}").json()["content"]
        assert len(stamps) == 1, f"{student} should have exactly one feedback folder: {stamps}"
        for name in sources:
            html_path = f"{stamps[0]['path']}/{Path(name).stem}.html"
            html = hub.server(student, "GET", f"/api/contents/{html_path}").json()["content"]
            score = f"{Path(name).stem} (Score: {float(expected[student, name])} / {float(max_points[name])})"
            assert score in html, f"{student}'s feedback should say {score!r}"

    # The operating system keeps everyone in their lane (checked as the real student accounts).
    right_home = Path(pwd.getpwnam(STUDENT_RIGHT).pw_dir)
    instructor_home = Path(pwd.getpwnam(INSTRUCTOR).pw_dir)
    right_copy = right_home / COURSE_ID / ASSIGNMENT / next(iter(sources))
    source_copy = instructor_home / "deepseek-mini" / "solutions" / ASSIGNMENT / next(iter(sources))
    inbound = hub.root / "exchange" / COURSE_ID / "inbound"
    assert right_copy.is_file() and source_copy.is_file() and inbound.is_dir()
    for path in (right_copy, right_home, source_copy, instructor_home):
        denied = as_user(STUDENT_WRONG, "cat" if path.is_file() else "ls", str(path))
        assert denied.returncode != 0 and "Permission denied" in denied.stderr, (path, denied)
    listing = as_user(STUDENT_WRONG, "ls", str(inbound))
    assert listing.returncode != 0 and "Permission denied" in listing.stderr
    # ...while the shared data and model folder is readable by all and writable by none.
    shared = hub.root / "shared"
    assert as_user(STUDENT_WRONG, "ls", str(shared)).returncode == 0
    assert as_user(STUDENT_WRONG, "touch", str(shared / "mine")).returncode != 0


def planted_mistake(source_nb):
    """(grade_id, code) of a typical wrong answer to the notebook's first exercise, from the
    assignment's planted_wrong_answers.py."""
    planted = runpy.run_path(str(COURSE_SOURCE / "solutions" / ASSIGNMENT / "planted_wrong_answers.py"))
    grade_id = next(iter(solution_code(source_nb)))
    mistakes = planted["WRONG_ANSWERS"][grade_id]
    return grade_id, mistakes[sorted(mistakes)[0]]


def notebook_points(nb):
    """Points of the autograded test cells of a source notebook."""
    return sum(c.metadata["nbgrader"].get("points", 0) for c in nb.cells
               if c.cell_type == "code" and c.metadata.get("nbgrader", {}).get("grade")
               and not c.metadata["nbgrader"].get("solution"))


def points_depending_on(source_nb, grade_id):
    """Points of the graded test cells that check answer `grade_id`: those between it and the
    next answer cell (how the course lays out every exercise)."""
    points, inside = 0, False
    for c in source_nb.cells:
        meta = c.metadata.get("nbgrader", {})
        if meta.get("solution"):
            inside = meta.get("grade_id") == grade_id
        elif inside and meta.get("grade") and c.cell_type == "code":
            points += meta.get("points", 0)
    return points


def test_students_cannot_take_over_the_course_in_the_exchange(hub):
    """Everyone fetches what is in exchange/<course>: a student must not be able to move the
    instructor's folder aside and put their own in its place (nor write into it)."""
    exchange = hub.root / "exchange"
    course = exchange / COURSE_ID
    assert os.stat(exchange).st_mode & 0o7777 == 0o1777, "the exchange must be 777 and sticky"
    assert course.is_dir() and not course.is_symlink()
    assert course.owner() == INSTRUCTOR and os.stat(course).st_mode & 0o022 == 0
    attempts = {
        "rename": ["mv", str(course), str(exchange / "moved-away")],
        "delete": ["rm", "-rf", str(course)],
        "write into": ["mkdir", str(course / "outbound-mine")],
    }
    for what, cmd in attempts.items():
        assert as_user(STUDENT_WRONG, *cmd).returncode != 0, f"a student could {what} {course}"
    assert course.is_dir() and course.owner() == INSTRUCTOR
    assert not (exchange / "moved-away").exists() and not (course / "outbound-mine").exists()
    # The instructor's nbgrader still releases there (test_workshop_flow_through_the_hub covers
    # the whole cycle); a student fetches the instructor's release, not anyone else's.


def test_setup_refuses_a_course_folder_a_student_made(hub):
    """If a student made exchange/<course> before the setup ran (or a folder of that name is
    there from an older set-up), the setup stops and says so instead of adopting it."""
    course = hub.root / "exchange" / COURSE_ID
    kept = hub.root / "exchange-course-kept"
    if course.exists():
        course.rename(kept)
    try:
        made = as_user(STUDENT_WRONG, "mkdir", str(course))
        assert made.returncode == 0, made.stderr  # anyone may create folders in the exchange
        rerun = setup_workshop(hub.env, hub.root, check=False)
        assert rerun.returncode != 0, "setup accepted a course folder made by a student"
        assert str(course) in rerun.stderr and f"owned by {STUDENT_WRONG}" in rerun.stderr, rerun.stderr
        assert course.owner() == STUDENT_WRONG, "setup must not hand the student's folder around"
    finally:
        shutil.rmtree(course, ignore_errors=True)
        if kept.exists():
            kept.rename(course)


def test_setup_rerun_never_writes_through_links_in_a_home(hub):
    """Running the setup again (to add a student, say) writes in the instructor's home. If the
    instructor replaced ~/.jupyter or ~/deepseek-mini with a link to a folder of root's, the
    setup must not write or chown anything there: it fails, naming what it could not write."""
    home = Path(pwd.getpwnam(INSTRUCTOR).pw_dir)
    for name in (".jupyter", "deepseek-mini"):
        target = hub.root / f"root-owned{name}"  # like /etc: root's, readable by all
        target.mkdir(mode=0o755)
        (target / "keep.txt").write_text("root's file\n")
        try:
            for cmd in (["mv", str(home / name), str(home / f"{name}.real")],
                        ["ln", "-s", str(target), str(home / name)]):
                done = as_user(INSTRUCTOR, *cmd)  # what the instructor can do in their own home
                assert done.returncode == 0, done.stderr
            rerun = setup_workshop(hub.env, hub.root, check=False)
            assert rerun.returncode != 0, f"setup wrote through ~/{name}, a link to a root-owned folder"
            assert f"as {INSTRUCTOR}" in rerun.stderr and "Permission denied" in rerun.stderr, rerun.stderr
            assert [p.name for p in target.iterdir()] == ["keep.txt"], f"setup wrote into {target}"
            for path in (target, target / "keep.txt"):
                assert os.stat(path).st_uid == 0, f"setup chowned {path} through ~/{name}"
        finally:
            if (home / name).is_symlink():
                (home / name).unlink()
            if (home / f"{name}.real").exists():
                (home / f"{name}.real").rename(home / name)
            shutil.rmtree(target)
    # with the home as it was, a re-run is fine and leaves the instructor's course in place
    setup_workshop(hub.env, hub.root)
    config = home / ".jupyter" / "nbgrader_config.py"
    assert config.owner() == INSTRUCTOR and "deepseek-mini/course/nbgrader_config.py" in config.read_text()
    assert (home / "deepseek-mini" / "solutions" / ASSIGNMENT).is_dir()
    assert (hub.root / "exchange" / COURSE_ID).owner() == INSTRUCTOR


def test_shared_password_mode_lets_the_instructor_in(request, tmp_path):
    """With one shared password for students, the instructors (hub admins) log in with their own
    admin password; nobody gets in with the other's password. Without an admin password the
    hub refuses to start, saying which setting is missing, rather than lock the instructors out."""
    root = tmp_path / "hub-root"
    (root / "hub").mkdir(parents=True)
    (root / "users.txt").write_text("teacher instructor\npupil student\n")
    student_password, admin_password = secrets.token_urlsafe(12), secrets.token_urlsafe(32)

    missing = subprocess.Popen([sys.executable, "-m", "jupyterhub", "-f", str(HUB_DIR / "jupyterhub_config.py")],
                               cwd=root / "hub", stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=hub_env(root, DEEPSEEK_MINI_HUB_PASSWORD=student_password))
    try:
        said, _ = missing.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        missing.terminate()  # the hub started: SIGTERM lets it stop its proxy too
        said, _ = missing.communicate(timeout=60)
        raise AssertionError("the hub started in shared-password mode without an admin password")
    assert missing.returncode != 0 and "DEEPSEEK_MINI_HUB_ADMIN_PASSWORD" in said, said

    env = hub_env(root, DEEPSEEK_MINI_HUB_PASSWORD=student_password,
                  DEEPSEEK_MINI_HUB_ADMIN_PASSWORD=admin_password)
    with running_hub(root, env, request) as url:
        assert hub_login(url, "teacher", admin_password)
        assert hub_login(url, "pupil", student_password)
        assert not hub_login(url, "teacher", student_password)
        assert not hub_login(url, "pupil", admin_password)
        assert not hub_login(url, "stranger", student_password)  # only the class list gets in
