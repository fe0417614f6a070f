"""Ordinary condor_submit jobs in per-job VMs on a real HTCondor 23.9 pool (two startds, chrooted)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, VmwrapSite
from vmwrap.catalog import register
from vmwrap.config import Settings, render
from vmwrap.resources import HOOKS

pytestmark = pytest.mark.vm
REPO = Path(__file__).resolve().parent.parent
USER = "vmwrapuser"

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


def _virsh_names() -> list[str]:
    r = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True, text=True)
    return r.stdout.split()


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condor-{os.getpid()}"), appliance, virt_type) as site:
        yield site


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
    return condor.logs()


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


def test_a_job_killed_by_a_signal_shows_it_as_the_bare_job_does(condor):
    """ExitBySignal/ExitSignal, not ExitCode 128+N: the guest reports the signal, the wrapper dies by it."""
    results = {}
    for kind, image in (("bare", None), ("vm", "busybox")):
        d = condor.jobdir()
        (d / "payload.sh").write_text("#!/bin/sh\necho going\nkill -SEGV $$\necho never\n")
        os.chown(d / "payload.sh", 1234, 1234)
        (d / "payload.sh").chmod(0o755)
        sub = "\n".join(["executable = payload.sh", "should_transfer_files = YES", "when_to_transfer_output = ON_EXIT",
                         "output = out.txt", "error = err.txt", "log = log.txt", "request_memory = 256",
                         *([f'+VmwrapImage = "{image}"'] if image else []), "queue", ""])
        cluster, r = condor.submit(d, sub)
        assert cluster > 0, r.stderr
        ad = condor.pool.wait_job(cluster, 0, (4, 5), 150, ["ExitBySignal", "ExitSignal", "HoldReason"])
        assert ad["JobStatus"] == 4, (ad, _logs(condor))
        results[kind] = (ad["ExitBySignal"], ad["ExitSignal"], (d / "out.txt").read_text())
    assert results["bare"] == (True, 11, "going\n")
    assert results["vm"] == results["bare"]


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
    # A removed job is stopped, never saved (that is a vacate's).
    assert "saved" not in [e for e, _ in condor.ledger(f"{cluster}.0")]
    assert not (condor.checkpoints / f"{cluster}.0").exists()


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


def _faults(condor) -> dict:
    return {a["Name"]: a.get("VmwrapFault") for a in condor.pool.query("startds", "true", ["Name", "VmwrapFault"])}


def test_a_job_fault_holds_the_job_with_the_reason(condor):
    """What the job asked for and may not have (an image edited past the submit check) holds it with
    `vmwrap: <reason>` in HoldReason; the node stays in service."""
    d = condor.jobdir()
    cluster, r = condor.submit(d, "executable = /bin/true\ntransfer_executable = false\nhold = true\n"
                                  'output = out.txt\nerror = err.txt\nrequest_memory = 512\n+VmwrapImage = "busybox"\nqueue\n')
    assert cluster > 0, r.stderr
    assert condor.pool.run("/usr/bin/condor_qedit", str(cluster), "VmwrapImage", '"nope"', user=USER).returncode == 0
    assert condor.pool.run("/usr/bin/condor_release", str(cluster), user=USER).returncode == 0
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 120, ["HoldReason", "NumJobStarts"])
    assert ad["JobStatus"] == 5, (ad, _logs(condor))
    assert ad["HoldReason"].startswith("vmwrap: ") and "nope" in ad["HoldReason"], ad
    assert not Path(str(condor.sock) + ".fault").exists()
    time.sleep(5)  # two probe periods: no node took itself out for what a user did
    assert set(_faults(condor).values()) == {None}, _faults(condor)
    condor.pool.run("/usr/bin/condor_rm", str(cluster), user=USER)


def test_without_its_bridge_a_node_matches_no_vm_job(condor):
    """A node whose bridge is down publishes VmwrapFault (its probe): VM jobs wait instead of failing
    there, bare jobs still run; once the bridge is back the VM job runs to its end."""
    condor.stop_bridge()
    try:
        _wait(lambda: len([f for f in _faults(condor).values() if f]) == len(condor.pool.startds),
              "every startd to publish VmwrapFault", 60, condor)
        assert all("no vmwrap bridge" in f for f in _faults(condor).values()), _faults(condor)
        d = condor.jobdir()
        cluster, r = condor.submit(d, "executable = /bin/echo\narguments = hi\ntransfer_executable = false\n"
                                      'output = out.txt\nerror = err.txt\nrequest_memory = 512\n+VmwrapImage = "busybox"\nqueue\n')
        assert cluster > 0, r.stderr
        bare, r = condor.submit(d, "executable = /bin/true\ntransfer_executable = false\nqueue\n")
        assert bare > 0, r.stderr
        assert condor.pool.wait_job(bare, 0, (4, 5), 60)["JobStatus"] == 4
        ad = condor.pool.job(cluster, 0, ["JobStatus", "NumJobStarts"])
        assert (ad["JobStatus"], ad["NumJobStarts"]) == (1, 0), (ad, _logs(condor))
    finally:
        condor.start_bridge()
    _wait(lambda: set(_faults(condor).values()) == {None}, "VmwrapFault to clear", 60, condor)
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 180, ["ExitCode", "HoldReason"])
    assert (ad["JobStatus"], ad["ExitCode"]) == (4, 0), (ad, _logs(condor))
    assert (d / "out.txt").read_text() == "hi\n"


def test_a_node_fault_sends_the_job_back_to_idle_never_to_hold(condor):
    """The bridge cannot ask the schedd (the node's trouble, not the job's): the job goes back to idle
    with VmwrapRequeue and is tried again, never held; when the node is well it runs to its end."""
    condor.stop_bridge()
    condor.start_bridge(condor_python="/bin/false")
    try:
        d = condor.jobdir()
        cluster, r = condor.submit(d, "executable = /bin/echo\narguments = hi\ntransfer_executable = false\n"
                                      'output = out.txt\nerror = err.txt\nrequest_memory = 512\n+VmwrapImage = "busybox"\nqueue\n')
        assert cluster > 0, r.stderr
        seen = {}

        def requeued():
            seen.update(condor.pool.job(cluster, 0, ["JobStatus", "NumJobStarts", "VmwrapRequeue", "HoldReason"]))
            assert seen["JobStatus"] in (1, 2), seen  # never held, never completed
            return seen["NumJobStarts"] >= 2 and "cannot query the schedd" in (seen["VmwrapRequeue"] or "")

        _wait(requeued, "the job to be sent back to idle twice", 120, condor)
        assert seen["HoldReason"] is None, seen
    finally:
        condor.stop_bridge()
        condor.start_bridge()
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 180, ["ExitCode", "HoldReason", "VmwrapRequeue"])
    assert (ad["JobStatus"], ad["ExitCode"]) == (4, 0), (ad, _logs(condor))
    assert (d / "out.txt").read_text() == "hi\n"


def test_a_lifecycle_node_fault_is_published_by_the_probe(tmp_path):
    """The bridge's take_out writes the fault the startd's probe (the real wrapper) publishes."""
    from vmwrap_plugins.htcondor.hooks import HTCondor, fault_path

    sock = tmp_path / "condor.sock"
    probe = [sys.executable, "-I", str(HOOKS / "condor-wrapper"), "--socket", str(sock), "--fault-ad"]
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout
    assert out.startswith('VmwrapFault = "vmwrap: no vmwrap bridge on this node'), out
    import socket as so

    srv = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    srv.bind(str(sock))
    srv.listen(4)
    assert subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout.splitlines()[0] == \
        "VmwrapFault = undefined"  # the next line is VmwrapCachedImages (tests/test_htcondor_placement.py)
    HTCondor(fault_file=fault_path(str(sock))).take_out({}, 'vmwrap: cannot reach libvirt "x"\nmore')
    out = subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout.splitlines()[0]
    assert out == 'VmwrapFault = "vmwrap: cannot reach libvirt \\"x\\" more"', out
    srv.close()


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
    from vmwrap_plugins.htcondor.render import rank_expr

    for line in ("JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) VmwrapHold Vmwrap", "COPY Rank VmwrapUserRank",
                 f"SET Rank {rank_expr()}", "#   vmwrap condor prestage --socket /run/vmwrap/condor.sock",
                 "STARTD_CRON_VMWRAP_ARGS = --fault-ad",
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
    # A refusal (the job's fault) is set as VmwrapHoldReason through chirp (the transform holds the job).
    said = tmp_path / "chirp.said"
    chirp = tmp_path / "chirp"
    chirp.write_text(f"#!/bin/sh\nprintf '%s\\n' \"$*\" >> {said}\n")
    chirp.chmod(0o755)
    env["_CONDOR_CHIRP_CONFIG"] = str(tmp_path / ".chirp.config")
    r = subprocess.run(wrapper[:3] + ["--chirp", str(chirp), "--socket", str(sock), "/bin/echo", "vm"], env=env,
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "vmwrap: only a job's wrapper under the node's condor_starter" in r.stderr
    assert said.read_text().startswith('set_job_attr VmwrapHoldReason "vmwrap: only a job\'s wrapper'), said.read_text()
    assert not err.exists()
    said.unlink()
    # No bridge (the node's fault): VmwrapRequeue (back to idle) and the wrapper error file.
    r = subprocess.run(wrapper[:3] + ["--chirp", str(chirp), "--socket", str(tmp_path / "none.sock"), "/bin/echo"],
                       env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and err.read_text().startswith("vmwrap: no vmwrap bridge on this node")
    assert said.read_text().startswith('set_job_attr VmwrapRequeue "vmwrap: no vmwrap bridge'), said.read_text()
