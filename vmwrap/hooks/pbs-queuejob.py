# PBS Professional / OpenPBS queuejob hook (vmwrap_plugins/pbs/queuejob.py):
#   qmgr -c "create hook vmwrap_queuejob event=queuejob"
#   qmgr -c "import hook vmwrap_queuejob application/x-python default /path/to/pbs-queuejob.py"
# pbs_server runs it in its own Python; vmwrap comes from its venv (VENV below, as installed).
import site
import sys

import pbs

VENV_SITE = "/opt/vmwrap/venv/lib/python%d.%d/site-packages" % sys.version_info[:2]
CONFIG = None  # a settings file other than /etc/vmwrap/vmwrap.toml

site.addsitedir(VENV_SITE)
from vmwrap import config  # noqa: E402
from vmwrap_plugins.pbs import queuejob  # noqa: E402

queuejob.check(config.load(CONFIG, from_env=False), pbs)
