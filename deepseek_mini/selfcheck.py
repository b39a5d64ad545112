"""Self-check for learners: `python -m deepseek_mini.selfcheck NOTEBOOK [NOTEBOOK ...]`.

Runs the notebook from a fresh kernel, top to bottom, the way the grader will, and reports each
exercise: its visible tests passed, failed (with the test's message), or the answer is missing.
Hidden tests are never run here (in an exercise notebook they are not even there).

Exit code: 0 when every exercise passes and no other cell fails, 1 otherwise, 2 when a notebook
cannot be read. (`nbgrader validate` prints a similar report but always exits 0.)

A cell that runs past `--timeout` is stopped the way the course's grader stops it (`StopStuckCells`,
which course/nbgrader_config.py gives to `nbgrader autograde` too): the kernel is interrupted, and
if the cell ignores that (it catches KeyboardInterrupt or BaseException, or ignores SIGINT) the
kernel is killed and restarted, the cells before it are run again, and the notebook goes on.
"""

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from queue import Empty

import nbformat
from nbclient import NotebookClient
from nbclient.util import ensure_async, run_sync

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
    """(ename, evalue) of an executed cell's error output (a timeout first), or None."""
    errors = [(o.get("ename", "Error"), o.get("evalue", ""))
              for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    timeouts = [e for e in errors if e[0] == TIMEOUT_ERROR]
    return (timeouts or errors or [None])[0]


def _not_written(error) -> bool:
    """The error an unanswered exercise raises (Triton's interpreter wraps it in its own error)."""
    return error is not None and (error[0] == "NotImplementedError" or "NotImplementedError" in error[1])


TIMEOUT_ERROR = "CellTimeoutError"  # the name nbgrader gives a cell stopped at its timeout


class _KernelIgnoredInterrupt(Exception):
    pass


class StopStuckCells:
    """Mix into an nbclient NotebookClient (nbgrader's Execute preprocessor is one) so that no cell
    can hang the run. At the timeout the kernel is interrupted. A cell that does not stop within
    `interrupt_grace_s` (it swallows KeyboardInterrupt or ignores SIGINT) gets its kernel killed
    and restarted, and the cells that had completed are run again, silently, so that the cells
    after it find their variables and are graded as usual. The stuck cell gets a CellTimeoutError
    output that says "timed out after N s"; every other cell keeps its own result."""

    interrupt_grace_s = 5.0  # a plain loop stops within milliseconds; a long torch op may need seconds

    def reset_execution_trackers(self):
        super().reset_execution_trackers()
        self._completed = []  # (index, source) of the cells that ran to their end in this run

    async def _async_handle_timeout(self, timeout, cell=None):
        self.log.error("Cell timed out after %s s: interrupting the kernel", timeout)
        await ensure_async(self.km.interrupt_kernel())
        deadline = time.monotonic() + self.interrupt_grace_s
        while True:  # one cell runs at a time, so the next execute_reply is this cell's
            try:
                msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=max(0.0, deadline - time.monotonic())))
            except Empty:
                raise _KernelIgnoredInterrupt() from None
            if msg.get("msg_type") == "execute_reply":
                self._timed_out = _timeout_error(timeout)
                return {"content": self._timed_out}

    async def async_execute_cell(self, cell, cell_index, execution_count=None, store_history=True):
        self._timed_out = None
        try:
            await super().async_execute_cell(cell, cell_index, execution_count, store_history)
        except _KernelIgnoredInterrupt:
            self.log.error("The cell ignored the interrupt: restarting the kernel, re-running %d cells", len(self._completed))
            await self._restart_and_replay()
            self._timed_out = _timeout_error(self._get_timeout(cell), " and ignored the interrupt, so the kernel was "
                                             "restarted and the cells before it were run again")
        if self._timed_out is None:
            if cell.cell_type == "code" and cell.source.strip():
                self._completed.append((cell_index, cell.source))
        elif not any(o.get("ename") == TIMEOUT_ERROR for o in cell.outputs):  # nbgrader adds one itself
            error = {k: self._timed_out[k] for k in ("ename", "evalue", "traceback")}
            cell.outputs.append(nbformat.v4.new_output("error", **error))
        return cell

    execute_cell = run_sync(async_execute_cell)  # nbconvert (so nbgrader) calls the sync name

    async def _restart_and_replay(self):
        await ensure_async(self.km.restart_kernel(now=True))  # SIGKILL, then the same command in the same folder
        await ensure_async(self.kc.stop_channels())
        await self.async_start_new_kernel_client()
        for index, source in self._completed:
            msg_id = self.kc.execute(source, silent=True, store_history=False)
            deadline = time.monotonic() + (self._get_timeout(None) or 600)
            while True:
                try:
                    msg = await ensure_async(self.kc.shell_channel.get_msg(timeout=max(0.0, deadline - time.monotonic())))
                except Empty:
                    raise RuntimeError(f"cell {index} did not finish when run again after the kernel restart") from None
                if msg["parent_header"].get("msg_id") == msg_id:
                    break


def _timeout_error(timeout, why="") -> dict:
    message = f"timed out after {timeout} s{why}"
    return {"status": "error", "ename": TIMEOUT_ERROR, "evalue": message, "traceback": [f"{TIMEOUT_ERROR}: {message}"]}


def strip_hidden_tests(nb):
    """Drop the `### BEGIN/END HIDDEN TESTS` regions, as nbgrader does for students."""
    for cell in nb.cells:
        if cell.cell_type == "code" and _nbgrader(cell).get("grade"):
            cell.source = HIDDEN_TESTS.sub("", cell.source)
    return nb


class SelfCheckClient(StopStuckCells, NotebookClient):
    pass


def execute(path: Path, timeout: int):
    """Run every cell in a fresh kernel from the notebook's folder; errors do not stop the run."""
    nb = strip_hidden_tests(nbformat.read(path, as_version=4))
    kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
    client = SelfCheckClient(nb, timeout=timeout, kernel_name=kernel, allow_errors=True,
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
