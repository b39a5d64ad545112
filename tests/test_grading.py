"""The grading pipeline, end to end, with the real nbgrader CLI and gradebook.

A temporary course (a copy of course/nbgrader_config.py beside a copy of solutions/) goes
through generate -> submit -> autograde -> feedback, with students who answer everything, nothing,
one thing wrong, loop forever, or tamper with the tests. nbgrader costs 3-12 s of start-up per
command, so the module makes few calls: one generate for every assignment, one autograde per
assignment for all its students, one feedback. Planted wrong answers are checked without nbgrader,
exercise by exercise (tests/grading_harness.py), so they stay cheap as assignments are added.
"""

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from deepseek_mini import selfcheck

sys.path.insert(0, str(Path(__file__).resolve().parent))
import grading_harness as harness  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SOLUTIONS = ROOT / "solutions"
EXERCISES = ROOT / "exercises"
ASSIGNMENTS = sorted(p.name for p in SOLUTIONS.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))
LOOP_TIMEOUT = 40  # per-cell limit (s) while grading 00_setup, whose cells each take a few seconds
# Answers that loop forever and survive the kernel interrupt sent at the cell timeout.
STUCK_ANSWERS = {
    "swallower": "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n",
    "deaf": "import signal\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nwhile True:\n    pass\n",
}

pytestmark = pytest.mark.notebooks


def notebooks(assignment):
    return sorted((SOLUTIONS / assignment).glob("*.ipynb"))


def nbgrader(*args, cwd, env_extra=None, timeout=900):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    env.update(env_extra or {})
    out = subprocess.run(["nbgrader", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-5000:]}"
    return out.stdout + out.stderr


# --------------------------------------------------------------------------- the course as shipped


def test_course_layout():
    assert ASSIGNMENTS[:2] == ["00_setup", "01_mnist_mlp"], ASSIGNMENTS
    start = json.loads((ROOT / "course" / "START_HERE.ipynb").read_text())
    links = set(re.findall(r"\]\((\.\./exercises/[^)]+\.ipynb)\)", "".join("".join(c["source"]) for c in start["cells"])))
    missing = [p for p in links if not (ROOT / "course" / p).resolve().is_file()]
    assert not missing, f"course/START_HERE.ipynb links to notebooks that do not exist: {missing}"
    unlinked = [a for a in ASSIGNMENTS if f"../exercises/{a}/{a}.ipynb" not in links]
    assert not unlinked, f"course/START_HERE.ipynb has no link to {unlinked}"
    runtimes = (ROOT / "course" / "RUNTIMES.md").read_text()
    unmeasured = [a for a in ASSIGNMENTS if f"| {a} |" not in runtimes]
    assert not unmeasured, f"course/RUNTIMES.md has no row for {unmeasured}: run ./scripts/notebook-runtimes {' '.join(unmeasured)}"
    for assignment in ASSIGNMENTS:
        assert (SOLUTIONS / assignment / "planted_wrong_answers.py").is_file(), f"{assignment} has no planted wrong answers"
        for path in notebooks(assignment):
            assert path.name == f"{assignment}.ipynb", f"{path}: name the notebook after its folder"


@pytest.mark.parametrize("folder", ["solutions", "exercises"])
def test_notebooks_are_stored_without_outputs(folder):
    for path in sorted((ROOT / folder).glob("*/*.ipynb")):
        nb = json.loads(path.read_text())
        for i, cell in enumerate(nb["cells"]):
            if cell["cell_type"] == "code":
                assert cell["outputs"] == [] and cell["execution_count"] is None, (
                    f"{path} cell {i} has stored outputs: clear them (Edit > Clear Outputs of All Cells) and save")


def test_course_config_points_at_the_repository(tmp_path):
    """The config as shipped: course root = course/, source ../solutions, release ../exercises."""
    from traitlets.config import Config, PyFileConfigLoader

    env_before = os.environ.get("DEEPSEEK_MINI_EXCHANGE")
    os.environ["DEEPSEEK_MINI_EXCHANGE"] = str(tmp_path / "exchange")
    try:
        config = PyFileConfigLoader("nbgrader_config.py", path=str(ROOT / "course")).load_config()
    finally:
        if env_before is None:
            os.environ.pop("DEEPSEEK_MINI_EXCHANGE")
        else:
            os.environ["DEEPSEEK_MINI_EXCHANGE"] = env_before
    assert isinstance(config, Config)
    root = Path(config.CourseDirectory.root)
    assert root == ROOT / "course"
    assert (root / config.CourseDirectory.source_directory).resolve() == SOLUTIONS
    assert (root / config.CourseDirectory.release_directory).resolve() == EXERCISES
    assert config.Exchange.root == str(tmp_path / "exchange") and (tmp_path / "exchange").is_dir()
    assert config.Execute.timeout >= 300, "CPU training cells need minutes, not nbgrader's default 30 s"
    assert config.CourseDirectory.course_id
    ignored = subprocess.run(["git", "check-ignore", "course/gradebook.db", "course/submitted/x", "course/autograded/x",
                              "course/feedback/x", "course/exchange/x", "course/grades.csv"],
                             cwd=ROOT, capture_output=True, text=True).stdout.split()
    assert len(ignored) == 6, f"git must ignore the gradebook and submission folders, ignores only {ignored}"


# --------------------------------------------------------------------------- planted wrong answers


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_hidden_tests_catch_planted_wrong_answers(assignment):
    """Each graded exercise, alone: the solution passes its visible and its hidden tests, and each
    planted typical mistake fails the hidden tests with an assertion message (not a crash)."""
    wrong = runpy.run_path(str(SOLUTIONS / assignment / "planted_wrong_answers.py"))["WRONG_ANSWERS"]
    cases, labels = [], []
    for path in notebooks(assignment):
        nb = harness.read_source_notebook(path)
        assert nb.exercises, f"{path} has no graded exercise"
        unknown = set(wrong) - {ex.answer_id for ex in nb.exercises}
        assert not unknown, f"planted answers for unknown answer cells {unknown}"
        for ex in nb.exercises:
            assert ex.hidden.strip(), f"{path}: {ex.test_id} has no hidden tests"
            plants = wrong.get(ex.answer_id, {})
            assert len(plants) >= 2, f"{path}: exercise {ex.answer_id} needs at least two planted wrong answers"
            for hidden_only in (False, True):
                cases.append(harness.case(nb, ex, hidden_only=hidden_only))
                labels.append((ex, "the solution", hidden_only))
                for why, code in plants.items():
                    cases.append(harness.case(nb, ex, code, hidden_only=hidden_only))
                    labels.append((ex, why, hidden_only))
    for (ex, why, hidden_only), result, cells in zip(labels, harness.run_cases(cases, cwd=SOLUTIONS / assignment), cases):
        where = f"{assignment}/{ex.test_id} ({'hidden tests' if hidden_only else 'whole test cell'}) with {why!r}"
        if why == "the solution":
            assert result["passed"], f"{where} fails: {result['ename']}: {result['evalue']}"
        else:
            assert not result["passed"], f"{where} passes: the tests do not catch this mistake"
            assert result["cell"] == len(cells) - 1, f"{where} broke before the tests ran: {result['ename']}: {result['evalue']}"
            assert result["ename"] == "AssertionError" and result["evalue"], (
                f"{where} fails with {result['ename']}: {result['evalue']!r}; give the learner an assertion message")


# --------------------------------------------------------------------------- nbgrader, for real


def _answers(path) -> dict:
    return harness.read_source_notebook(path).answers


def _submit(course, student, assignment, edit=None):
    """Copy the released notebooks into submitted/<student>/, after `edit(notebook_json, name)`."""
    target = course / "submitted" / student / assignment
    target.mkdir(parents=True)
    for path in sorted((course.parent / "exercises" / assignment).glob("*.ipynb")):
        nb = json.loads(path.read_text())
        if edit is not None:
            edit(nb, path.stem)
        (target / path.name).write_text(json.dumps(nb))
    (target / "timestamp.txt").write_text("2026-11-23 12:00:00.000000 UTC")


def _answer_with(answers_by_notebook, replace=None):
    """An edit that writes the solutions into the answer cells, some of them replaced."""
    def edit(nb, name):
        for cell in nb["cells"]:
            grade_id = harness.nbgrader_meta(cell).get("grade_id")
            if grade_id in answers_by_notebook[name]:
                cell["source"] = (replace or {}).get(grade_id, answers_by_notebook[name][grade_id])
    return edit


def _tamper(nb, name):
    """Edit one locked test cell so it passes anything, and delete another test cell."""
    tests = [cell for cell in nb["cells"] if harness.nbgrader_meta(cell).get("grade")]
    tests[0]["source"] = "pass  # tests? what tests?"
    nb["cells"].remove(tests[1])


@pytest.fixture(scope="module")
def course(tmp_path_factory):
    """A temporary course beside copies of solutions/ and the config; every assignment generated."""
    base = tmp_path_factory.mktemp("nbgrader")
    shutil.copytree(SOLUTIONS, base / "solutions")
    (base / "course").mkdir()
    shutil.copy(ROOT / "course" / "nbgrader_config.py", base / "course")
    env = {"DEEPSEEK_MINI_EXCHANGE": str(base / "exchange")}
    nbgrader("generate_assignment", "*", "--force", cwd=base / "course", env_extra=env)
    return base / "course"


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_exercises_are_up_to_date(course, assignment):
    generated, stored = course.parent / "exercises" / assignment, EXERCISES / assignment
    made = sorted(p.relative_to(generated) for p in generated.rglob("*") if p.is_file())
    ours = sorted(p.relative_to(stored) for p in stored.rglob("*") if p.is_file() and "__pycache__" not in p.parts)
    assert made == ours, f"exercises/{assignment} holds {ours}, nbgrader makes {made}: run ./scripts/generate-exercises"
    for rel in made:
        assert (generated / rel).read_bytes() == (stored / rel).read_bytes(), (
            f"exercises/{assignment}/{rel} is out of date with solutions/: run ./scripts/generate-exercises")


def test_every_exercise_comes_from_a_solution():
    stale = sorted(p.name for p in EXERCISES.iterdir() if p.is_dir() and not (SOLUTIONS / p.name).is_dir())
    assert not stale, f"exercises/{stale} have no source in solutions/: delete them"


def _released_lines(folder: Path) -> set:
    """Every line of every file in a released folder (notebooks cell by cell)."""
    lines = set()
    for path in folder.rglob("*"):
        if path.suffix == ".ipynb":
            for cell in json.loads(path.read_text())["cells"]:
                lines |= {line.strip() for line in "".join(cell["source"]).splitlines()}
        elif path.is_file():
            lines |= {line.strip() for line in path.read_text(errors="replace").splitlines()}
    return lines


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_no_solution_or_hidden_test_in_exercises(assignment):
    released = EXERCISES / assignment
    assert not list(released.glob("planted_wrong_answers*")), "planted answers were released"
    text = "\n".join(p.read_text(errors="replace") for p in released.rglob("*") if p.is_file())
    assert "BEGIN HIDDEN TESTS" not in text and "BEGIN SOLUTION" not in text
    lines = _released_lines(released)
    for path in notebooks(assignment):
        secret = harness.solution_lines(path)
        assert len(secret) > 10
        leaked = [line for line in secret if line in lines]
        assert not leaked, f"solution or hidden-test lines of {path.name} appear in exercises/: {leaked[:5]}"


def _scores(course, assignment):
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{course / 'gradebook.db'}") as gb:
        out, flagged = {}, {}
        for sub in gb.assignment_submissions(assignment):
            grades = [grade for nb in sub.notebooks for grade in nb.grades]
            out[sub.student.id] = {grade.name: grade.score for grade in grades}
            flagged[sub.student.id] = {grade.name for grade in grades if grade.needs_manual_grade}
        max_scores = {grade.name: grade.max_score for nb in gb.find_assignment(assignment).notebooks
                      for grade in nb.grade_cells}
    return out, max_scores, flagged


def _errors(course, student, assignment):
    """(test-free) error names in the autograded notebooks of one student, by cell index."""
    errors = {}
    for path in (course / "autograded" / student / assignment).glob("*.ipynb"):
        for i, cell in enumerate(json.loads(path.read_text())["cells"]):
            for output in cell.get("outputs", []):
                if output["output_type"] == "error":
                    errors[(path.stem, i)] = output["ename"]
    return errors


def _error_text(course, student, assignment):
    """Every error line of one student's autograded notebooks, as one string."""
    return "\n".join(f"{o['ename']}: {o['evalue']}" for path in (course / "autograded" / student / assignment).glob("*.ipynb")
                     for cell in json.loads(path.read_text())["cells"] for o in cell.get("outputs", [])
                     if o["output_type"] == "error")


_graded = {}


def autograde(course, assignment):
    """Submit and autograde one assignment (once per module): "ada" answers with the solutions,
    "blank" hands in the untouched exercise; 00_setup also gets the tricky students."""
    if assignment in _graded:
        return _graded[assignment]
    answers = {p.stem: _answers(p) for p in notebooks(assignment)}
    _submit(course, "ada", assignment, _answer_with(answers))
    _submit(course, "blank", assignment)
    env = {"DEEPSEEK_MINI_EXCHANGE": str(course.parent / "exchange")}
    if assignment == "00_setup":
        wrong = runpy.run_path(str(SOLUTIONS / assignment / "planted_wrong_answers.py"))["WRONG_ANSWERS"]
        _submit(course, "ada_twin", assignment, _answer_with(answers))            # the same submission again
        _submit(course, "sloppy", assignment, _answer_with(answers, {"standardize": next(iter(wrong["standardize"].values()))}))
        _submit(course, "looper", assignment, _answer_with(answers, {"standardize": "while True:\n    pass\n"}))
        for student, stuck in STUCK_ANSWERS.items():  # loops that survive the interrupt
            _submit(course, student, assignment, _answer_with(answers, {"standardize": stuck}))
        _submit(course, "cheater", assignment, _tamper)
        env["DEEPSEEK_MINI_CELL_TIMEOUT"] = str(LOOP_TIMEOUT)
    log = nbgrader("autograde", assignment, cwd=course, env_extra=env, timeout=1800)
    _graded[assignment] = (*_scores(course, assignment), log)
    return _graded[assignment]


@pytest.mark.slow
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_solution_gets_full_marks_and_blank_gets_zero(course, assignment):
    """Each solution runs without an error (its own checks, e.g. an accuracy target, included)
    and gets every point; the untouched exercise gets none, quickly even though later cells
    depend on the missing answers (an answer left out fails at once)."""
    scores, max_scores, flagged, _ = autograde(course, assignment)
    assert sum(max_scores.values()) > 0
    assert scores["ada"] == max_scores, f"the solution lost points: {scores['ada']} of {max_scores}"
    assert not _errors(course, "ada", assignment), (  # the messages, so a failure in CI can be read from its log
        f"the solution raised errors when graded: {_errors(course, 'ada', assignment)}\n{_error_text(course, 'ada', assignment)[:4000]}")
    assert all(v == 0 for v in scores["blank"].values()), f"an untouched exercise must score 0: {scores['blank']}"
    assert not flagged["ada"] and not flagged["blank"]


@pytest.mark.slow
def test_tricky_submissions(course):
    scores, max_scores, flagged, log = autograde(course, "00_setup")
    total = {student: sum(v or 0 for v in s.values()) for student, s in scores.items()}
    assert not any(flagged[s] for s in ("ada", "ada_twin", "blank", "sloppy", "looper", *STUCK_ANSWERS)), flagged
    assert scores["ada_twin"] == scores["ada"] == max_scores, "the same submission graded twice got different scores"
    assert scores["sloppy"] == {**max_scores, "test_standardize": 0}, "a planted mistake must cost its points"
    # An infinite loop is stopped after the cell timeout, even one that catches BaseException or
    # ignores SIGINT (its kernel is killed, restarted, and the cells before it are run again):
    # only that exercise loses its points, and the later exercise still gets its points.
    for student in ("looper", *STUCK_ANSWERS):
        assert scores[student] == {**max_scores, "test_standardize": 0}, (student, scores[student])
        assert "CellTimeoutError" in _errors(course, student, "00_setup").values(), student
        assert f"timed out after {LOOP_TIMEOUT} s" in _error_text(course, student, "00_setup"), student
    # The edited test cell is restored from the gradebook (its checksum differs), so it runs the
    # real tests and scores 0; the deleted one earns no automatic points and is flagged for the
    # instructor in formgrader.
    assert scores["cheater"]["test_standardize"] == 0, f"an edited test cell was not caught: {scores['cheater']}"
    assert not scores["cheater"]["test_scaled_add_kernel"] and flagged["cheater"] == {"test_scaled_add_kernel"}, (
        f"a deleted test cell was not caught: {scores['cheater']}, flagged {flagged['cheater']}")
    assert total["cheater"] == 0


@pytest.mark.slow
def test_feedback_html_for_a_graded_submission(course):
    scores, _, _, _ = autograde(course, "00_setup")
    nbgrader("generate_feedback", "00_setup", "--student", "sloppy", cwd=course,
             env_extra={"DEEPSEEK_MINI_EXCHANGE": str(course.parent / "exchange")})
    html = (course / "feedback" / "sloppy" / "00_setup" / "00_setup.html").read_text()
    assert f"{sum(scores['sloppy'].values()):g}" in html and "test_standardize" in html
    assert "each column needs variance 1" in html, "feedback must show the failing hidden test's message"


# --------------------------------------------------------------------------- the learner's self-check


def test_selfcheck_reports_each_exercise_and_exits_nonzero(tmp_path, capsys):
    path = tmp_path / "00_setup.ipynb"
    nb = json.loads((EXERCISES / "00_setup" / "00_setup.ipynb").read_text())
    answers = _answers(SOLUTIONS / "00_setup" / "00_setup.ipynb")
    _answer_with({"00_setup": {"scaled_add_kernel": answers["scaled_add_kernel"]}})(nb, "00_setup")
    path.write_text(json.dumps(nb))
    code = selfcheck.main([str(path), "--timeout", "120"])
    out = capsys.readouterr().out
    assert code == 1
    assert "MISSING test_standardize" in out and "PASS    test_scaled_add_kernel" in out, out
    assert "1/2 exercises pass" in out


def test_selfcheck_passes_the_solution_and_never_runs_hidden_tests(tmp_path):
    nb = json.loads((SOLUTIONS / "00_setup" / "00_setup.ipynb").read_text())
    for cell in nb["cells"]:  # a hidden test that always fails: the self-check must not run it
        if harness.nbgrader_meta(cell).get("grade"):
            cell["source"] = "".join(cell["source"]).replace("### END HIDDEN TESTS", "assert False, 'hidden ran'\n### END HIDDEN TESTS")
    path = tmp_path / "solution.ipynb"
    path.write_text(json.dumps(nb))
    out = subprocess.run([sys.executable, "-m", "deepseek_mini.selfcheck", str(path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2/2 exercises pass" in out.stdout


def test_selfcheck_stops_cells_that_ignore_the_interrupt(tmp_path):
    """--timeout stops a plain loop, one that catches BaseException and one that ignores SIGINT,
    says "timed out after N s", and keeps the earlier cells' variables for the later ones."""
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    def cell(source, grade_id, graded):
        meta = {"grade": graded, "solution": not graded, "locked": graded, "grade_id": grade_id, "schema_version": 3}
        return new_code_cell(source, metadata={"nbgrader": {**meta, "points": 1} if graded else meta})

    loops = {"plain": "while True:\n    pass\n", **STUCK_ANSWERS}
    cells = [new_code_cell("x = 41")]
    for name, loop in loops.items():
        cells += [cell(loop, name, False), cell("assert x + 1 == 42, 'x is lost'", f"test_after_{name}", True)]
    path = tmp_path / "stuck.ipynb"
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "display_name": "Python 3"}}), path)
    out = subprocess.run([sys.executable, "-m", "deepseek_mini.selfcheck", str(path), "--timeout", "3"],
                         capture_output=True, text=True, timeout=240)
    assert out.returncode == 1, out.stdout + out.stderr
    for name in loops:
        assert re.search(rf"ERROR +answer cell {name} +CellTimeoutError: timed out after 3 s", out.stdout), out.stdout
        assert re.search(rf"PASS +test_after_{name} ", out.stdout), out.stdout
    assert "3/3 exercises pass" in out.stdout, out.stdout


def test_selfcheck_rejects_a_missing_notebook(tmp_path, capsys):
    assert selfcheck.main([str(tmp_path / "nope.ipynb")]) == 2
    assert "nope.ipynb" in capsys.readouterr().err


def test_formgrader_lists_the_assignments(course):
    """Formgrader shows what NbGraderAPI.get_assignments returns, read from the shipped config."""
    from nbgrader.apps.api import NbGraderAPI
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import PyFileConfigLoader

    config = PyFileConfigLoader("nbgrader_config.py", path=str(course)).load_config()
    api = NbGraderAPI(CourseDirectory(config=config), config=config)
    listed = {a["name"]: a for a in api.get_assignments()}
    assert set(ASSIGNMENTS) <= set(listed), f"formgrader lists {sorted(listed)}"
    assert all(listed[a]["releaseable"] for a in ASSIGNMENTS)
