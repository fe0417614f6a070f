"""Ordinary sbatch jobs in per-job VMs on a real Slurm 22.05 cluster (slurmctld + 3 slurmd, munge)."""

from __future__ import annotations

import copy
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.netprobe import Host, get
from harness.slurm_cluster import Cluster
from harness.terminal import read_until_exit, start_on_terminal
from vmwrap.catalog import register

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-slurm-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    catalog = base / "images.toml"
    register(str(catalog), appliance)
    nat = copy.deepcopy(appliance)
    nat.name, nat.network = "busybox-nat", "nat"  # the catalog's network policy: NAT out, nothing in
    register(str(catalog), nat)
    c = Cluster(base, {"catalog": str(catalog), "accel": virt_type, "grace_seconds": 5.0}, accounting=True)
    c.start()
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jobdir(cluster, test_user):
    d = cluster.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def submit(cluster, jobdir, script, *args):
    r = cluster.sbatch(script, *args, user="vmwrapuser", cwd=jobdir)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def done(cluster, job_id, timeout=120):
    return cluster.wait_state(job_id, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}, timeout)


def test_job_runs_in_its_own_vm(cluster, jobdir, test_user):
    job = submit(cluster, jobdir, HDR + 'echo "kernel $(uname -r)"; echo "uid $(id -u)"; pwd; echo "job $SLURM_JOB_ID"\n')
    info = done(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0"
    out = (jobdir / f"slurm-{job}.out").read_text()
    guest_kernel = (Path("/var/cache/vmwrap/appliances/.kernel/version")).read_text().strip()
    assert f"kernel {guest_kernel}" in out and os.uname().release not in out
    assert f"uid {test_user.pw_uid}\n{jobdir}\njob {job}\n" in out
    assert (jobdir / f"slurm-{job}.out").stat().st_uid == test_user.pw_uid


def test_a_nat_image_reaches_the_host_as_the_jobs_user_and_others_have_no_network(cluster, jobdir, test_user):
    host = Host()
    try:
        nat = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox-nat\nls /sys/class/net\n"
                     + get("10.0.2.2", host.port, "slurm"))
        none = submit(cluster, jobdir, HDR + "ls /sys/class/net\n")
        assert [done(cluster, j)["JobState"] for j in (nat, none)] == ["COMPLETED", "COMPLETED"]
        assert (jobdir / f"slurm-{nat}.out").read_text() == "eth0\nlo\ngot slurm\n"
        assert (jobdir / f"slurm-{none}.out").read_text() == "lo\n"
        assert host.seen == [("/slurm", test_user.pw_uid)]
    finally:
        host.close()


def test_vmwrap_shell_reaches_a_running_jobs_vm_through_an_overlapping_step(cluster, jobdir, test_user):
    """What docs/shell.md tells a user: `srun --jobid=J --overlap vmwrap shell J` on the job's node."""
    job = submit(cluster, jobdir, HDR + "echo up\nsleep 300\n")
    try:
        _wait_output(jobdir / f"slurm-{job}.out", "up\n")
        vmwrap = shutil.which("vmwrap")
        r = cluster.run("srun", f"--jobid={job}", "--overlap", vmwrap, "--config", str(cluster.base / "vmwrap-%n.toml"),
                        "shell", job, 'echo "$(uname -r) $(id -u) $SLURM_JOB_ID"; exit 4', user="vmwrapuser")
        guest_kernel = (Path("/var/cache/vmwrap/appliances/.kernel/version")).read_text().strip()
        assert (r.returncode, r.stdout.replace("\r", "")) == (4, f"{guest_kernel} {test_user.pw_uid} {job}\n"), r.stderr
    finally:
        cluster.run("scancel", job)
    done(cluster, job)


def test_salloc_with_an_image_is_a_shell_in_the_jobs_vm(cluster, jobdir, test_user):
    """`salloc --container=IMAGE` (docs/interactive.md): salloc's shell runs in the job's VM on a terminal of
    the caller's size, as the job's user, in its work dir, with the job's environment; `srun` there runs a
    step in the VM; the shell's exit status is salloc's; the VM is gone when the shell ends."""
    master, p = start_on_terminal(["runuser", "-u", "vmwrapuser", "--", "env", f"SLURM_CONF={cluster.conf}", "TERM=xterm",
                                   "salloc", "--container=busybox"], rows=31, cols=97, cwd=jobdir, env=cluster.env)
    try:
        out = read_until_exit(master, p, [(b"$ ", b'echo "in $(uname -r) $(id -u) $(pwd) job=$SLURM_JOB_ID"; stty size; '
                                                   b"srun -n 1 sh -c 'echo step $SLURM_STEP_ID $(uname -r)'; exit 3\r")])
    finally:
        os.close(master)
    text = out.decode(errors="replace").replace("\r", "")
    guest_kernel = (Path("/var/cache/vmwrap/appliances/.kernel/version")).read_text().strip()
    job = text.split("Granted job allocation ", 1)[1].split()[0]
    assert p.returncode == 3, text
    assert f"in {guest_kernel} {test_user.pw_uid} {jobdir} job={job}\n31 97\n" in text, text
    assert f"step 0 {guest_kernel}\n" in text, text  # salloc's own step is the interactive one, as bare
    info = done(cluster, job)
    node = info["NodeList"]
    _wait_gone(cluster, node, job, 30)


def test_scancel_of_an_interactive_vm_job_ends_the_session_and_the_vm(cluster, jobdir):
    """The other exit path: the job is cancelled under the user's shell."""
    master, p = start_on_terminal(["runuser", "-u", "vmwrapuser", "--", "env", f"SLURM_CONF={cluster.conf}", "TERM=xterm",
                                   "salloc", "--container=busybox"], cwd=jobdir, env=cluster.env)
    job, out = None, b""
    try:
        end = time.time() + 120
        while time.time() < end and b"$ " not in out:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                out += os.read(master, 65536)
        assert b"$ " in out, out
        job = out.decode(errors="replace").split("Granted job allocation ", 1)[1].split()[0]
        assert cluster.run("scancel", job).returncode == 0
        out += read_until_exit(master, p, [])
    finally:
        os.close(master)
    assert p.returncode != 0, out
    node = done(cluster, job)["NodeList"]
    _wait_gone(cluster, node, job, 30)


def test_salloc_whose_vm_cannot_start_says_why_and_gives_no_host_shell(cluster, jobdir):
    r = subprocess.run(["runuser", "-u", "vmwrapuser", "--", "env", f"SLURM_CONF={cluster.conf}", "salloc",
                        "--container=busybox", "--mem=40M"], cwd=jobdir, env=cluster.env, capture_output=True,
                       text=True, timeout=120, input="echo on-the-host\n")
    assert r.returncode != 0 and "on-the-host" not in r.stdout, (r.stdout, r.stderr)
    assert "vmwrap: error: image busybox's default memory of 256M is more than the job's allocation of 40M" in r.stderr
    assert r.returncode == 64, r.stderr  # a user error, as a batch job's


def test_salloc_without_an_image_is_slurms_own_interactive_step(cluster, jobdir):
    """Jobs without an image are untouched: salloc's step is the user's shell on the node."""
    master, p = start_on_terminal(["runuser", "-u", "vmwrapuser", "--", "env", f"SLURM_CONF={cluster.conf}",
                                   "SHELL=/bin/sh", "salloc"], cwd=jobdir, env=cluster.env)
    try:
        out = read_until_exit(master, p, [(b"$ ", b"uname -r; exit 5\r")])
    finally:
        os.close(master)
    text = out.decode(errors="replace").replace("\r", "")
    assert p.returncode == 5 and f"\n{os.uname().release}\n" in text, text


def test_srun_with_an_image_outside_an_allocation_is_refused(cluster, jobdir):
    r = cluster.run("srun", "--container=busybox", "true", user="vmwrapuser")
    assert r.returncode != 0 and "srun --container=IMAGE starts its command on the node, not in a VM" in r.stderr


def test_exit_code_seen_by_slurm_and_sacct(cluster, jobdir):
    job = submit(cluster, jobdir, HDR + "echo failing; exit 3\n")
    ok = submit(cluster, jobdir, HDR + "echo fine\n")
    info = done(cluster, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "3:0")
    done(cluster, ok)
    end = time.time() + 30
    while time.time() < end and (cluster.sacct(job).get(job, ("",))[0] != "FAILED"
                                 or cluster.sacct(ok).get(ok, ("",))[0] != "COMPLETED"):
        time.sleep(0.5)
    assert cluster.sacct(job)[job] == ("FAILED", "3:0")
    assert cluster.sacct(job)[f"{job}.batch"] == ("FAILED", "3:0")
    assert cluster.sacct(ok)[ok] == ("COMPLETED", "0:0")


def test_output_patterns_chdir_export_and_args(cluster, jobdir, test_user):
    other = jobdir / "elsewhere"
    other.mkdir()
    os.chown(other, test_user.pw_uid, test_user.pw_gid)
    job = submit(cluster, jobdir, HDR + 'echo "out $1|$2|$FOO|$(pwd)"; echo "err" >&2\n',
                 "-o", str(jobdir / "o-%j.txt"), "-e", str(jobdir / "e-%j.txt"), "--chdir", str(other),
                 "--export=FOO=bar baz")
    # sbatch takes the script's own arguments after the script path: resubmit with them
    assert done(cluster, job)["ExitCode"] == "0:0"
    assert (jobdir / f"o-{job}.txt").read_text() == f"out |||{other}\n".replace("|||", "||bar baz|")
    assert (jobdir / f"e-{job}.txt").read_text() == "err\n"


def test_script_arguments(cluster, jobdir):
    path = jobdir / "args.sh"
    path.write_text(HDR + 'printf "[%s]" "$@"\n')
    path.chmod(0o755)
    r = cluster.run("sbatch", "--parsable", "-D", str(jobdir), str(path), "a", "b c", user="vmwrapuser")
    job = r.stdout.strip()
    assert done(cluster, job)["ExitCode"] == "0:0"
    assert (jobdir / f"slurm-{job}.out").read_text() == "[a][b c]"


def test_job_without_directive_runs_bare(cluster, jobdir):
    job = submit(cluster, jobdir, "#!/bin/sh\nuname -r\n")
    assert done(cluster, job)["ExitCode"] == "0:0"
    assert (jobdir / f"slurm-{job}.out").read_text().strip() == os.uname().release


@pytest.mark.parametrize("directive, message", [
    ("--image=nope", "unknown image 'nope' (this site offers: busybox, busybox-nat)"),
    ("--image=../x", "invalid image name '../x'"),
    ("--image='busybox'", "invalid image name \"'busybox'\""),
    ("--image=<x>&", "invalid image name '<x>&'"),
    ("--image=busy box", "unexpected 'box'"),
    ("--image=busybox --memory=0", "at least 1M"),
    ("--image=busybox --memory=96M", "at least 128M to boot"),
    ("--image=busybox --memory=lots", "not a size"),
    ("--image=busybox --cpus=-1", "must be at least 1"),
    ("--image=busybox --image=busybox", "duplicate directive --image"),
    ("--image=busybox --frobnicate=1", "unknown directive --frobnicate"),
])
def test_bad_directive_rejected_at_submit(cluster, jobdir, directive, message):
    r = cluster.sbatch(f"#!/bin/sh\n#VMWRAP {directive}\necho hi\n", user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0
    assert "sbatch: error: vmwrap: " in r.stderr and message in r.stderr


def test_memory_above_allocation_rejected_at_submit(cluster, jobdir):
    r = cluster.sbatch("#!/bin/sh\n#VMWRAP --image=busybox --memory=1G\n", "--mem=512M", user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0 and "--memory=1024M is more than the job's allocation of 512M" in r.stderr


def test_error_found_on_the_node_fails_the_job_not_the_node(cluster, jobdir):
    # two CPUs asked inside, one allocated by Slurm: only the node side can know
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --cpus=2\necho never\n", "-n", "1")
    info = done(cluster, job)
    assert info["JobState"] == "FAILED"
    err = (jobdir / f"slurm-{job}.out").read_text()
    assert "--cpus=2 is more than the 1 CPUs Slurm allocated on this node" in err and "never" not in err
    assert cluster.idle_nodes() == 3 or "drain" not in cluster.run("sinfo", "-h", "-o", "%t").stdout


def _domains() -> list[str]:
    out = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--name"], capture_output=True, text=True).stdout
    return [n for n in out.split() if n.startswith("vmwrap-")]


def _wait_output(path: Path, text: str, timeout=90):
    end = time.time() + timeout
    while time.time() < end:
        if path.exists() and text in path.read_text():
            return
        time.sleep(0.3)
    raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.exists() else 'missing'}")


def test_scancel_destroys_the_vm_and_its_files(cluster, jobdir):
    job = submit(cluster, jobdir, HDR + "echo started; sleep 600\n")
    _wait_output(jobdir / f"slurm-{job}.out", "started")
    node = cluster.job(job)["NodeList"]
    assert f"vmwrap-{job}" in _domains()
    t0 = time.time()
    cluster.run("scancel", job, check=True)
    done(cluster, job)
    end = time.time() + 30
    while f"vmwrap-{job}" in _domains() and time.time() < end:
        time.sleep(0.2)
    assert f"vmwrap-{job}" not in _domains()
    took = time.time() - t0
    assert took < 20, f"VM of a cancelled job lived {took:.1f}s"
    end = time.time() + 15
    while (cluster.node_dir(node) / "state" / "jobs" / job).exists() and time.time() < end:
        time.sleep(0.2)
    assert not (cluster.node_dir(node) / "state" / "jobs" / job).exists()


def test_job_array_and_dependency(cluster, jobdir):
    arr = submit(cluster, jobdir, HDR + 'echo "task $SLURM_ARRAY_TASK_ID"\n', "--array=1-3")
    dep = submit(cluster, jobdir, HDR + "echo after\n", f"--dependency=afterok:{arr}")
    info = done(cluster, dep, timeout=180)
    assert info["ExitCode"] == "0:0"
    outs = sorted((jobdir / f"slurm-{arr}_{i}.out").read_text() for i in (1, 2, 3))
    assert outs == ["task 1\n", "task 2\n", "task 3\n"]
    assert (jobdir / f"slurm-{dep}.out").read_text() == "after\n"


def test_suspend_and_resume(cluster, jobdir):
    job = submit(cluster, jobdir, HDR + "i=0; while [ $i -lt 40 ]; do echo $i; i=$((i+1)); sleep 0.25; done\n")
    out = jobdir / f"slurm-{job}.out"
    _wait_output(out, "4\n")
    node = cluster.job(job)["NodeList"]
    cluster.run("scontrol", "suspend", job, check=True)
    time.sleep(1.0)
    assert _domstate(f"vmwrap-{job}") == "paused"  # the whole VM, not only the processes inside
    frozen = out.read_text()
    time.sleep(3)
    assert out.read_text() == frozen
    cluster.run("scontrol", "resume", job, check=True)
    time.sleep(1.0)
    assert _domstate(f"vmwrap-{job}") == "running"
    info = done(cluster, job)
    assert info["ExitCode"] == "0:0"
    assert out.read_text().split() == [str(i) for i in range(40)]
    from vmwrap.ledger import Ledger

    events = Ledger(cluster.node_dir(node) / "state" / "ledger.sqlite").events(job)
    assert [e["detail"].get("via") for e in events if e["event"] in ("paused", "resumed")] == ["agent", "agent"]


def _wait_gone(cluster, node: str, job: str, seconds: float) -> None:
    """The job's VM and its run dir on `node` are gone within `seconds` (the epilog's teardown)."""
    end = time.time() + seconds
    while (f"vmwrap-{job}" in _domains() or (cluster.node_dir(node) / "state" / "jobs" / job).exists()) \
            and time.time() < end:
        time.sleep(0.2)
    assert f"vmwrap-{job}" not in _domains()
    assert not (cluster.node_dir(node) / "state" / "jobs" / job).exists()


def _domstate(name):
    return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True).stdout.strip()


def test_node_fault_drains_the_node_with_a_reason(cluster, jobdir):
    cfg = cluster.base / "vmwrap-c3.toml"
    saved = cfg.read_text()
    cfg.write_text(saved + 'libvirt_uri = "qemu+unix:///system?socket=/nonexistent/libvirt-sock"\n')
    try:
        job = submit(cluster, jobdir, HDR + "echo hi\n", "-w", "c3")
        end = time.time() + 60
        reason = ""
        while time.time() < end:
            reason = cluster.run("sinfo", "-h", "-n", "c3", "-o", "%t|%E").stdout.strip()
            if "drain" in reason:
                break
            time.sleep(0.3)
        assert "drain" in reason and "vmwrap: cannot connect to libvirt" in reason, reason
        info = cluster.job(job)
        assert info["JobState"] in ("PENDING", "REQUEUED") or "held" in info.get("Reason", "").lower()
    finally:
        cfg.write_text(saved)
        cluster.run("scancel", job)
        cluster.run("scontrol", "update", "nodename=c3", "state=resume")


def test_time_limit_stops_the_vm_and_cleans_up(cluster, jobdir):
    job = submit(cluster, jobdir, HDR + "trap 'echo term-inside; exit 9' TERM; echo started; while :; do sleep 1; done\n",
                 "--time=1")
    info = done(cluster, job, timeout=150)
    assert info["JobState"] == "TIMEOUT"
    node = info["NodeList"]
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert "started" in out and "term-inside" in out  # the job inside got SIGTERM, as it would bare
    _wait_gone(cluster, node, job, 15)


def test_preemption_suspend_gang_pauses_the_vm(cluster, jobdir):
    low = submit(cluster, jobdir, HDR + "i=0; while [ $i -lt 60 ]; do echo $i; i=$((i+1)); sleep 0.25; done\n",
                 "-w", "c2", "-c", "2", "--mem=400M")  # all cores; suspended jobs keep their memory
    out = jobdir / f"slurm-{low}.out"
    _wait_output(out, "3\n")
    high = submit(cluster, jobdir, HDR + "echo high-priority; sleep 3\n", "-p", "high", "-w", "c2", "-c", "2", "--mem=400M")
    end = time.time() + 60
    while cluster.job(low)["JobState"] != "SUSPENDED" and time.time() < end:
        time.sleep(0.2)
    assert cluster.job(low)["JobState"] == "SUSPENDED"
    time.sleep(1.0)
    assert _domstate(f"vmwrap-{low}") == "paused"
    assert done(cluster, high)["ExitCode"] == "0:0"
    info = done(cluster, low, timeout=180)
    assert info["ExitCode"] == "0:0"
    assert out.read_text().split() == [str(i) for i in range(60)]  # every value once: nothing lost or repeated


# --- Issue 14: users cannot forge the VM request; root caps the VM at the allocation -------------------

FORGED = "vmwrap:image=busybox,memory=200000,cpus=,lost="


def _no_drain(cluster):
    out = cluster.run("sinfo", "-h", "-N", "-o", "%N %t %E").stdout
    assert "drain" not in out, out


@pytest.mark.parametrize("script", ["#!/bin/sh\necho bare\n", HDR + "echo vm\n"])
def test_forged_comment_is_refused_at_submit(cluster, jobdir, script):
    r = cluster.sbatch(script, f"--comment={FORGED}", user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0
    assert "sbatch: error: vmwrap: a job's comment may not start with 'vmwrap:'" in r.stderr, r.stderr


def test_script_holding_the_marker_is_refused_at_submit(cluster, jobdir):
    r = cluster.sbatch("#!/bin/sh\n#VMWRAP-ORIGINAL-SCRIPT\n#VMWRAP --image=busybox --memory=200000M\necho hi\n",
                       "-N", "2", user="vmwrapuser", cwd=jobdir)
    assert r.returncode != 0
    assert "vmwrap: the script contains #VMWRAP-ORIGINAL-SCRIPT, which vmwrap reserves" in r.stderr, r.stderr


def test_users_cannot_write_or_change_a_vm_request_with_scontrol(cluster, jobdir):
    plain = submit(cluster, jobdir, "#!/bin/sh\necho bare\n", "-H")
    vm = submit(cluster, jobdir, HDR + "echo vm\n", "-H")
    try:
        r = cluster.run("scontrol", "update", f"jobid={plain}", f"comment={FORGED}", user="vmwrapuser")
        assert r.returncode != 0, r.stdout + r.stderr
        assert cluster.job(plain).get("Comment", "(null)") == "(null)"
        r = cluster.run("scontrol", "update", f"jobid={vm}", "comment=vmwrap:image=busybox,memory=9999,cpus=,lost=",
                        user="vmwrapuser")
        assert r.returncode != 0, r.stdout + r.stderr
        assert cluster.job(vm)["Comment"].startswith("vmwrap:image=busybox,memory=,")
        r = cluster.run("scontrol", "update", f"jobid={plain}", "comment=just a note", user="vmwrapuser")
        assert r.returncode == 0, r.stderr   # ordinary comments still work
    finally:
        cluster.run("scancel", plain, vm)


@pytest.mark.parametrize("directive, args, reason", [
    # --mem-per-cpu: job_submit.lua only sees --mem; the prolog asks Slurm what it allocated
    ("--memory=300M", ("--mem-per-cpu=100M", "-n", "1"), "--memory=300M is more than the job's allocation of 100M"),
    # the image's default size is not in job_submit.lua at all
    ("", ("--mem=100M",), "image busybox's default memory of 256M is more than the job's allocation of 100M"),
])
def test_vm_memory_above_the_allocation_fails_the_job_not_the_node(cluster, jobdir, directive, args, reason):
    job = submit(cluster, jobdir, f"#!/bin/sh\n#VMWRAP --image=busybox {directive}\necho never\n", *args)
    info = done(cluster, job)
    assert info["JobState"] == "FAILED"
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert reason in out and "never" not in out, out
    _no_drain(cluster)


def test_memory_lowered_after_submit_is_caught_by_the_prolog(cluster, jobdir):
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=300M\necho never\n", "-H")
    r = cluster.run("scontrol", "update", f"jobid={job}", "MinMemoryNode=100", user="vmwrapuser")
    assert r.returncode == 0, r.stderr   # Slurm lets users lower their job's memory
    assert cluster.job(job)["MinMemoryNode"] == "100M"
    cluster.run("scontrol", "release", job, user="vmwrapuser", check=True)
    assert done(cluster, job)["JobState"] == "FAILED"
    out = (jobdir / f"slurm-{job}.out").read_text()
    assert "--memory=300M is more than the job's allocation of 100M" in out and "never" not in out, out
    _no_drain(cluster)
