"""Self-check for learners: `python -m deepseek_mini.selfcheck NOTEBOOK [NOTEBOOK ...]`.

Runs the notebook from a fresh kernel, top to bottom, the way the grader will, and reports each
exercise: its visible tests passed, failed (with the test's message), or the answer is missing.
Hidden tests are never run here (in an exercise notebook they are not even there).

Exit code: 0 when every exercise passes and no other cell fails, 1 otherwise, 2 when a notebook
cannot be read. (`nbgrader validate` prints a similar report but always exits 0.)
"""

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HIDDEN_TESTS = re.compile(r"^[ \t]*### BEGIN HIDDEN TESTS.*?^[ \t]*### END HIDDEN TESTS[ \t]*\n?", re.S | re.M)


@dataclass
class Result:
    name: str  # the test cell's grade_id, or "cell N" for an ungraded cell
    points: float
    status: str  # "pass", "fail", "missing" (answer not written), "error" (ungraded cell failed)
    message: str = ""


def _nbgrader(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {})


def _error(cell):
    """(ename, evalue) of the first error output of an executed cell, or None."""
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return output.get("ename", "Error"), output.get("evalue", "")
    return None


def _not_written(error) -> bool:
    """The error an unanswered exercise raises (Triton's interpreter wraps it in its own error)."""
    return error is not None and (error[0] == "NotImplementedError" or "NotImplementedError" in error[1])


def strip_hidden_tests(nb):
    """Drop the `### BEGIN/END HIDDEN TESTS` regions, as nbgrader does for students."""
    for cell in nb.cells:
        if cell.cell_type == "code" and _nbgrader(cell).get("grade"):
            cell.source = HIDDEN_TESTS.sub("", cell.source)
    return nb


def execute(path: Path, timeout: int):
    """Run every cell in a fresh kernel from the notebook's folder; errors do not stop the run."""
    import nbformat
    from nbclient import NotebookClient

    nb = strip_hidden_tests(nbformat.read(path, as_version=4))
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = NotebookClient(nb, timeout=timeout, kernel_name=kernel, allow_errors=True,
                            interrupt_on_timeout=True, resources={"metadata": {"path": str(path.parent)}})
    client.execute()
    return nb


def results(nb) -> list[Result]:
    """One Result per graded test cell, plus one per failing ungraded cell."""
    out = []
    answer_missing = False  # did an answer cell since the previous test cell raise NotImplementedError?
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        meta, error = _nbgrader(cell), _error(cell)
        if meta.get("solution") and not meta.get("grade"):
            answer_missing |= _not_written(error)
            if error is not None and not _not_written(error):
                out.append(Result(f"answer cell {meta.get('grade_id', index)}", 0, "error", f"{error[0]}: {error[1]}"))
            continue
        if meta.get("grade"):
            name, points = meta.get("grade_id", f"cell {index}"), float(meta.get("points", 0))
            if error is None:
                out.append(Result(name, points, "pass"))
            elif _not_written(error) or answer_missing:
                out.append(Result(name, points, "missing", "replace `raise NotImplementedError()` with your answer"))
            else:
                out.append(Result(name, points, "fail", f"{error[0]}: {error[1]}".strip()))
            answer_missing = False
        elif error is not None and not _not_written(error):
            out.append(Result(f"cell {index}", 0, "error", f"{error[0]}: {error[1]}".strip()))
    return out


def report(path: Path, rows: list[Result], seconds: float) -> bool:
    graded = [r for r in rows if r.status != "error"]
    passed = [r for r in graded if r.status == "pass"]
    print(f"\n{path}  ({seconds:.0f} s)")
    labels = {"pass": "PASS   ", "fail": "FAIL   ", "missing": "MISSING", "error": "ERROR  "}
    for r in rows:
        points = f"{r.points:g} pt" if r.status != "error" else "     "
        line = f"  {labels[r.status]} {r.name:<34} {points:>6}"
        print(line + (f"  {r.message.splitlines()[0][:200]}" if r.message else ""))
    total = sum(r.points for r in graded)
    print(f"  {len(passed)}/{len(graded)} exercises pass their visible tests "
          f"({sum(r.points for r in passed):g}/{total:g} points; hidden tests may still find mistakes)")
    if not graded:
        print("  (this notebook has no graded exercises)")
    return len(passed) == len(graded) and not any(r.status == "error" for r in rows)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deepseek_mini.selfcheck", description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="+", type=Path, help="exercise notebooks (.ipynb) to check")
    parser.add_argument("--timeout", type=int, default=600, help="seconds one cell may run (default 600)")
    args = parser.parse_args(argv)
    for path in args.notebooks:
        if path.suffix != ".ipynb" or not path.is_file():
            print(f"selfcheck: {path} is not a notebook file (.ipynb)", file=sys.stderr)
            return 2
    all_ok = True
    for path in args.notebooks:
        print(f"running {path} from a fresh kernel, every cell in order...", flush=True)
        start = time.perf_counter()
        try:
            nb = execute(path.resolve(), args.timeout)
        except Exception as err:  # unreadable JSON, a missing kernel
            print(f"selfcheck: cannot run {path}: {type(err).__name__}: {err}", file=sys.stderr)
            return 2
        all_ok &= report(path, results(nb), time.perf_counter() - start)
    print("\nAll exercises pass." if all_ok else "\nSome exercises need work (see above).")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
