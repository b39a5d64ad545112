"""Run one exercise's tests against one answer, without running the whole notebook.

An assignment's source notebook (solutions/<a>/<a>.ipynb) follows the conventions in
course/AUTHORING.md:
  * code cells tagged "setup" (imports, given helpers) are all a test cell may rely on, besides
  * answer cells (nbgrader solution cells): they only define functions or classes, and
  * each answer cell is followed by its test cell (nbgrader grade cell), visible tests first,
    hidden tests between `### BEGIN HIDDEN TESTS` and `### END HIDDEN TESTS`.
So an exercise can be checked in a fresh namespace by running the setup cells, every answer cell
(with the one under test swapped for a planted answer), then the test cell: milliseconds instead
of a full notebook run. `python tests/grading_harness.py OUT.json < cases.json` runs a list of
such cases in one IPython shell (so imports are paid once) and writes one result per case.
"""

import json
import keyword
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

HIDDEN = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS[^\n]*\n(.*?)^[ \t]*### END HIDDEN TESTS", re.S | re.M)
SOLUTION = re.compile(r"^[ \t]*### BEGIN SOLUTION[^\n]*\n(.*?)^[ \t]*### END SOLUTION", re.S | re.M)


@dataclass
class Exercise:
    answer_id: str  # grade_id of the answer cell
    test_id: str  # grade_id of the test cell right after it
    points: float
    test: str  # the whole test cell: visible + hidden tests
    hidden: str  # the hidden tests alone


@dataclass
class SourceNotebook:
    setup: list = field(default_factory=list)  # sources of the cells tagged "setup", in order
    answers: dict = field(default_factory=dict)  # answer grade_id -> source, in notebook order
    exercises: list = field(default_factory=list)


def nbgrader_meta(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def read_source_notebook(path) -> SourceNotebook:
    nb = json.loads(Path(path).read_text())
    out, last_answer = SourceNotebook(), None
    for cell in nb["cells"]:
        if cell["cell_type"] != "code":
            continue
        source = "".join(cell["source"])
        meta = nbgrader_meta(cell)
        if "setup" in cell.get("metadata", {}).get("tags", []):
            out.setup.append(source)
        if meta.get("solution") and not meta.get("grade"):
            out.answers[meta["grade_id"]] = source
            last_answer = meta["grade_id"]
        elif meta.get("grade"):
            if last_answer is None:
                raise ValueError(f"{path}: test cell {meta.get('grade_id')} has no answer cell before it")
            hidden = "\n".join(HIDDEN.findall(source))
            out.exercises.append(Exercise(last_answer, meta["grade_id"], float(meta.get("points", 0)), source, hidden))
            last_answer = None
    return out


def solution_lines(path) -> list[str]:
    """Code lines found only in the solution and hidden-test regions of a source notebook."""
    nb = json.loads(Path(path).read_text())
    lines, public = [], set()
    for cell in nb["cells"]:
        source = "".join(cell["source"])
        for region in SOLUTION.findall(source) + HIDDEN.findall(source):
            lines += [line.strip() for line in region.splitlines()]
        public |= {line.strip() for line in HIDDEN.sub("", SOLUTION.sub("", source)).splitlines()}
    # a hidden test may repeat a visible line such as `out = f(x)`: that is no secret; nor is a
    # line of bare syntax (`else:`, `try:`, `)`) that any released file may also hold
    return [line for line in lines if line and not line.startswith("#") and line not in public
            and not all(keyword.iskeyword(word) for word in re.findall(r"[A-Za-z_]\w*", line))]


def case(nb: SourceNotebook, exercise: Exercise, answer: str | None = None, hidden_only: bool = False) -> list[str]:
    """The cells to run: setup, all answers (one replaced by `answer`), then the tests."""
    answers = dict(nb.answers)
    if answer is not None:
        answers[exercise.answer_id] = answer
    return nb.setup + list(answers.values()) + [exercise.hidden if hidden_only else exercise.test]


def run_cases(cases: list[list[str]], timeout: float = 120, cwd=None) -> list[dict]:
    """Run each case in a fresh namespace of one IPython shell in a subprocess.

    Returns, per case: {"passed": bool, "cell": index of the failing cell or None,
    "ename": exception class name, "evalue": its message}.
    """
    import os
    import tempfile

    with tempfile.NamedTemporaryFile("r", suffix=".json") as out:
        env = dict(os.environ, MPLBACKEND="Agg")
        proc = subprocess.run([sys.executable, __file__, out.name, str(timeout)], input=json.dumps(cases),
                              capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout * len(cases) + 120)
        if proc.returncode != 0:
            raise RuntimeError(f"grading harness crashed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def _main(out_path: str, timeout: float):
    import signal

    from IPython.core.interactiveshell import InteractiveShell

    def too_slow(signum, frame):
        raise TimeoutError(f"case ran longer than {timeout} s")

    signal.signal(signal.SIGALRM, too_slow)
    shell = InteractiveShell.instance()
    results = []
    for cells in json.loads(sys.stdin.read()):
        shell.reset(new_session=False)
        result = {"passed": True, "cell": None, "ename": None, "evalue": None}
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            for index, source in enumerate(cells):
                run = shell.run_cell(source, store_history=False, silent=True)
                error = run.error_before_exec or run.error_in_exec
                if error is not None:
                    result = {"passed": False, "cell": index, "ename": type(error).__name__, "evalue": str(error)}
                    break
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results.append(result)
    Path(out_path).write_text(json.dumps(results))


if __name__ == "__main__":
    _main(sys.argv[1], float(sys.argv[2]))
