"""`srun` inside a vmwrap job's VM runs real Slurm steps (vmwrap/steps.py, vmwrap-srun.c).

Real Slurm 22.05 (3 nodes, slurmdbd for sacct), real VMs. The same script runs bare and in a VM: its
output, exit codes and the steps sacct records must match. Jobs of a test are submitted together.
"""

from __future__ import annotations

import os
import re
import signal
import tempfile
from pathlib import Path

import pytest

from harness.slurm_jobs import jobdir as make_jobdir
from harness.processes import matching
from harness.slurm_jobs import module_cluster, submit, values, wait_for
from vmwrap import rundir

pytestmark = pytest.mark.vm
VM = "#VMWRAP --image=busybox\n"
FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}

STEPS = """\
echo before
srun sh -c 'echo "step $SLURM_JOB_ID.$SLURM_STEP_ID proc $SLURM_PROCID of $SLURM_NTASKS"; echo to-err >&2; exit 3'
echo "rc=$?"
srun false; echo "rc=$?"
srun -n 2 -l sh -c 'echo "task $SLURM_PROCID"'
echo "rc=$?"
srun sh -c 'kill -9 $$'; echo "rc=$?"
x=$(srun echo captured); echo "got $x"
echo after
"""


@pytest.fixture(scope="module")
def cluster(appliance, virt_type, test_user):
    with module_cluster("steps", appliance, virt_type, accounting=True) as c:
        yield c


@pytest.fixture
def jobdir(cluster, test_user):
    return make_jobdir(cluster, test_user)


def done(cluster, job, timeout=180):
    try:
        return cluster.wait_state(job, FINAL, timeout)
    except AssertionError:  # what the job wrote so far says where it stopped
        for f in sorted(cluster.base.glob("work/*/*")):
            print("==", f, f.read_text(errors="replace")[-3000:] if f.is_file() else "")
        raise


def steps(cluster, job):
    """sacct's steps of a job: {suffix: (name, state, exit code)} once the job's record is final."""
    def read():
        out = cluster.run("sacct", "-n", "-P", "-j", job, "-o", "JobID,JobName,State,ExitCode").stdout
        rows = {f[0].partition(".")[2] or "job": tuple(f[1:]) for f in (ln.split("|") for ln in out.splitlines() if ln)}
        return rows if rows.get("job", ("", "RUNNING"))[1] not in ("RUNNING", "PENDING", "") else None
    return wait_for(read, f"sacct to record job {job}", timeout=30)


# srun's notices that it waited for the previous step's resources: timing, not behaviour
RETRIED = re.compile(r"^srun: (Job \d+ step creation temporarily disabled, retrying .*|Step created for job \d+)$")


TASKS = re.compile(r"^(srun: error: NODE: )tasks? ([0-9][0-9,-]*): (.*)$")


def _per_task(line: str) -> list[str]:
    """srun's "tasks 0-1: X" as "task 0: X", "task 1: X": it groups tasks that ended close together."""
    m = TASKS.match(line)
    if not m:
        return [line]
    ids = []
    for part in m.group(2).split(","):
        lo, _, hi = part.partition("-")
        ids += range(int(lo), int(hi or lo) + 1)
    return [f"{m.group(1)}task {i}: {m.group(3)}" for i in ids]


def normal(text: str, job: str) -> list[str]:
    """Lines with the job id and node name taken out; srun's two task lines sorted (their order is free)."""
    text = re.sub(rf"\b{job}\.", "JOB.", text)
    text = re.sub(r"\bc[1-3]\b", "NODE", text)
    return sorted(x for ln in text.splitlines() if not RETRIED.match(ln) for x in _per_task(ln))


def order(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(("before", "rc=", "got", "after"))]


def test_srun_steps_match_a_bare_job(cluster, jobdir):
    bare = submit(cluster, jobdir, "#!/bin/sh\n" + STEPS, "-n", "2", "-e", str(jobdir / "bare-%j.err"))
    vm = submit(cluster, jobdir, "#!/bin/sh\n" + VM + STEPS, "-n", "2", "-e", str(jobdir / "vm-%j.err"))
    for job in (vm, bare):
        assert done(cluster, job, 60)["JobState"] == "COMPLETED"
    out = {j: (jobdir / f"slurm-{j}.out").read_text() for j in (bare, vm)}
    err = {j: (jobdir / f"{k}-{j}.err").read_text() for j, k in ((bare, "bare"), (vm, "vm"))}
    # in order, as the script wrote them (the job has 2 tasks: each step runs 2, as bare)
    assert order(out[vm]) == order(out[bare]) == ["before", "rc=3", "rc=1", "rc=0", "rc=137", "got captured", "after"]
    assert "step JOB.0 proc 1 of 2" in normal(out[vm], vm)
    assert normal(out[vm], vm) == normal(out[bare], bare)
    assert normal(err[vm], vm) == normal(err[bare], bare), (err[vm], err[bare])
    assert "to-err" in err[vm] and "srun: error: NODE: task 1: Exited with exit code 3" in normal(err[vm], vm)
    # sacct: the same steps, names, states and exit codes as bare
    bare_steps, vm_steps = steps(cluster, bare), steps(cluster, vm)
    assert {k: v for k, v in vm_steps.items() if k != "job"} == {k: v for k, v in bare_steps.items() if k != "job"}
    assert vm_steps["0"] == ("sh", "FAILED", "3:0") and vm_steps["1"] == ("false", "FAILED", "1:0")
    assert {"0", "1", "2", "3", "4", "batch"} <= set(vm_steps)


def test_steps_run_at_once_up_to_the_vms_step_ports_and_bad_options_are_refused(cluster, jobdir):
    """Four steps at once (a step port each), each waiting until all four have started: one port would
    never let them. A fifth waits for a free port, saying so, and then runs."""
    k = rundir.STEPS_PORTS
    # each step says it is in, waits (60 s at most) for the others, then holds its port until `go`
    meet = (f"srun --overlap sh -c 'touch in.$SLURM_STEP_ID; n=0; while [ $(ls in.* | wc -l) -lt {k} ] "
            "&& [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done; m=$(ls in.* | wc -l); "
            "while [ ! -e go ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done; echo met $m' &\n")
    job = submit(cluster, jobdir, "#!/bin/sh\n" + VM + meet * k +
                 "n=0; while [ $(ls in.* 2>/dev/null | wc -l) -lt " + str(k) + " ] && [ $n -lt 300 ]; do sleep 0.2; n=$((n+1)); done\n"
                 "srun --overlap echo fifth &\nsleep 3; touch go; wait\necho waited\n"
                 "srun -o /etc/passwd echo x; echo rc=$?\n"
                 "srun -N 0 echo x; echo rc=$?\n", "-e", str(jobdir / "err"))
    assert done(cluster, job)["JobState"] == "COMPLETED"
    out, err = (jobdir / f"slurm-{job}.out").read_text(), (jobdir / "err").read_text()
    lines = out.splitlines()
    assert sorted(lines[:k + 1]) == ["fifth"] + [f"met {k}"] * k and lines[k + 1:] == ["waited", "rc=1", "rc=1"], out
    assert f"{k} steps are running in this VM (as many as it runs at once); waiting for one to end" in err, err
    assert "srun option '-o' is not supported inside a vmwrap VM" in err
    assert "invalid value '0' for --nodes" in err


def test_hostile_bytes_on_the_step_port_are_ignored(cluster, jobdir):
    job = submit(cluster, jobdir, "#!/bin/sh\n" + VM +
                 "for p in /sys/class/virtio-ports/*; do [ \"$(cat $p/name)\" = org.vmwrap.steps ] && dev=/dev/${p##*/}; done\n"
                 "head -c 300000 /dev/urandom > $dev\n"
                 "printf 'VWS1Q\\000\\000\\000\\001\\000\\000\\377\\377\\377\\377' > $dev\n"
                 "head -c 200000 /dev/zero > $dev\n"
                 "srun echo still-works; echo rc=$?\n", "-e", str(jobdir / "err"))
    assert done(cluster, job)["JobState"] == "COMPLETED"
    assert (jobdir / f"slurm-{job}.out").read_text() == "still-works\nrc=0\n"
    assert "malformed bytes on the VM's step port" in (jobdir / "err").read_text()


def test_steps_still_run_after_the_vm_was_saved_and_restored(cluster, jobdir):
    job = submit(cluster, jobdir, "#!/bin/sh\n" + VM + "srun echo first\n"
                 "i=0; while [ $i -lt 12 ]; do i=$((i+1)); echo n=$i; sleep 1; done\nsrun echo second\n",
                 "-p", "requeue")
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and len(values(out.read_text())) >= 3, "the job to count to 3")
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    info = done(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    text = out.read_text()
    assert text.startswith("first\n") and text.endswith("n=12\nsecond\n") and values(text) == list(range(1, 13)), text


def test_a_step_in_flight_at_a_requeue_fails_cleanly_after_the_restore(cluster, jobdir):
    job = submit(cluster, jobdir, "#!/bin/sh\n" + VM + "srun sh -c 'echo started; sleep 25; echo slept'\n"
                 "echo rc=$?\necho end\n", "-p", "requeue", "-e", str(jobdir / "err"))
    out = jobdir / f"slurm-{job}.out"
    wait_for(lambda: out.exists() and "started" in out.read_text(), "the step to start")
    assert cluster.run("scontrol", "requeue", job).returncode == 0
    info = done(cluster, job)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", info
    assert out.read_text().endswith("rc=1\nend\n") and "slept" not in out.read_text(), out.read_text()


def stray_step_dirs() -> set[Path]:
    """What a job's step service left in the temp dirs (before issue 19: a /tmp/vmwrap-steps-* dir per
    payload that did not end by itself)."""
    return {p for d in {"/tmp", tempfile.gettempdir()} for p in Path(d).glob("vmwrap-steps-*")}


def job_process(job: str, pattern: str, what: str) -> tuple[int, list[bytes]]:
    """(pid, argv) of the process of `job` whose command line matches `pattern`."""
    def find():
        for pid in matching(pattern):
            try:
                argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if f"SLURM_JOB_ID={job}".encode() in env:
                return pid, argv
        return None
    return wait_for(find, f"job {job}'s {what}", timeout=30)


def test_a_job_killed_during_a_step_leaves_nothing_of_its_step_service(cluster, jobdir):
    """Issue 19: a payload SIGKILLed (OOM, a node agent killing the tree, a time limit past KillWait)
    has no time to clean up; whatever its step service made must still go with the job. The same after
    scancel's kill (Slurm's SIGTERM first) and for a job that ends by itself."""
    before = stray_step_dirs()
    script = "srun sh -c 'echo started; sleep 300'\necho not-reached\n"
    killed = submit(cluster, jobdir, "#!/bin/sh\n" + VM + script)
    bare = submit(cluster, jobdir, "#!/bin/sh\n" + script)
    cancelled = submit(cluster, jobdir, "#!/bin/sh\n" + VM + script)
    ends = submit(cluster, jobdir, "#!/bin/sh\n" + VM + "srun echo stepped; echo rc=$?\n")
    out = {j: jobdir / f"slurm-{j}.out" for j in (killed, bare, cancelled, ends)}
    for job in (killed, bare, cancelled):
        wait_for(lambda: out[job].exists() and "started" in out[job].read_text(), f"job {job}'s step to start")
    socks = []
    for job in (killed, cancelled):  # the socket the step's task (python -m vmwrap_plugins.slurm.task SOCK ...) reached
        _, argv = job_process(job, "-m vmwrap_plugins[.]slurm[.]task ", "step task")
        socks.append(os.fsdecode(argv[argv.index(b"vmwrap_plugins.slurm.task") + 1]))
        assert os.path.exists(socks[-1])
    for job in (killed, bare):  # the batch step's process: the VM job's payload, the bare job's shell
        pid, _ = job_process(job, "slurm_script", "batch step")
        os.kill(pid, signal.SIGKILL)
    assert cluster.run("scancel", "--signal=KILL", "--full", cancelled).returncode == 0
    info = {j: done(cluster, j) for j in (killed, bare, cancelled, ends)}
    assert info[ends]["JobState"] == "COMPLETED" and out[ends].read_text() == "stepped\nrc=0\n"
    # Slurm ends the VM job as it ends the bare one, and neither got past its step
    assert [info[j][k] for j in (killed, bare) for k in ("JobState", "ExitCode")] == ["FAILED", "0:9"] * 2, info
    assert info[cancelled]["JobState"] == "CANCELLED", info[cancelled]
    # (The cancelled job's step and batch step get their SIGKILL separately: its script may print
    # not-reached in between, as a loaded host showed once. Killing the batch step first leaves none.)
    assert not any("not-reached" in out[j].read_text() for j in (killed, bare))
    # the epilogs ran: the run dirs are gone, and with them the step service's socket; nothing in /tmp
    run_dirs = [cluster.node_dir(n) / "state" / "jobs" / j for n in ("c1", "c2", "c3") for j in (killed, cancelled, ends)]
    wait_for(lambda: not any(os.path.lexists(d) for d in run_dirs), "the epilogs to remove the run dirs", timeout=60)
    for sock in socks:
        assert not os.path.lexists(sock) and not os.path.lexists(os.path.dirname(sock)), sock
    assert not stray_step_dirs() - before, stray_step_dirs() - before
