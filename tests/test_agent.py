"""The node agent obeys a job's owner (and root) only, as the kernel reports the caller's uid."""

import os
import subprocess
import sys
import threading
import time

import pytest

from vmwrap import agent
from vmwrap.config import Settings
from vmwrap.errors import NodeError


@pytest.fixture
def running_agent(libvirtd, test_user):
    import shutil
    import tempfile
    from pathlib import Path

    tmp_path = Path(tempfile.mkdtemp(prefix="vmwrap-agent-", dir="/var/tmp"))
    s = Settings(state_dir=str(tmp_path / "state"), libvirt_uri="test:///default")
    t = threading.Thread(target=agent.serve, args=(s,), daemon=True)
    t.start()
    for _ in range(50):
        if agent.socket_path(s).exists():
            break
        time.sleep(0.05)
    (s.jobs_dir / "77" / "ctl").mkdir(parents=True)
    # job 77 belongs to the test user, whatever uid it got (the demo creates it without a fixed one)
    (s.jobs_dir / "77" / "ctl" / "ids").write_text(f"{test_user.pw_uid} {test_user.pw_gid} - 22\n")
    os.chmod(tmp_path, 0o755)
    yield s
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_refuses_unknown_job_and_bad_op(running_agent):
    with pytest.raises(NodeError, match="no VM for job 99"):
        agent.request(running_agent, "pause", "99")
    with pytest.raises(NodeError, match="unknown operation"):
        agent.request(running_agent, "reboot", "77")
    with pytest.raises(NodeError, match="invalid job id"):
        agent.request(running_agent, "pause", "../77")


def test_refuses_a_user_who_does_not_own_the_job(running_agent, test_user):
    code = ("import sys; from vmwrap import agent; from vmwrap.config import Settings\n"
            f"s = Settings(state_dir={str(running_agent.state_dir)!r})\n"
            "try:\n    agent.request(s, 'pause', '77')\nexcept Exception as e:\n    print(e)\n")
    other = subprocess.run(["runuser", "-u", "nobody", "--", sys.executable, "-c", code], capture_output=True,
                           text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "does not own job 77" in other.stdout, other.stderr
    owner = subprocess.run(["runuser", "-u", test_user.pw_name, "--", sys.executable, "-c", code],
                           capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=os.getcwd()))
    assert "no VM for job 77" in owner.stdout  # authorised; there is simply no domain on the test driver
