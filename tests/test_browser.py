"""The course as a learner and an instructor meet it: real JupyterLab in headless Chromium.

JupyterLab is started by ./scripts/course itself, from a private copy of the course (so the
test never touches the checkout's gradebook), and driven with Playwright through Debian's
chromium (./scripts/system-deps installs it). A failing test leaves a screenshot in
test-artifacts/.
"""

import hashlib
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
import requests
from playwright.sync_api import expect

from course_answers import answer

REPO = Path(__file__).resolve().parent.parent
ARTIFACTS = REPO / "test-artifacts"
ASSIGNMENT = "00_setup"  # quick enough to "run all" (and autograde) on 2 cores
PLOT_ASSIGNMENT = "01_mnist_mlp"  # its first figure comes before any training
COURSE_SOURCE = REPO  # where course/, solutions/ and exercises/ are copied from
STUDENT = "learner1"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# nbgrader state an instructor makes; the copy starts without any of it
STATE = shutil.ignore_patterns("gradebook.db", "submitted", "autograded", "feedback", "exchange",
                               "release", "hub", "grades.csv", ".nbgrader.log",
                               ".ipynb_checkpoints", "__pycache__")

pytestmark = [pytest.mark.browser, pytest.mark.slow]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A copy of the repository's course (scripts, course/, solutions/, exercises/)."""
    root = tmp_path_factory.mktemp("course-copy")
    for assignment in (ASSIGNMENT, PLOT_ASSIGNMENT):
        if not (COURSE_SOURCE / "solutions" / assignment).is_dir():
            pytest.skip(f"solutions/{assignment} is not in this checkout")
    shutil.copytree(REPO / "scripts", root / "scripts")
    for folder in ("course", "solutions", "exercises"):
        shutil.copytree(COURSE_SOURCE / folder, root / folder, ignore=STATE)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, root / name)
    return root


@pytest.fixture(scope="module")
def notebook_name(course):
    names = sorted(p.name for p in (course / "exercises" / ASSIGNMENT).glob("*.ipynb"))
    assert names, f"exercises/{ASSIGNMENT} has no notebook"
    return names[0]


@pytest.fixture(scope="module")
def graded_submission(course, notebook_name):
    """One learner's answered notebook, collected and autograded with nbgrader's commands, as
    an instructor would; returns (score, max_score) from the gradebook."""
    from nbgrader.api import Gradebook

    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    nbgrader = [sys.executable, "-m", "nbgrader"]
    cwd = course / "course"
    subprocess.run([*nbgrader, "db", "student", "add", STUDENT, "--first-name=Ada",
                    "--last-name=Learner"], cwd=cwd, env=env, check=True, capture_output=True)
    subprocess.run([*nbgrader, "generate_assignment", ASSIGNMENT, "--force"], cwd=cwd, env=env,
                   check=True, capture_output=True)
    submitted = cwd / "submitted" / STUDENT / ASSIGNMENT
    submitted.mkdir(parents=True)
    source = nbformat.read(course / "solutions" / ASSIGNMENT / notebook_name, as_version=4)
    exercise = nbformat.read(course / "exercises" / ASSIGNMENT / notebook_name, as_version=4)
    answer(exercise, source)
    nbformat.write(exercise, submitted / notebook_name)
    graded = subprocess.run([*nbgrader, "autograde", ASSIGNMENT], cwd=cwd, env=env,
                            capture_output=True, text=True)
    assert graded.returncode == 0, graded.stdout + graded.stderr
    with Gradebook(f"sqlite:///{cwd / 'gradebook.db'}") as gb:
        submission = gb.find_submission(ASSIGNMENT, STUDENT)
        return submission.score, submission.max_score


def bootstrap_stamp(root):
    """What scripts/bootstrap.sh records in the venv after installing from `root`."""
    return hashlib.sha256((root / "pyproject.toml").read_bytes()
                          + (root / "scripts" / "bootstrap.sh").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def lab(course, graded_submission, request):
    """JupyterLab started by the course's own ./scripts/course, on a free port; yields the
    address it prints for people to open, and its token."""
    # The copy's bootstrap must find the shared venv up to date: were it to reinstall, it would
    # point the venv's editable install at the copy. Bring the venv up to date from the
    # checkout first (a no-op under ./scripts/test, which just did it).
    venv = Path(sys.prefix)
    subprocess.run(["bash", "-c", 'source "$0"', str(REPO / "scripts" / "bootstrap.sh")],
                   check=True, capture_output=True, env=dict(os.environ, DEEPSEEK_MINI_VENV=str(venv)))
    stamp = (venv / ".deepseek-mini-installed").read_text().strip()
    assert stamp == bootstrap_stamp(course), "the venv does not match this checkout's pyproject.toml"
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, DEEPSEEK_MINI_PORT=str(port), DEEPSEEK_MINI_TOKEN=token,
               DEEPSEEK_MINI_VENV=str(venv), JUPYTER_RUNTIME_DIR=str(course / "runtime"),
               # a fresh Lab: no tabs or settings left by other Lab sessions on this machine
               JUPYTERLAB_WORKSPACES_DIR=str(course / "lab-workspaces"),
               JUPYTERLAB_SETTINGS_DIR=str(course / "lab-settings"))
    news = course / "lab-settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get notified about Jupyter news?" pop-up
    env.pop("DISPLAY", None)
    log = open(course / "lab.log", "w")
    proc = subprocess.Popen([str(course / "scripts" / "course")], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True,
                            # Ctrl-C must work even if a background CI shell ignores SIGINT
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                answering = requests.get(f"{url}/api/status", params={"token": token}, timeout=2).ok
            except requests.ConnectionError:
                answering = False
            # the address is printed once the server answers (by a watcher, a moment later)
            printed = re.search(r"deepseek-mini course: (http://\S+)", (course / "lab.log").read_text())
            if answering and printed:
                break
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError("JupyterLab did not start, or ./scripts/course did not print the "
                                     "address to open:\n" + (course / "lab.log").read_text()[-3000:])
            time.sleep(0.5)
        yield printed.group(1), token
    finally:
        os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: Lab shuts its kernels down and exits
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
        if request.session.testsfailed:
            ARTIFACTS.mkdir(exist_ok=True)
            shutil.copy2(course / "lab.log", ARTIFACTS / "browser-lab.log")


@pytest.fixture(scope="module")
def browser(lab):  # closes before Lab stops, so Lab has no open connections to wait for
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        yield b
        b.close()


@pytest.fixture
def page(browser, request):
    """A fresh page; if the test fails, a screenshot goes to test-artifacts/<test>.png."""
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(60_000)
    failed_before = request.session.testsfailed
    yield pg
    if request.session.testsfailed > failed_before:
        ARTIFACTS.mkdir(exist_ok=True)
        pg.screenshot(path=str(ARTIFACTS / f"{request.node.name}.png"), full_page=True)
    context.close()


def base_url(lab):
    printed, _ = lab
    return printed.split("/lab/")[0]


def open_notebook(page, lab, path):
    """Open a notebook in Lab and wait until its kernel is running."""
    page.goto(f"{base_url(lab)}/lab/tree/{path}?reset&token={lab[1]}")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    # When Lab opens a notebook before it has the list of kernels (a busy machine), it asks
    # which kernel to start: the learner accepts the suggested one.
    select = page.locator(".jp-Dialog:has-text('Select Kernel') button:has-text('Select')")
    deadline = time.time() + 120
    while not kernel_running(lab, path):
        assert time.time() < deadline, f"no kernel started for {path}"
        if select.is_visible():
            select.click()
        page.wait_for_timeout(500)
    page.wait_for_selector(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator[data-status='idle']")


def kernel_running(lab, path):
    sessions = requests.get(f"{base_url(lab)}/api/sessions", params={"token": lab[1]}, timeout=10).json()
    return any(s["path"] == path and s.get("kernel") and s["kernel"]["execution_state"] == "idle"
               for s in sessions)


def run_all(page):
    page.click("li.lm-MenuBar-item:has-text('Run')")
    page.click("li.lm-Menu-item[data-command='runmenu:run-all']")
    # every code cell gets an execution count once the kernel has run it
    page.wait_for_function(
        """() => {
            const prompts = [...document.querySelectorAll('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell .jp-InputPrompt')];
            const busy = document.querySelector(".jp-Notebook-ExecutionIndicator[data-status='busy']");
            return prompts.length > 0 && !busy && prompts.every(p => /\\[\\d+\\]/.test(p.textContent));
        }""", timeout=300_000)


def test_start_page_opens(page, lab):
    printed, _ = lab
    page.goto(printed)  # the address ./scripts/course prints
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    page.locator("#jp-main-dock-panel .lm-TabBar-tab.lm-mod-current:has-text('START_HERE.ipynb')").wait_for()
    start = nbformat.read(COURSE_SOURCE / "course" / "START_HERE.ipynb", as_version=4)
    heading = next(line for line in start.cells[0].source.splitlines() if line.startswith("# "))
    expect(page.locator(".jp-NotebookPanel .jp-RenderedMarkdown h1").first).to_contain_text(heading[2:].strip())


def test_answered_exercise_runs_all_and_validates(page, lab, course, notebook_name):
    # The learner's work: the released exercise with their answers typed in.
    source = nbformat.read(course / "solutions" / ASSIGNMENT / notebook_name, as_version=4)
    exercise = nbformat.read(course / "exercises" / ASSIGNMENT / notebook_name, as_version=4)
    answer(exercise, source)
    work = course / "work" / ASSIGNMENT
    work.mkdir(parents=True, exist_ok=True)
    nbformat.write(exercise, work / notebook_name)

    open_notebook(page, lab, f"work/{ASSIGNMENT}/{notebook_name}")
    run_all(page)
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    tracebacks = [t for t in errors.all_inner_texts() if "Traceback" in t or "Error" in t]
    assert not tracebacks, tracebacks

    # nbgrader's Validate button in the notebook toolbar runs the visible and hidden tests.
    outcome, text = validate(page)
    assert outcome == "validation-success", text
    assert "Success! Your notebook passes all the tests." in text


def test_validate_reports_an_unanswered_exercise(page, lab, notebook_name):
    open_notebook(page, lab, f"exercises/{ASSIGNMENT}/{notebook_name}")
    outcome, text = validate(page)
    assert outcome == "validation-failed", text
    assert "NotImplementedError" in text


def test_a_plot_renders(page, lab, course):
    """Assignment 01's first figure (a grid of MNIST digits) shows up under its cell. The whole
    notebook trains for minutes on 2 cores, so only the cells up to that figure are run, the
    way a learner steps through with Shift+Enter."""
    path = next((course / "exercises" / PLOT_ASSIGNMENT).glob("*.ipynb"))
    cells = nbformat.read(path, as_version=4).cells
    imports = next(i for i, c in enumerate(cells) if c.metadata.get("nbgrader", {}).get("grade_id") == "imports")
    figure = next(i for i, c in enumerate(cells) if c.cell_type == "code" and "plt.show()" in c.source)
    open_notebook(page, lab, f"exercises/{PLOT_ASSIGNMENT}/{path.name}")
    notebook_cells = page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Cell")
    for index in (imports, figure):
        cell = notebook_cells.nth(index)
        cell.scroll_into_view_if_needed()
        cell.locator(".jp-InputPrompt").click()  # select the cell (command mode)
        page.keyboard.press("Control+Enter")  # run it
        expect(cell.locator(".jp-InputPrompt")).to_have_text(re.compile(r"\[\d+\]"), timeout=120_000)
    plot = notebook_cells.nth(figure).locator(".jp-OutputArea-output img").first
    plot.wait_for(state="visible")
    assert plot.evaluate("img => img.naturalWidth") > 200  # a real rendered figure, not an icon
    errors = notebook_cells.nth(figure).locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    assert not [t for t in errors.all_inner_texts() if "Traceback" in t], errors.all_inner_texts()


def validate(page):
    """Click nbgrader's Validate; returns the result's class and the dialog's text."""
    page.click(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Toolbar .validate-button")
    result = page.locator(".jp-Dialog .validation-success, .jp-Dialog .validation-failed").first
    result.wait_for(timeout=180_000)
    outcome = next(c for c in result.get_attribute("class").split() if c.startswith("validation-"))
    return outcome, page.locator(".jp-Dialog").inner_text()


def test_formgrader_shows_the_autograded_score(page, lab, graded_submission):
    score, max_score = graded_submission
    assert max_score > 0 and score == max_score  # the answers are the solutions
    # The instructor opens formgrader from Lab's Nbgrader menu...
    page.goto(lab[0])
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell")
    page.click("li.lm-MenuBar-item:has-text('Nbgrader')")
    page.click("li.lm-Menu-item:has-text('Formgrader')")
    page.locator("#jp-main-dock-panel .lm-TabBar-tab:has-text('Formgrader')").click()
    expect(page.frame_locator("iframe").locator("body")).to_contain_text(ASSIGNMENT, timeout=60_000)
    # ...and the assignment's submissions page shows the autograded score.
    page.goto(f"{base_url(lab)}/formgrader/manage_submissions/{ASSIGNMENT}")
    row = page.locator("tr", has_text=STUDENT)
    row.wait_for()
    shown = row.locator("td.score").inner_text()
    assert shown.replace(" ", "") == f"{score:g}/{max_score:g}", shown
