# JupyterHub for a deepseek-mini workshop on ONE machine: one system user per student, the
# nbgrader exchange shared by all, the course data and tiny model pre-built once into a shared
# folder. Prepare the machine with setup_workshop.py (as root), then run, as root:
#
#     jupyterhub -f /path/to/course/hub/jupyterhub_config.py
#
# Everything below is read from environment variables so the file works unedited:
#   DEEPSEEK_MINI_HUB_ROOT      folder setup_workshop.py prepared (default /srv/deepseek-mini)
#   DEEPSEEK_MINI_HUB_IP/PORT   where the hub listens (default 127.0.0.1:8000; put a TLS proxy
#                               in front, or set IP=0.0.0.0 with c.JupyterHub.ssl_cert/ssl_key)
#   DEEPSEEK_MINI_HUB_CPU/MEM   per-user limits (default 2 cores, 4G), enforced by SystemdSpawner
#   DEEPSEEK_MINI_HUB_PASSWORD  if set: one shared password for students instead of system (PAM)
#                               passwords; then DEEPSEEK_MINI_HUB_ADMIN_PASSWORD (32+ characters)
#                               is the instructors' (hub admins') password
#   DEEPSEEK_MINI_HUB_API_TOKEN if set: an admin service token for scripts (tests, pre-starting
#                               servers before class)
# See README.md in this folder for the walk-through.
import os
import shutil
import stat
from pathlib import Path

c = get_config()  # noqa: F821 (injected by traitlets when it loads this file)

root = Path(os.environ.get("DEEPSEEK_MINI_HUB_ROOT", "/srv/deepseek-mini"))
env = root / "venv"  # a Python environment every user can run (see setup_workshop.py)
state = root / "hub"  # the hub's own database and cookie secret, readable by root only

# --- who may log in: <root>/users.txt, one "name role" per line (role: instructor|student) ---
instructors, students = set(), set()
for line in (root / "users.txt").read_text().splitlines():
    if line.strip() and not line.lstrip().startswith("#"):
        name, role = line.split()
        {"instructor": instructors, "student": students}[role].add(name)
c.Authenticator.allowed_users = instructors | students
c.Authenticator.admin_users = instructors  # start/stop anyone's server from the admin page
c.JupyterHub.admin_access = False  # but never open a student's files through the hub

if os.environ.get("DEEPSEEK_MINI_HUB_PASSWORD"):
    # Convenient for a one-day workshop with throwaway accounts. Beware: with one shared
    # password anyone can log in as any non-admin user, i.e. as another student.
    # Admins (the instructors) never log in with the students' password: SharedPasswordAuthenticator
    # takes them only with its admin password, and without one they are locked out.
    student_password = os.environ["DEEPSEEK_MINI_HUB_PASSWORD"]
    admin_password = os.environ.get("DEEPSEEK_MINI_HUB_ADMIN_PASSWORD", "")
    if len(student_password) < 8:
        raise SystemExit("DEEPSEEK_MINI_HUB_PASSWORD must be at least 8 characters")
    if len(admin_password) < 32 or admin_password == student_password:
        raise SystemExit("DEEPSEEK_MINI_HUB_PASSWORD is set, so instructors need their own password: set "
                         "DEEPSEEK_MINI_HUB_ADMIN_PASSWORD to at least 32 characters, different from "
                         "the students' (e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')")
    c.JupyterHub.authenticator_class = "shared-password"
    c.SharedPasswordAuthenticator.user_password = student_password
    c.SharedPasswordAuthenticator.admin_password = admin_password
else:
    # Each student logs in with their own system account's password (set with chpasswd).
    c.JupyterHub.authenticator_class = "pam"

# --- where it listens, and its own state ---
c.JupyterHub.ip = os.environ.get("DEEPSEEK_MINI_HUB_IP", "127.0.0.1")
c.JupyterHub.port = int(os.environ.get("DEEPSEEK_MINI_HUB_PORT", "8000"))
c.JupyterHub.hub_ip = "127.0.0.1"  # the hub's internal API and the proxy's stay on loopback
c.JupyterHub.hub_port = int(os.environ.get("DEEPSEEK_MINI_HUB_API_PORT", "8081"))
proxy_api_port = os.environ.get("DEEPSEEK_MINI_HUB_PROXY_API_PORT", str(c.JupyterHub.port + 1))
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{proxy_api_port}"
c.JupyterHub.db_url = f"sqlite:///{state / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(state / "jupyterhub_cookie_secret")
c.ConfigurableHTTPProxy.pid_file = str(state / "jupyterhub-proxy.pid")

if os.environ.get("DEEPSEEK_MINI_HUB_API_TOKEN"):
    c.JupyterHub.services = [{
        "name": "workshop-admin",
        "api_token": os.environ["DEEPSEEK_MINI_HUB_API_TOKEN"],
    }]
    c.JupyterHub.load_roles = [{
        "name": "workshop-admin",
        "scopes": ["admin:users", "admin:servers", "tokens", "list:users", "read:users"],
        "services": ["workshop-admin"],
    }]

# --- one server per user, as that system user ---
cpu = float(os.environ.get("DEEPSEEK_MINI_HUB_CPU", "2"))
mem = os.environ.get("DEEPSEEK_MINI_HUB_MEM", "4G")
systemd_running = Path("/run/systemd/system").is_dir()
try:
    import systemdspawner  # noqa: F401  (pip install jupyterhub-systemdspawner)
except ImportError:
    systemdspawner = None
if systemdspawner is not None and systemd_running:
    # Real per-user limits through cgroups; the user runs in their own home as themselves.
    c.JupyterHub.spawner_class = "systemdspawner.SystemdSpawner"
    c.SystemdSpawner.unit_name_template = "jupyter-{USERNAME}-singleuser"
    c.SystemdSpawner.isolate_tmp = True
    c.SystemdSpawner.disable_user_sudo = True
else:
    # LocalProcessSpawner cannot enforce mem_limit/cpu_limit: it only passes them to the
    # server as MEM_LIMIT/CPU_LIMIT. The thread cap below still keeps one student's training
    # loop from taking every core.
    c.JupyterHub.spawner_class = "localprocess"
c.Spawner.cpu_limit = cpu
c.Spawner.mem_limit = mem

c.Spawner.cmd = [str(env / "bin" / "python"), "-m", "jupyterhub.singleuser"]
c.Spawner.default_url = "/lab"
c.Spawner.start_timeout = 120  # several servers starting at once on 2 cores are slow
c.Spawner.http_timeout = 90
threads = str(max(1, int(cpu)))
c.Spawner.environment = {
    "PATH": f"{env / 'bin'}:/usr/local/bin:/usr/bin:/bin",  # nbgrader runs `alembic` from PATH
    "DEEPSEEK_MINI_HOME": str(root / "shared"),  # data + tiny model, built once, read-only
    "DEEPSEEK_MINI_EXCHANGE": str(root / "exchange"),
    "JUPYTER_CONFIG_PATH": str(root / "etc" / "jupyter"),  # the system-wide nbgrader config
    "OMP_NUM_THREADS": threads,
    "MKL_NUM_THREADS": threads,
}


def private_home(spawner):
    """`useradd -m` makes homes world-readable (755): close them before the server starts, so
    nobody reads another student's answers or the instructor's source notebooks."""
    import pwd

    home = pwd.getpwnam(spawner.user.name).pw_dir
    mode = stat.S_IMODE(os.stat(home).st_mode)
    if mode & 0o077:
        os.chmod(home, 0o700)


c.Spawner.pre_spawn_hook = private_home

if shutil.which("configurable-http-proxy") is None:
    raise SystemExit("configurable-http-proxy is not on PATH: npm install -g configurable-http-proxy"
                     " (or run ./scripts/system-deps from the repository as root)")
