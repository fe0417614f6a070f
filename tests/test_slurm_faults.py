"""Issue 20's fault matrix on real Slurm: each fault ends with the job's documented fate, the node still
in service, and nothing of the job left on any node (VM, run dir, cache pins, its processes, partial
checkpoints).

Real Slurm 22.05 (3 nodes), real libvirtd and QEMU guests; the faults are real ones (SIGKILL, a daemon
restarted, a full store), not simulated in code.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path

import pytest

from harness.padded_image import padded
from harness.processes import crash, matching
from harness.slurm_cluster import NODES
from harness.slurm_jobs import FINAL, module_cluster, submit, values, wait_for
from harness.slurm_jobs import jobdir as new_jobdir
from harness.site_store import store_elsewhere
from vmwrap import checkpoint
from vmwrap import config as vmwrap_config
from vmwrap.cache import Cache
from vmwrap.resources import HOOKS

pytestmark = pytest.mark.vm
ROOT = Path(__file__).resolve().parents[1]
WAITER = "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho up; while [ ! -e go ]; do sleep 1; done; echo done\n"
N = 20
COUNTER = ("#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\n{extra}"
           f"i=0; while [ $i -lt {N} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")


BIG = Path(f"/var/tmp/vmwrap-faults-images-{os.getpid()}")


@pytest.fixture(scope="module")
def big(appliance):
    """busybox-big: the appliance with a 4 MiB longer initrd (a second image for the cache case)."""
    shutil.rmtree(BIG, ignore_errors=True)
    yield padded(appliance, BIG, "busybox-big", 4 << 20)
    shutil.rmtree(BIG, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(appliance, big, virt_type, test_user):
    with module_cluster("faults", appliance, virt_type, images=(big,)) as c:
        try:
            yield c
        finally:
            subprocess.run(["umount", str(c.base / "checkpoints")], capture_output=True)


@pytest.fixture
def jobdir(cluster, test_user):
    return new_jobdir(cluster, test_user)


def output(d: Path, job: str) -> str:
    p = d / f"slurm-{job}.out"
    return p.read_text(errors="replace") if p.exists() else ""


def qemu_pid(job: str) -> int | None:
    r = subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True, text=True)
    return int(r.stdout.split()[0]) if r.returncode == 0 and r.stdout.split() else None


def drained(cluster) -> list[str]:
    r = cluster.run("sinfo", "-h", "-N", "-o", "%N %T %E")
    return [ln for ln in r.stdout.splitlines() if "drain" in ln.lower() or "down" in ln.lower()]


def leftovers(cluster, job: str) -> list[str]:
    """Everything of `job` vmwrap could leave behind on any node or in the shared store."""
    found = []
    names = subprocess.run(["virsh", "-c", "qemu:///system", "list", "--all", "--name"], capture_output=True,
                           text=True).stdout.split()
    if f"vmwrap-{job}" in names:
        found.append("vm")
    for n in NODES:
        if (cluster.node_dir(n) / "state" / "jobs" / job).exists():
            found.append(f"run dir on {n}")
        pins = cluster.node_dir(n) / "cache" / "pins"
        if pins.is_dir() and any((s / job).exists() for s in pins.iterdir()):
            found.append(f"pin on {n}")
    procs = subprocess.run(["pgrep", "-af", f"/state/jobs/{job}/"], capture_output=True, text=True).stdout
    found += [f"process {ln[:120]}" for ln in procs.splitlines()]
    store = cluster.base / "checkpoints"
    if store.is_dir():
        found += [f"store {p.name}" for p in store.iterdir() if p.name == job or p.name.startswith(job + ".")]
    return found


def clean(cluster, job: str) -> None:
    """The epilog runs after the job's end is reported: allow it a moment, then nothing may be left."""
    try:
        wait_for(lambda: not leftovers(cluster, job), f"job {job}'s leftovers to go", timeout=60)
    except AssertionError:
        raise AssertionError(f"job {job} left {leftovers(cluster, job)}") from None


def running(cluster, d: Path, job: str, text: str = "up") -> None:
    wait_for(lambda: text in output(d, job), f"job {job} to print {text!r}", timeout=300)


@pytest.mark.timeout(600)
def test_the_jobs_qemu_killed_fails_the_job_with_a_reason_and_keeps_the_node(cluster, jobdir):
    job = submit(cluster, jobdir, WAITER, "-w", "c1")
    running(cluster, jobdir, job)
    os.kill(qemu_pid(job), signal.SIGKILL)
    info = cluster.wait_state(job, FINAL, timeout=180)
    out = output(jobdir, job)
    assert (info["JobState"], info["ExitCode"]) == ("FAILED", "70:0"), (info, out)
    assert "vmwrap: the guest died without reporting an exit status" in out, out
    assert not drained(cluster)
    clean(cluster, job)


@pytest.mark.exclusive  # restarts the host's libvirtd (see conftest)
@pytest.mark.timeout(600)
def test_libvirtd_restarted_mid_job_the_job_goes_on(cluster, jobdir):
    job = submit(cluster, jobdir, WAITER, "-w", "c2")
    running(cluster, jobdir, job)
    subprocess.run(["pkill", "-x", "libvirtd"], check=True)
    wait_for(lambda: subprocess.run(["pgrep", "-x", "libvirtd"], capture_output=True).returncode != 0,
             "libvirtd to exit", timeout=30)
    assert qemu_pid(job), "the guest died with libvirtd"
    subprocess.run(["bash", str(ROOT / "scripts" / "start-libvirtd.sh")], check=True)
    # the node agent (root's libvirt connection for the job's pause/resume) survived the restart too
    cluster.run("scontrol", "suspend", job, check=True)
    wait_for(lambda: domstate(job) == "paused", "the VM to pause after libvirtd's restart", timeout=30)
    cluster.run("scontrol", "resume", job, check=True)
    wait_for(lambda: domstate(job) == "running", "the VM to resume", timeout=30)
    (jobdir / "go").write_text("")
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(jobdir, job))
    assert output(jobdir, job) == "up\ndone\n"
    assert not drained(cluster)
    clean(cluster, job)


@pytest.mark.timeout(600)
def test_slurmd_killed_mid_job_and_restarted_the_job_goes_on(cluster, jobdir):
    job = submit(cluster, jobdir, WAITER, "-w", "c3")
    running(cluster, jobdir, job)
    argv = ["slurmd", "-D", "-N", "c3", "-f", str(cluster.conf)]
    pids = subprocess.run(["pgrep", "-f", "-x", " ".join(argv)], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGKILL)
    time.sleep(2)
    assert qemu_pid(job), "the guest died with slurmd"
    cluster.procs.append(subprocess.Popen(argv, env=cluster.env, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True))
    time.sleep(3)
    (jobdir / "go").write_text("")
    info = cluster.wait_state(job, FINAL, timeout=180)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(jobdir, job))
    assert output(jobdir, job) == "up\ndone\n"
    assert not drained(cluster)
    clean(cluster, job)


@pytest.mark.timeout(300)
def test_an_epilog_run_again_after_the_job_is_a_harmless_no_op(cluster, jobdir, test_user):
    job = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho once\n", "-w", "c1")
    info = cluster.wait_state(job, FINAL, timeout=300)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(jobdir, job))
    clean(cluster, job)
    from vmwrap.ledger import Ledger

    ledger = Ledger(cluster.node_dir("c1") / "state" / "ledger.sqlite")
    before = ledger.events(job)
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SLURM_JOB_ID": job, "SLURMD_NODENAME": "c1",
           "SLURM_JOB_USER": test_user.pw_name, "SLURM_JOB_UID": str(test_user.pw_uid),
           "SLURM_JOB_GID": str(test_user.pw_gid), "SLURM_SCRIPT_CONTEXT": "epilog_slurmd",
           "SLURM_JOB_EXIT_CODE2": "0:0", "SLURM_CONF": str(cluster.conf)}
    for _ in range(2):
        r = subprocess.run([f"{HOOKS}/slurm-epilog", "--config", cluster.vmwrap_config], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, (r.stdout, r.stderr)
    assert ledger.events(job) == before      # nothing happened twice: no second "exited"
    assert output(jobdir, job) == "once\n"
    assert not drained(cluster)
    clean(cluster, job)


@pytest.mark.timeout(600)
@pytest.mark.parametrize("policy", ["restart", "fail"])
def test_a_full_checkpoint_store_gives_the_job_its_lost_checkpoint_policy_not_the_node(cluster, jobdir, policy):
    """`scontrol requeue` saves the VM; the shared store has 8 MiB left, the guest's memory needs more.
    The save fails, no partial checkpoint stays, the job follows --on-lost-checkpoint, the node serves on."""
    store = cluster.base / "checkpoints"
    store.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "vmwrap-full-store", str(store)], check=True)
    try:
        checkpoint.init_store(store, cluster.base / "checkpoint.key")  # new storage: `vmwrap checkpoints init`
        extra = "#VMWRAP --on-lost-checkpoint=restart\n" if policy == "restart" else ""
        job = submit(cluster, jobdir, COUNTER.format(extra=extra), "-p", "requeue", "-w", "c2")
        wait_for(lambda: len(values(output(jobdir, job))) >= 4, "the job to count to 4", timeout=300)
        assert cluster.run("scontrol", "requeue", job).returncode == 0
        info = cluster.wait_state(job, FINAL, timeout=300)
        out = output(jobdir, job)
        if policy == "restart":
            assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), (info, out)
            assert "starting the job again from the beginning" in out, out
            assert values(out)[-N:] == list(range(1, N + 1)), out
        else:
            assert (info["JobState"], info["ExitCode"]) == ("FAILED", "66:0"), (info, out)
            assert "not starting the job again from the beginning" in out, out
        assert re.search(r"sav\w* its VM on c2 failed: .*(No space left|space)", out, re.I), out
        assert not drained(cluster)
        clean(cluster, job)
    finally:
        subprocess.run(["umount", str(store)], check=True)


def domstate(job: str) -> str:
    return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"vmwrap-{job}"], capture_output=True,
                          text=True).stdout.strip()


@pytest.mark.timeout(600)
def test_the_node_agent_killed_while_the_job_is_suspended_the_job_resumes_once_it_is_back(cluster, jobdir):
    """The agent pauses and resumes VMs for the payload (which runs as the job's user). Killed while the job
    is suspended, `scontrol resume` cannot reach it: the job must not sleep until its time limit; it resumes
    when the agent is back (the init system restarts it)."""
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-w", "c1")
    wait_for(lambda: len(values(output(jobdir, job))) >= 3, "the job to count to 3", timeout=300)
    cluster.run("scontrol", "suspend", job, check=True)
    wait_for(lambda: domstate(job) == "paused", "the VM to pause", timeout=30)
    argv = ["vmwrap", "--config", str(cluster.base / "vmwrap-c1.toml"), "agent"]
    pids = subprocess.run(["pgrep", "-f", "--", " ".join(argv[1:]) + "$"], capture_output=True, text=True).stdout.split()
    assert len(pids) == 1, pids
    os.kill(int(pids[0]), signal.SIGKILL)
    cluster.run("scontrol", "resume", job, check=True)
    time.sleep(5)
    assert domstate(job) == "paused"          # nobody could resume it yet
    env = {k: v for k, v in cluster.env.items() if k != "VMWRAP_CONFIG"}
    cluster.procs.append(subprocess.Popen(argv, env=env, start_new_session=True, stdout=subprocess.DEVNULL))
    info = cluster.wait_state(job, FINAL, timeout=180)
    out = output(jobdir, job)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, out)
    assert values(out) == list(range(1, N + 1)), out
    assert "vmwrap: the VM resumed" in out, out
    assert not drained(cluster)
    clean(cluster, job)


@pytest.mark.timeout(600)
def test_after_a_host_reboot_the_restarted_agent_repairs_the_node(cluster, jobdir):
    """Every process of node c3 dies at once (slurmd, the node agent, the job's step, payload, 9P server and
    QEMU); its state dirs stay. When slurmd and the agent (`vmwrap agent --reconcile slurm`) start again,
    Slurm ends the job and the agent removes what it left, with a ledger record."""
    job = submit(cluster, jobdir, WAITER, "-w", "c3", "--no-requeue")
    running(cluster, jobdir, job)
    slurmd = ["slurmd", "-D", "-N", "c3", "-f", str(cluster.conf)]
    agent = ["vmwrap", "--config", str(cluster.base / "vmwrap-c3.toml"), "agent"]
    crash(matching(" ".join(slurmd)) + matching(" ".join(agent[1:]) + "$") + matching(rf"slurmstepd: \[{job}\.")
                   + matching(f"/state/jobs/{job}/") + [qemu_pid(job)])
    wait_for(lambda: qemu_pid(job) is None, "QEMU to die", timeout=30)
    left = leftovers(cluster, job)
    assert "run dir on c3" in left, left       # what the "reboot" left: the reconcile has work to do
    # What slurmctld does once c3 stays silent for SlurmdTimeout (the host did not really reboot here, so
    # its boot time would not tell slurmctld the job is gone): the node is down, its jobs NODE_FAIL.
    r = cluster.run("scontrol", "update", "nodename=c3", "state=down", "reason=host rebooted")
    assert r.returncode == 0, r.stderr
    env = {k: v for k, v in cluster.env.items() if k != "VMWRAP_CONFIG"}
    info = cluster.wait_state(job, FINAL, timeout=120)
    assert info["JobState"] == "NODE_FAIL", info
    # Boot order: the agent (with its repair pass) comes up before slurmd, as its unit orders it.
    cluster.procs.append(subprocess.Popen(agent + ["--reconcile", "slurm", "--reconcile-interval", "10"], env=env,
                                          start_new_session=True, stdout=subprocess.DEVNULL,
                                          stderr=open(cluster.base / "agent-c3-reboot.log", "w")))
    clean(cluster, job)
    from vmwrap.ledger import Ledger

    events = Ledger(cluster.node_dir("c3") / "state" / "ledger.sqlite").events(job)
    assert [e["detail"]["removed"][:1] for e in events if e["event"] == "reconciled"] == [["run dir"]], events
    cluster.procs.append(subprocess.Popen(slurmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
    r = cluster.run("scontrol", "update", "nodename=c3", "state=resume")   # unless ReturnToService=2 did
    assert r.returncode == 0 or "Invalid node state" in r.stderr, r.stderr
    wait_for(lambda: not drained(cluster), "c3 back in service", timeout=120)


def _store_elsewhere(cluster, node: str, local: Path) -> str:
    return store_elsewhere(cluster.base / f"vmwrap-{node}.toml", cluster.base / "checkpoints", local)


def _ledger(cluster, node: str, job: str) -> list[dict]:
    from vmwrap.ledger import Ledger

    path = cluster.node_dir(node) / "state" / "ledger.sqlite"
    return Ledger(path).events(job) if path.exists() else []


@pytest.mark.timeout(600)
def test_a_restart_on_a_node_without_the_shared_store_drains_that_node_and_restores_elsewhere(cluster, jobdir):
    """Issue 20: a saved job restarts on c3, where the store's path is an empty local directory (the
    shared storage not mounted). The prolog refuses as the node's fault (c3 drained with a reason naming
    the store) instead of starting the job from the beginning; on c1 it restores and every value of its
    counter is printed exactly once."""
    local = cluster.base / "c3-not-mounted"
    before = _store_elsewhere(cluster, "c3", local)
    job = None
    try:
        job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue", "-w", "c1", "--open-mode=append")
        wait_for(lambda: len(values(output(jobdir, job))) >= 4, "the job to count to 4", timeout=300)
        assert cluster.run("scontrol", "requeuehold", job).returncode == 0
        wait_for(lambda: (cluster.base / "checkpoints" / job / "manifest.json").exists(), "the checkpoint", timeout=120)
        assert cluster.run("scontrol", "update", f"jobid={job}", "nodelist=c3").returncode == 0
        assert cluster.run("scontrol", "release", job).returncode == 0
        wait_for(lambda: any(ln.startswith("c3 ") for ln in drained(cluster)), "c3 to be taken out", timeout=120)
        node = cluster.run("scontrol", "-o", "show", "node", "c3").stdout
        assert f"Reason=vmwrap: the checkpoint store {local} has no .vmwrap-store stamp" in node, node
        assert "never initialised (`vmwrap checkpoints init`" in node, node  # Slurm keeps 200 characters
        assert not any(e["event"] in ("created", "restored") for e in _ledger(cluster, "c3", job)), \
            _ledger(cluster, "c3", job)                      # not started there, neither fresh nor restored
        assert list(local.iterdir()) == []                   # nothing of the job on c3's own disk
        wait_for(lambda: cluster.job(job)["JobState"] == "PENDING", "the job to wait again", timeout=120)
        assert cluster.run("scontrol", "update", f"jobid={job}", "nodelist=c1").returncode == 0
        cluster.run("scontrol", "release", job)             # if Slurm held it after the failed launch
        info = cluster.wait_state(job, FINAL, timeout=300)
        out = output(jobdir, job)
        assert (info["JobState"], info["ExitCode"], info["NodeList"]) == ("COMPLETED", "0:0", "c1"), (info, out)
        assert values(out) == list(range(1, N + 1)), out
        assert "restored" in [e["event"] for e in _ledger(cluster, "c1", job)]
        clean(cluster, job)
    finally:
        (cluster.base / "vmwrap-c3.toml").write_text(before)
        if job:
            cluster.run("scancel", job)
        cluster.run("scontrol", "update", "nodename=c3", "state=resume")
        shutil.rmtree(local, ignore_errors=True)
    wait_for(lambda: not drained(cluster), "c3 back in service", timeout=60)


@pytest.mark.timeout(600)
def test_a_store_unreachable_during_the_save_gives_the_job_its_lost_checkpoint_policy_not_the_node(cluster, jobdir):
    """Issue 20's fault matrix: the shared store disappears from c2 (its path now an empty local
    directory) just before `scontrol requeue` saves the job's VM. The save fails (nothing written to
    c2's own disk), the restart follows --on-lost-checkpoint (fail: exit 66), c2 is not drained."""
    local = cluster.base / "c2-not-mounted"
    job = submit(cluster, jobdir, COUNTER.format(extra=""), "-p", "requeue", "-w", "c2")
    cfg = cluster.base / "vmwrap-c2.toml"
    before = None
    try:
        wait_for(lambda: len(values(output(jobdir, job))) >= 4, "the job to count to 4", timeout=300)
        before = _store_elsewhere(cluster, "c2", local)
        assert cluster.run("scontrol", "requeuehold", job).returncode == 0
        wait_for(lambda: "save_failed" in [e["event"] for e in _ledger(cluster, "c2", job)], "the failed save", 120)
        [failed] = [e for e in _ledger(cluster, "c2", job) if e["event"] == "save_failed"]
        assert f"checkpoint store {local} has no .vmwrap-store stamp" in failed["detail"]["message"], failed
        assert list(local.iterdir()) == []
        cfg.write_text(before)                               # the storage is back for the restart
        before = None
        assert not drained(cluster)
        assert cluster.run("scontrol", "release", job).returncode == 0
        info = cluster.wait_state(job, FINAL, timeout=300)
        out = output(jobdir, job)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "66:0"), (info, out)
        assert "has no checkpoint to continue from" in out, out
        assert "not starting the job again from the beginning" in out, out
        assert not drained(cluster)
        clean(cluster, job)
    finally:
        if before is not None:
            cfg.write_text(before)
        cluster.run("scancel", job)
        shutil.rmtree(local, ignore_errors=True)


def fetches(cluster, node: str, job: str, sha: str) -> list[tuple[str, int]]:
    return [(e["event"], e["detail"]["bytes"]) for e in _ledger(cluster, node, job)
            if e["event"] in ("cache_hit", "cache_miss") and e["detail"]["sha256"] == sha]


@pytest.mark.timeout(900)
def test_two_jobs_fetch_one_image_into_a_nearly_full_cache(cluster, jobdir, appliance, big):
    """c3's cache holds the busybox image and has room for busybox-big only once an older blob goes.
    Two busybox-big jobs released together on c3: one fetch, both run, the old blob is evicted, no
    partial file stays. Then, with a busybox job holding its blobs, a busybox-big job fails with the
    cache-full reason (exit 69) and c3 is not drained, while the busybox job finishes as usual."""
    warm = submit(cluster, jobdir, "#!/bin/sh\n#VMWRAP --image=busybox --memory=128M\necho warm\n", "-w", "c3")
    assert cluster.wait_state(warm, FINAL, timeout=300)["JobState"] == "COMPLETED"
    cache = Cache(cluster.node_dir("c3") / "cache", 1 << 40)
    old = appliance.initrd
    assert old.sha256 in {e.sha256 for e in cache.entries()}
    bound = cache.used_bytes() + big.initrd.size - old.size // 2   # fits only once the old initrd goes
    conf = cluster.base / "vmwrap-c3.toml"
    before = conf.read_text()
    conf.write_text(vmwrap_config.render({**tomllib.loads(before), "cache_max_bytes": bound}))
    script = "#!/bin/sh\n#VMWRAP --image=busybox-big --memory=128M\necho big $$\n"
    try:
        jobs = [submit(cluster, jobdir, script, "-w", "c3", "-H") for _ in range(2)]
        assert cluster.run("scontrol", "release", ",".join(jobs)).returncode == 0
        for j in jobs:
            info = cluster.wait_state(j, FINAL, timeout=300)
            assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), (info, output(jobdir, j))
            assert output(jobdir, j).startswith("big "), output(jobdir, j)
        got = sorted(f for j in jobs for f in fetches(cluster, "c3", j, big.initrd.sha256))
        assert got == [("cache_hit", 0), ("cache_miss", big.initrd.size)], got     # one fetch
        left = {e.sha256 for e in cache.entries()}
        assert big.initrd.sha256 in left and old.sha256 not in left, left
        assert cache.used_bytes() <= bound and os.listdir(cache.root / "tmp") == []
        for j in jobs:
            clean(cluster, j)

        holder = submit(cluster, jobdir, WAITER, "-w", "c3")    # busybox's initrd again: the big one goes
        running(cluster, jobdir, holder)
        refused = submit(cluster, jobdir, script, "-w", "c3")
        info = cluster.wait_state(refused, FINAL, timeout=300)
        out = output(jobdir, refused)
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "69:0"), (info, out)
        assert "image cache full" in out and f"jobs {holder}" in out, out
        assert not drained(cluster)
        (jobdir / "go").touch()
        info = cluster.wait_state(holder, FINAL, timeout=180)
        assert info["JobState"] == "COMPLETED" and "done" in output(jobdir, holder), info
        assert os.listdir(cache.root / "tmp") == []
        for j in (refused, holder):
            clean(cluster, j)
    finally:
        conf.write_text(before)
