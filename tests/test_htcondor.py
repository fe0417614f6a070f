"""Ordinary condor_submit jobs in per-job VMs on a real HTCondor 23.9 pool (two startds, chrooted)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, Pool
from vmwrap.catalog import register
from vmwrap.config import Settings, render
from vmwrap.resources import HOOKS
from vmwrap_plugins.htcondor import render as condor_render

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent
USER = "vmwrapuser"

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


def _virsh_names() -> list[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True)
    return r.stdout.split()


class Env:
    def __init__(self, pool: Pool, base: Path, bridge: subprocess.Popen, state: Path):
        self.pool, self.base, self.bridge, self.state = pool, base, bridge, state

    def jobdir(self) -> Path:
        d = self.base / "submit" / f"t{os.urandom(3).hex()}"
        d.mkdir(parents=True)
        os.chown(d, 1234, 1234)
        return d

    def submit(self, d: Path, text: str) -> tuple[int, subprocess.CompletedProcess]:
        return self.pool.submit(text, USER, d)


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    base = Path(f"/var/tmp/vmwrap-condor-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    cfg = base / "vmwrap.toml"
    state = base / "state"
    # Cluster ids restart at 1 in a fresh pool: a private state dir keeps them apart from other tests.
    cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(state), "cache_dir": str(base / "cache"),
                           "checkpoint_dir": str(base / "checkpoints")}))
    (base / "submit").mkdir(mode=0o755)
    # The wrapper as the chrooted starter sees it: root's copy in the pool dir (bound at the same path),
    # told where the bridge listens.
    hooks = base / "hooks"
    hooks.mkdir(mode=0o755)
    shutil.copy(HOOKS / "condor-wrapper", hooks / "condor-wrapper.py")
    sock = base / "bridge" / "condor.sock"
    (hooks / "condor-wrapper").write_text(
        f"#!/bin/sh\nexec /usr/bin/python3 -I {hooks / 'condor-wrapper.py'} --socket {sock} \"$@\"\n")
    for f in hooks.iterdir():
        f.chmod(0o755)
    settings = Settings(catalog=str(base / "images.toml"))
    extra = condor_render.submit_side(settings) + "\n" + condor_render.execute_side(
        str(sock), str(hooks / "condor-wrapper"))
    pool = Pool(base, extra_config=extra)
    py = f"chroot {ROOT} /usr/bin/env -i CONDOR_CONFIG={pool.config} /usr/bin/python3"
    bridge = subprocess.Popen(
        [sys.executable, "-I", "-m", "vmwrap_plugins.htcondor", "--config", str(cfg), "condor", "bridge",
         "--socket", str(sock), "--condor-python", py,
         "--startd", f"node1@{os.uname().nodename}", "--startd", f"node2@{os.uname().nodename}"],
        cwd="/", stdout=open(base / "bridge.log", "ab"), stderr=subprocess.STDOUT, start_new_session=True,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "PYTHONPATH": str(REPO)})
    try:
        pool.start()
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        assert sock.exists(), (base / "bridge.log").read_text()
        yield Env(pool, base, bridge, state)
    finally:
        pool.stop()
        bridge.kill()
        bridge.wait()
        for n in _virsh_names():
            if n.startswith("vmwrap-") and (state / "jobs" / n[len("vmwrap-"):]).exists():
                subprocess.run(["virsh", "-c", "qemu:///system", "destroy", n], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


PAYLOAD = """#!/bin/sh
echo "out: $1|$2|$FOO"
echo "err: $2" >&2
cat input.txt
echo made > made.txt
exit 7
"""


def _job(image: str | None) -> str:
    return "\n".join([
        "executable = payload.sh",
        'arguments = "\'a b\' c"',
        'environment = "FOO=bar"',
        "transfer_input_files = input.txt",
        "should_transfer_files = YES",
        "when_to_transfer_output = ON_EXIT",
        "output = out.txt", "error = err.txt", "log = log.txt", "request_memory = 512",
        *( [f'+VmwrapImage = "{image}"'] if image else []),
        "queue", ""])


def _logs(condor) -> str:
    return (condor.base / "bridge.log").read_text(errors="replace")[-3000:] + condor.pool.logs(15)


def test_vm_job_matches_the_bare_job(condor):
    """stdout, stderr, exit code and files transferred back are those of the same job without vmwrap."""
    results = {}
    for kind, image in (("bare", None), ("vm", "busybox")):
        d = condor.jobdir()
        (d / "payload.sh").write_text(PAYLOAD)
        (d / "input.txt").write_text("input line\n")
        for f in d.iterdir():
            os.chown(f, 1234, 1234)
        (d / "payload.sh").chmod(0o755)
        cluster, r = condor.submit(d, _job(image))
        assert cluster > 0, r.stderr
        ad = condor.pool.wait_job(cluster, 0, (4, 5), 150, ["ExitCode", "HoldReason", "ExitBySignal"])
        assert ad["JobStatus"] == 4, (ad, _logs(condor))
        results[kind] = (ad["ExitCode"], ad["ExitBySignal"], (d / "out.txt").read_text(), (d / "err.txt").read_text(),
                         (d / "made.txt").read_text() if (d / "made.txt").exists() else None)
        if kind == "vm":
            ledger = subprocess.run(["sqlite3", str(condor.state / "ledger.sqlite"),
                                     f"select event from events where job_id='{cluster}.0'"],
                                    capture_output=True, text=True).stdout.split()
            assert "created" in ledger, ledger  # it really ran in a VM
    assert results["bare"] == (7, False, "out: a b|c|bar\ninput line\n", "err: c\n", "made\n")
    assert results["vm"] == results["bare"]
    assert not [n for n in _virsh_names() if n.startswith("vmwrap-") and
                (condor.state / "jobs" / n[7:]).exists()]


@pytest.mark.parametrize("value,reason", [
    ('"../etc/passwd"', "vmwrap: invalid image name"),
    ('"a b"', "vmwrap: invalid image name"),
    ('"<x/>"', "vmwrap: invalid image name"),
    ('"nope"', "vmwrap: unknown image"),
    ("5", "vmwrap: +VmwrapImage must be a quoted image name"),
])
def test_bad_request_is_refused_at_submit(condor, value, reason):
    d = condor.jobdir()
    cluster, r = condor.submit(d, f"executable = /bin/true\ntransfer_executable = false\n+VmwrapImage = {value}\nqueue\n")
    assert cluster == -1
    assert reason in r.stdout + r.stderr, r.stdout + r.stderr


def _wait(cond, what: str, timeout: float, condor) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.3)
    raise AssertionError(f"timed out waiting for {what}\n{_logs(condor)}")


def test_condor_rm_leaves_no_vm(condor):
    d = condor.jobdir()
    cluster, r = condor.submit(d, "executable = /bin/sleep\narguments = 300\ntransfer_executable = false\n"
                                  'output = out.txt\nerror = err.txt\nrequest_memory = 512\n+VmwrapImage = "busybox"\nqueue\n')
    assert cluster > 0, r.stderr
    name = f"vmwrap-{cluster}.0"
    _wait(lambda: name in _virsh_names(), f"the VM {name}", 120, condor)
    t = time.monotonic()
    assert condor.pool.run("/usr/bin/condor_rm", str(cluster), user=USER).returncode == 0
    _wait(lambda: name not in _virsh_names(), f"the VM {name} to go", 60, condor)
    gone_after = time.monotonic() - t
    _wait(lambda: not (condor.state / "jobs" / f"{cluster}.0").exists(), "the run dir to go", 30, condor)
    assert gone_after < 30, gone_after


def test_suspend_pauses_the_vm_and_continue_resumes_it(condor):
    d = condor.jobdir()
    cluster, r = condor.submit(d, "executable = /bin/sleep\narguments = 300\ntransfer_executable = false\n"
                                  'output = out.txt\nerror = err.txt\nrequest_memory = 512\n+VmwrapImage = "busybox"\nqueue\n')
    assert cluster > 0, r.stderr
    name = f"vmwrap-{cluster}.0"

    def state() -> str:
        return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name],
                              capture_output=True, text=True).stdout.strip()

    _wait(lambda: state() == "running", f"the VM {name} running", 120, condor)
    time.sleep(2)  # the payload has been handed over
    assert condor.pool.run("/usr/bin/condor_suspend", str(cluster), user=USER).returncode == 0
    _wait(lambda: state() == "paused", "the VM paused", 30, condor)
    assert condor.pool.run("/usr/bin/condor_continue", str(cluster), user=USER).returncode == 0
    _wait(lambda: state() == "running", "the VM resumed", 30, condor)
    assert condor.pool.run("/usr/bin/condor_rm", str(cluster), user=USER).returncode == 0
    _wait(lambda: name not in _virsh_names(), f"the VM {name} to go", 60, condor)


def test_render_prints_both_sides(tmp_path, appliance):
    """`vmwrap config render condor`: the schedd's transform and requirements, the startd's wrapper."""
    from vmwrap_plugins.htcondor.hooks import HTCondor

    register(str(tmp_path / "images.toml"), appliance)
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml")}))
    r = subprocess.run([sys.executable, "-m", "vmwrap_plugins.htcondor", "--config", str(cfg),
                        "config", "render", "condor"], capture_output=True, text=True, cwd=str(REPO))
    if "no scheduler adapter 'condor'" in r.stderr:  # entry points installed before this plugin existed
        r = subprocess.CompletedProcess([], 0, HTCondor().render_config(
            Settings(catalog=str(tmp_path / "images.toml")), lua_out=None, vmwrap_path="/usr/local/bin/vmwrap",
            default_image=None, node_config=None), "")
    assert r.returncode == 0, r.stderr
    for line in ("JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) Vmwrap",
                 "SUBMIT_REQUIREMENT_VmwrapKnown = VmwrapImage is undefined || member(VmwrapImage, {\"busybox\"})",
                 f"USER_JOB_WRAPPER = {HOOKS / 'condor-wrapper'}", "STARTD_ATTRS = $(STARTD_ATTRS) HasVmwrap"):
        assert line in r.stdout.splitlines(), r.stdout


# -- without a pool: what the bridge accepts ------------------------------------------------------

def test_job_from_ad_validates_what_the_schedd_holds(tmp_path, test_user):
    from vmwrap.errors import UserError
    from vmwrap_plugins.htcondor.hooks import job_from_ad

    ad = {"ClusterId": 12, "ProcId": 3, "VmwrapImage": "busybox", "RequestCpus": 2, "RequestMemory": 512,
          "NumJobStarts": 1}
    job = job_from_ad(ad, test_user.pw_uid, str(tmp_path))
    assert (job.job_id, job.cpus, job.memory_mib, job.image, job.user) == ("12.3", 2, 512, "busybox", USER)
    assert job_from_ad({**ad, "VmwrapImage": None}, test_user.pw_uid, str(tmp_path)) is None
    # What the slot gave the job wins over what it asked for (request_memory's default is ~1 MiB).
    given = job_from_ad({**ad, "RequestMemory": 1, "MemoryProvisioned": 1024, "CpusProvisioned": 1},
                        test_user.pw_uid, str(tmp_path))
    assert (given.cpus, given.memory_mib) == (1, 1024)
    for bad in ({"VmwrapImage": 5}, {"VmwrapImage": "../x"}, {"VmwrapImage": "a b"}, {"RequestCpus": 0},
                {"RequestMemory": -1}, {"RequestCpus": {"expr": "foo"}}, {"RequestMemory": True}):
        with pytest.raises(UserError):
            job_from_ad({**ad, **bad}, test_user.pw_uid, str(tmp_path))


def test_bridge_refuses_malformed_requests():
    import json
    import socket as so

    from vmwrap.errors import UserError
    from vmwrap_plugins.htcondor.bridge import Refused, receive, under_starter

    def ask(data: bytes, fds=(0, 1, 2)):
        a, b = so.socketpair()
        with a, b:
            if fds:
                a.sendmsg([data[:1]], [(so.SOL_SOCKET, so.SCM_RIGHTS, bytes(memoryview(__import__("array").array("i", fds))))])
                a.sendall(data[1:])
            else:
                a.sendall(data)
            a.shutdown(so.SHUT_WR)
            got, req = receive(b, timeout=2)
            for fd in got:
                os.close(fd)
            return req

    ok = {"op": "run", "job": "4.0", "argv": ["/bin/true"], "env": {"A": "b"}}
    assert ask(json.dumps(ok).encode() + b"\n")["job"] == "4.0"
    for bad in (b"nonsense\n", json.dumps({**ok, "op": "pause"}).encode() + b"\n",
                json.dumps({**ok, "job": "4.0; rm"}).encode() + b"\n", json.dumps({**ok, "argv": []}).encode() + b"\n",
                json.dumps({**ok, "env": {"A": 1}}).encode() + b"\n"):
        with pytest.raises(UserError):  # Refused, or split_id's for a job id that is no CLUSTER.PROC
            ask(bad)
    with pytest.raises(Refused, match="stdin, stdout and stderr"):
        ask(json.dumps(ok).encode() + b"\n", fds=())
    assert not under_starter(os.getpid())  # pytest is no condor_starter's child


def test_wrapper_turns_a_refusal_into_a_hold_and_runs_a_plain_job_as_usual(tmp_path):
    """The real wrapper against a real bridge: a caller that is no starter's child is refused, and the
    reason is what HTCondor's hold will show (its wrapper error file)."""
    import threading

    from vmwrap_plugins.htcondor.bridge import Bridge, serve
    from vmwrap_plugins.htcondor.facts import Schedd

    sock = tmp_path / "b.sock"
    ready = threading.Event()
    bridge = Bridge(Settings(state_dir=str(tmp_path / "state")), None, Schedd(["/bin/false"]))
    threading.Thread(target=serve, args=(bridge, str(sock), ready), daemon=True).start()
    assert ready.wait(10)
    ad, err = tmp_path / ".job.ad", tmp_path / "wrapper.err"
    env = {"PATH": "/usr/bin:/bin", "_CONDOR_JOB_AD": str(ad), "_CONDOR_WRAPPER_ERROR_FILE": str(err)}
    wrapper = [sys.executable, "-I", str(HOOKS / "condor-wrapper"), "--socket", str(sock)]
    ad.write_text("ClusterId = 5\nProcId = 0\nCmd = \"/bin/echo\"\n")
    r = subprocess.run(wrapper + ["/bin/echo", "plain"], env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (0, "plain\n")  # no VmwrapImage: exec'd unchanged
    ad.write_text("ClusterId = 5\nProcId = 0\nVmwrapImage = \"busybox\"\n")
    r = subprocess.run(wrapper + ["/bin/echo", "vm"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and r.stdout == ""
    assert err.read_text().startswith("vmwrap: only a job's wrapper under the node's condor_starter"), err.read_text()
    err.unlink()
    r = subprocess.run(wrapper[:3] + ["--socket", str(tmp_path / "none.sock"), "/bin/echo"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and err.read_text().startswith("vmwrap: no vmwrap bridge on this node")
