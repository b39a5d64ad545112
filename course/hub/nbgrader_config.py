# System-wide nbgrader configuration for a deepseek-mini workshop on one JupyterHub machine.
#
# Every user's server reads it: setup_workshop.py copies it to <root>/etc/jupyter/, and
# jupyterhub_config.py puts that folder on each server's JUPYTER_CONFIG_PATH. (On a machine
# where you prefer the usual place, /etc/jupyter/nbgrader_config.py works the same.)
# Students need nothing else: the assignment list, fetch, submit and feedback all go through
# the shared exchange below. The instructor's own course/nbgrader_config.py reads the same
# DEEPSEEK_MINI_EXCHANGE, so both sides agree on the exchange.
import os

c = get_config()  # noqa: F821 (injected by traitlets when it loads this file)

c.CourseDirectory.course_id = "deepseek-mini"
# Set for every server by jupyterhub_config.py; mode 1777 (all submit, only owners rename), with
# the course folder in it owned by the instructor (setup_workshop.py makes both).
c.Exchange.root = os.environ.get("DEEPSEEK_MINI_EXCHANGE", "/srv/deepseek-mini/exchange")
# Fetched assignments land in ~/deepseek-mini/<assignment>, away from the student's own files.
c.Exchange.path_includes_course = True
