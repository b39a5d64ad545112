# nbgrader configuration for the deepseek-mini course. Works without edits.
#
# nbgrader reads this file when run from course/ (./scripts/course starts JupyterLab there, so
# formgrader and validate find it too). The course root is this folder: the gradebook and the
# instructor's submitted/ autograded/ feedback/ folders live here (all ignored by git), while
# the notebooks live one level up:
#   ../solutions/<assignment>/   source notebooks (solutions + visible and hidden tests)
#   ../exercises/<assignment>/   what `nbgrader generate_assignment` makes from them
# See INSTRUCTORS.md for the commands and AUTHORING.md for how to write an assignment.
import os

c = get_config()  # noqa: F821 (injected by traitlets when it loads this file)

course_root = os.path.dirname(os.path.abspath(__file__))

c.CourseDirectory.course_id = "deepseek-mini"
c.CourseDirectory.root = course_root
c.CourseDirectory.source_directory = "../solutions"
c.CourseDirectory.release_directory = "../exercises"
c.CourseDirectory.db_url = "sqlite:///" + os.path.join(course_root, "gradebook.db")
# Files in a solutions folder that must never reach students: the planted wrong answers the
# test suite checks the hidden tests against (see AUTHORING.md).
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__", "feedback", "planted_wrong_answers.py"]

# Every assignment trains something on a CPU: the slowest cell (MNIST training, a tiny
# pretraining run) takes up to a few minutes on 2 cores. A cell that runs longer is stopped,
# the kernel interrupted, and grading goes on with the next cell. A cell that ignores the
# interrupt (it catches BaseException or ignores SIGINT) would otherwise hang autograde: its
# kernel is killed and restarted and the cells before it are run again (deepseek_mini.selfcheck).
c.Execute.timeout = int(os.environ.get("DEEPSEEK_MINI_CELL_TIMEOUT", "600"))
c.Execute.interrupt_on_timeout = True


def _autograde_preprocessors():
    from nbgrader.converters import Autograde
    from nbgrader.preprocessors import Execute

    from deepseek_mini.selfcheck import StopStuckCells

    class ExecuteStoppingStuckCells(StopStuckCells, Execute):
        pass

    default = Autograde.class_traits()["autograde_preprocessors"].default()
    return [ExecuteStoppingStuckCells if p is Execute else p for p in default]


c.Autograde.autograde_preprocessors = _autograde_preprocessors()

# Where release/fetch/submit/collect exchange files. One machine: a folder here (gitignored).
# A shared JupyterHub: point DEEPSEEK_MINI_EXCHANGE at a folder every user can write with the
# sticky bit (mode 1777), its deepseek-mini/ folder made by the instructor (hub/setup_workshop.py).
exchange = os.environ.get("DEEPSEEK_MINI_EXCHANGE", os.path.join(course_root, "exchange"))
os.makedirs(exchange, exist_ok=True)
c.Exchange.root = exchange

# Feedback and the exported grades stay inside the course folder.
c.CsvExportPlugin.filename = os.path.join(course_root, "grades.csv")
