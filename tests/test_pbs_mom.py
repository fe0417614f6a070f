"""PBS Professional / OpenPBS mom hooks (vmwrap/hooks/pbs-mom.py) as pbs_mom runs them.

harness/pbs_standin.py is the `pbs` module (only the documented API, each part citing its OpenPBS
source) and a pbs_mom at the points where it calls the hook: execjob_begin when the job arrives
(src/server/req_quejob.c, mom side), execjob_launch in the job's first process before the exec
(src/resmom/start_exec.c: progname/argv replace the login shell, whose stdin names the spooled
script, SHELL_INVOKE=1), execjob_end after the job (src/resmom/mom_comm.c), qsig -s suspend =
SIGSTOP then execjob_postsuspend, resume = execjob_preresume then SIGCONT (src/resmom/requests.c),
qdel = SIGTERM then SIGKILL. What a reject means per event: MomResult.outcome. The VMs, libvirt,
QEMU and the node agent are real."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.pbs_standin import (EXECJOB_BEGIN, EXECJOB_LAUNCH, EXECJOB_PRERESUME, ND_OFFLINE, Event, Job, Mom,
                                 clean_up, hook_config, mom_hook, node_agent, output, site_dirs, wait_for)
from vmwrap.config import Settings, render
from vmwrap.resources import HOOKS

HOOK = HOOKS / "pbs-mom.py"


@pytest.fixture
def light(tmp_path, test_user):
    """A mom whose vmwrap has an empty catalog: no VM can boot (no lock needed)."""
    base = Path(f"/var/tmp/vmwrap-pbsl-{os.getpid()}-{os.urandom(2).hex()}")
    work = site_dirs(base, test_user)
    (base / "images.toml").write_text("")
    cfg = base / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(base / "images.toml"), "state_dir": str(base / "state")}))
    mom = Mom(base, "node1", HOOK, hook_config(base / "hook.json", cfg))
    yield mom, work, Settings(state_dir=str(base / "state"))
    shutil.rmtree(base, ignore_errors=True)


def test_job_without_a_vm_request_runs_its_login_shell(light, test_user):
    """No -v/-l image and no #VMWRAP image: begin boots nothing, launch leaves the login shell."""
    mom, work, settings = light
    job = mom.job(test_user, "#!/bin/sh\necho out; echo err >&2; pwd; echo $PBS_JOBID; exit 3\n", work, name="bare")
    assert mom.start(job) == "running", job.history
    assert mom.wait(job) == 3
    assert output(job) == (f"out\n{test_user.pw_dir}\n{job.id}\n", "err\n")
    assert not (Path(settings.state_dir) / "jobs").exists() or not any((Path(settings.state_dir) / "jobs").iterdir())


def test_a_users_mistake_fails_the_job_through_its_payload_not_the_node(light, test_user):
    """An unknown image (-v VMWRAP_IMAGE or #VMWRAP): begin accepts (a reject would requeue the job
    and never offline for a user's error), launch substitutes vmwrap's payload for the shell, which
    prints why in the job's .e file and exits 64 (EXIT_USER); execjob_end removes what was left."""
    mom, work, settings = light
    for script, variables in (("#!/bin/sh\necho never\n", {"VMWRAP_IMAGE": "nope"}),
                              ("#!/bin/sh\n#VMWRAP --image=nope\necho never\n", {})):
        job = mom.job(test_user, script, work, name="mistake", variables=variables)
        assert mom.start(job) == "running", job.history
        assert mom.wait(job) == 64
        out, err = output(job)
        assert out == "" and "vmwrap: error: unknown image 'nope'" in err, err
        assert mom.vnode.state == 0
        assert not (Path(settings.state_dir) / "jobs" / f"{job.seq}.pbssrv").exists()


def test_a_vm_job_on_several_hosts_names_its_image_at_qsub(light, test_user):
    """Only the primary execution host gets the job script: a job spanning hosts whose image is named
    only by `#VMWRAP` fails through its payload (exit 64) saying so; the vnode stays up. One host,
    several chunks, is one VM as ever."""
    mom, work, settings = light
    job = mom.job(test_user, "#!/bin/sh\n#VMWRAP --image=nope\necho never\n", work, name="wide",
                  exec_host="node1/0*2+node2/0*2")
    assert mom.start(job) == "running", job.history
    assert mom.wait(job) == 64
    out, err = output(job)
    assert out == "" and ("vmwrap: error: the job runs on 2 hosts and names its image only in the script, which "
                          "the other hosts never get: name it at qsub (-l vmwrap_image=NAME or -v VMWRAP_IMAGE=NAME)"
                          ) in err, err
    assert mom.vnode.state == 0
    job = mom.job(test_user, "#!/bin/sh\n#VMWRAP --image=nope\necho never\n", work, name="one",
                  exec_host="node1/0*2+node1/1*2")
    assert mom.start(job) == "running", job.history
    assert mom.wait(job) == 64
    assert "unknown image 'nope'" in output(job)[1]   # past the host check, to the catalog's


def test_a_host_of_the_job_that_does_not_resolve_fails_the_job_not_the_node(light, test_user):
    mom, work, settings = light
    job = mom.job(test_user, "#!/bin/sh\necho never\n", work, name="far", variables={"VMWRAP_IMAGE": "nope"},
                  exec_host="localhost/0*2+node1/0*2")
    assert mom.start(job) == "running", job.history
    assert mom.wait(job) == 69   # EX_UNAVAILABLE: the site's, not the user's mistake
    assert "vmwrap: error: cannot resolve host 'node1' of the job's exec_host" in output(job)[1]   # this mom's name
    assert mom.vnode.state == 0


def test_abort_removes_what_begin_left(light, test_user):
    """execjob_abort (mom_comm.c: the job was aborted after begin, e.g. a sister failed to join): the
    job's run dir (here a failed begin's) is removed as by execjob_end."""
    from harness.pbs_standin import EXECJOB_ABORT

    mom, work, settings = light
    job = mom.job(test_user, "#!/bin/sh\ntrue\n", work, variables={"VMWRAP_IMAGE": "nope"})
    (mom.jobs / f"{job.id}.SC").write_text(job.script)
    assert mom._event(EXECJOB_BEGIN, job).accepted
    run_dir = Path(settings.state_dir) / "jobs" / job.id
    assert run_dir.exists()
    assert mom._event(EXECJOB_ABORT, job).accepted and not run_dir.exists()


def test_a_bare_job_is_not_taken_for_a_vm_job_by_a_crashed_runs_leftovers(light, test_user):
    mom, work, settings = light
    job = mom.job(test_user, "#!/bin/sh\necho bare\n", work, name="left")
    stale = Path(settings.state_dir) / "jobs" / job.id
    stale.mkdir(parents=True)
    (stale / "job.json").write_text("{}")
    assert mom.start(job) == "running" and mom.wait(job) == 0
    assert output(job) == ("bare\n", "") and not stale.exists()


def test_gc_deletes_checkpoints_of_jobs_deleted_while_queued(light, test_user):
    """`vmwrap pbs gc`: a rerun job's checkpoint (with its PBS id recorded beside it by execjob_end)
    goes once qstat says the job is unknown (exit 153) or finished (F); a queued job's, one without a
    record, or any answer from an unreachable server stays."""
    from harness.pbs_standin import qstat_command

    mom, _, settings = light
    cfg = Path(mom.hook_config).parent / "vmwrap.toml"
    store = Path(settings.state_dir).parent / "store"
    cfg.write_text(cfg.read_text() + f'checkpoint_dir = "{store}"\n')
    store.mkdir(mode=0o700)
    ids = {"301.pbssrv": "Q", "302.pbssrv": "F", "303.pbssrv": None, "304.pbssrv": None}
    for jid in ids:
        (store / jid).mkdir()
        (store / jid / "manifest.json").write_text("{}")
        if jid != "304.pbssrv":
            (store / f".{jid}.pbs.json").write_text(json.dumps({"job": jid + ".example.org"}))

    def gc(reachable: bool) -> subprocess.CompletedProcess:
        qstat = qstat_command(store.parent / "qstat", {j + ".example.org": st for j, st in ids.items() if st},
                              reachable)
        return subprocess.run(["/opt/vmwrap/venv/bin/python", "-I", "-m", "vmwrap_plugins.pbs", "--config", str(cfg),
                               "pbs", "gc", "--once", "--qstat", str(qstat)], capture_output=True, text=True,
                              timeout=120, env={}, cwd="/")

    r = gc(reachable=False)
    assert r.returncode == 0 and all((store / j).exists() for j in ids), r.stderr
    r = gc(reachable=True)
    assert r.returncode == 0, r.stderr
    assert sorted(j for j in ids if (store / j).exists()) == ["301.pbssrv", "304.pbssrv"], r.stdout + r.stderr
    assert not (store / ".302.pbssrv.pbs.json").exists() and (store / ".301.pbssrv.pbs.json").exists()


def test_launch_rewrites_progname_and_argv_only_for_a_vm_job(light, test_user):
    """execjob_launch: e.progname/e.argv are the writable launch parameters (_svr_types.py)."""
    mom, work, _ = light
    bare = mom.job(test_user, "#!/bin/sh\ntrue\n", work)
    r = mom_hook(HOOK, Event(EXECJOB_LAUNCH, Job(id=bare.id), progname="/bin/sh", argv=["-sh"]),
                 pbs_home=str(mom.home), hook_config=str(mom.hook_config))
    assert r.accepted and (r.event.progname, r.event.argv) == ("/bin/sh", ["-sh"])
    vm = mom.job(test_user, "#!/bin/sh\ntrue\n", work, variables={"VMWRAP_IMAGE": "nope"})
    (mom.jobs / f"{vm.id}.SC").write_text(vm.script)
    assert mom._event(EXECJOB_BEGIN, vm).accepted
    r = mom_hook(HOOK, Event(EXECJOB_LAUNCH, Job(id=vm.id), progname="/bin/sh", argv=["-sh"]),
                 pbs_home=str(mom.home), hook_config=str(mom.hook_config))
    assert r.accepted and r.event.progname == str(HOOKS / "pbs-job")
    cfg = str(Path(mom.hook_config).parent / "vmwrap.toml")
    assert r.event.argv == ["pbs-job", "--config", cfg, "--pbs-exec", "/opt/pbs"]


def test_launch_of_a_tm_task_runs_it_as_spawned_and_gives_vmwraps_own_this_hosts_config(light, test_user):
    """execjob_launch also runs for every TM task (start_exec.c start_process), on any host, once the job
    runs: only the first launch of a run on the primary host is its top shell and becomes the payload
    (a task's spawner may set PBS_TASKNUM to the top shell's "1"); a task runs as spawned, vmwrap's own
    (`pbs-job task ...`, from the payload's pbs_tmrsh) with this host's config before its words."""
    mom, work, _ = light
    vm = mom.job(test_user, "#!/bin/sh\ntrue\n", work, variables={"VMWRAP_IMAGE": "nope"})
    (mom.jobs / f"{vm.id}.SC").write_text(vm.script)
    assert mom._event(EXECJOB_BEGIN, vm).accepted
    cfg = str(Path(mom.hook_config).parent / "vmwrap.toml")
    ours = [str(HOOKS / "pbs-job"), "task", "/run/x/tasks.sock", "ab12", vm.id, "--", "hostname", "-s"]

    def launch(ms, tasknum, argv):
        r = mom_hook(HOOK, Event(EXECJOB_LAUNCH, Job(id=vm.id, ms=ms), progname=argv[0], argv=argv,
                                 env={"PBS_TASKNUM": tasknum}),
                     pbs_home=str(mom.home), hook_config=str(mom.hook_config))
        assert r.accepted
        return r.event.progname, r.event.argv

    assert launch(False, "00000002", ["/bin/hostname"]) == ("/bin/hostname", ["/bin/hostname"])  # a sister's task
    assert launch(True, "1", ["-sh"])[0] == str(HOOKS / "pbs-job")          # the top shell: the payload
    for ms, tasknum, argv, want in [
            (True, "00000002", ["/bin/hostname"], ["/bin/hostname"]),
            (True, "1", ["/bin/sh", "-c", "id"], ["/bin/sh", "-c", "id"]),   # says it is task 1: it is not
            (False, "00000003", ["a.out", "x"], ["a.out", "x"]),
            (True, "00000004", ours, [ours[0], "--config", cfg, *ours[1:]]),
            (False, "00000005", ours, [ours[0], "--config", cfg, *ours[1:]]),
            (True, "00000006", [ours[0], "job"], [ours[0], "job"])]:
        assert launch(ms, tasknum, argv) == (argv[0], want), (ms, tasknum, argv)


def test_a_sister_mom_starts_its_hosts_vm_of_the_job(light, test_user):
    """execjob_begin runs on every mom of the job (mom_comm.c IM_JOIN_JOB): a sister starts its own VM
    of the job; here it fails for the job (no such image) and the vnode stays up, as on the primary."""
    mom, work, settings = light
    r = mom_hook(HOOK, Event(EXECJOB_BEGIN, Job({"VMWRAP_IMAGE": "nope"}, id="7.pbssrv", euser=test_user.pw_name,
                                                 egroup=test_user.pw_name, ms=False)),
                 pbs_home=str(mom.home), hook_config=str(mom.hook_config))
    assert r.accepted and (Path(settings.state_dir) / "jobs" / "7.pbssrv" / "error").exists()
    assert mom.vnode.state == 0


def test_vmwrap_unable_to_run_offlines_the_vnode_and_requeues(light, tmp_path):
    """A settings file vmwrap cannot read is the node's fault: the vnode goes offline with the
    reason as its comment, and begin's reject makes the server requeue the job."""
    mom, _, _ = light
    (tmp_path / "broken.toml").write_text("state_dir = [\n")
    bad = hook_config(tmp_path / "bad.json", tmp_path / "broken.toml")
    r = mom_hook(HOOK, Event(EXECJOB_BEGIN, Job(id="8.pbssrv", euser="nobody", egroup="nogroup")),
                 pbs_home=str(mom.home), hook_config=str(bad), nodename="node1")
    assert r.outcome == "requeued" and r.message.startswith("vmwrap: ")
    assert r.event.vnode_list["node1"].state == ND_OFFLINE and r.event.vnode_list["node1"].comment.startswith("vmwrap: ")


def test_preresume_of_a_job_without_a_vm_accepts(light, test_user):
    mom, _, _ = light
    r = mom_hook(HOOK, Event(EXECJOB_PRERESUME, Job(id="9.pbssrv")), pbs_home=str(mom.home),
                 hook_config=str(mom.hook_config))
    assert r.outcome == "accepted"


def test_bad_job_ids_and_facts_are_refused_without_a_traceback(light):
    from vmwrap_plugins.pbs import mom as mom_

    s = light[2]
    assert mom_.handle(s, "begin", {"job": "../../etc"})["log"].startswith("vmwrap: '../../etc' is not a PBS job id")
    assert mom_.handle(s, "nosuch", {"job": "1.x"})["reject"].startswith("vmwrap: no such mom event")
    with pytest.raises(Exception, match="not a string"):
        mom_.begin_job({"job": ["1"]})
    assert mom_.job_id("12[3].pbs.example.org") == "12-3.pbs"
    assert mom_.memory_mib("2gb") == 2048 and mom_.memory_mib("1048576kb") == 1024


def test_render_prints_the_qmgr_commands():
    """pbs_hook_attributes(7B): events, order, alarm, user, fail_action=offline_vnodes (begin only)."""
    from vmwrap_plugins.pbs.mom import PBS

    text = PBS().render_config(Settings(), node_config="/etc/vmwrap/node.toml")
    assert "qmgr -c 'create hook vmwrap_begin event=execjob_begin'" in text
    assert ("qmgr -c 'create hook vmwrap_mom event=\"execjob_launch,execjob_preterm,execjob_end,execjob_abort,"
            "execjob_postsuspend,execjob_preresume\"'") in text
    assert f"qmgr -c 'import hook vmwrap_mom application/x-python default {HOOK}'" in text
    assert "qmgr -c 'set hook vmwrap_begin fail_action=offline_vnodes'" in text
    assert "qmgr -c 'set hook vmwrap_mom user=pbsadmin'" in text
    assert '{"config": "/etc/vmwrap/node.toml"}' in text
    assert "application/x-config default /etc/vmwrap/pbs-hook.json" in text


def test_vmwrap_config_render_pbs_through_the_entry_point(tmp_path):
    """pyproject.toml's `pbs` entry points as an installed distribution has them (the venv's own
    metadata is only rewritten by a reinstall)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    eps = tomllib.loads((root / "pyproject.toml").read_text())["project"]["entry-points"]
    d = tmp_path / "vmwrap_pbs_check-0.dist-info"
    d.mkdir()
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: vmwrap-pbs-check\nVersion: 0\n")
    (d / "entry_points.txt").write_text("".join(f"[{g}]\npbs = {eps[g]['pbs']}\n"
                                                for g in ("vmwrap.schedulers", "vmwrap.cli")))
    env = dict(os.environ, PYTHONPATH=f"{tmp_path}:{root}")
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "config", "render", "pbs"], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "qmgr -c 'create hook vmwrap_begin event=execjob_begin'" in r.stdout
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "pbs", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "mom" in r.stdout and "job" in r.stdout


def test_hook_body_calls_the_venv_python_isolated_with_an_empty_environment():
    """The installer rewrites this exact path; -I and env={} as every root hook (docs/security.md)."""
    body = HOOK.read_text()
    assert 'PYTHON = "/opt/vmwrap/venv/bin/python"' in body and '[PYTHON, "-I", "-m", "vmwrap_plugins.pbs"]' in body
    assert "env={}" in body
    assert "exec /opt/vmwrap/venv/bin/python -I -m vmwrap_plugins.pbs" in (HOOKS / "pbs-job").read_text()


# --- real VMs -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pbs_vm(appliance, virt_type, test_user):
    from vmwrap.catalog import register

    base = Path(f"/var/tmp/vmwrap-pbs-{os.getpid()}")
    work = site_dirs(base, test_user, fresh=True)
    register(str(base / "images.toml"), appliance)
    cfg = base / "vmwrap.toml"
    from vmwrap.checkpoint import init_store, keygen

    init_store(base / "store", keygen(base / "checkpoint.key"))  # the site's key, `vmwrap checkpoints init`
    cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(base / "state"), "cache_dir": str(base / "cache"),
                           "checkpoint_dir": str(base / "store"), "checkpoint_key_file": str(base / "checkpoint.key")}))
    agent = node_agent(cfg, base / "state")
    mom = Mom(base, "node1", HOOK, hook_config(base / "hook.json", cfg))
    yield mom, work, base
    clean_up(base, [mom], [agent])


def _domain(job) -> str:
    return f"vmwrap-{job.seq}.{job.id.split('.')[1]}"


def _qemu_running(job) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest={_domain(job)},"], capture_output=True).returncode == 0


def _vm_gone(mom_base: Path, job) -> bool:
    return not _qemu_running(job) and not (mom_base / "state" / "jobs" / _domain(job)[len("vmwrap-"):]).exists()


@pytest.mark.vm
@pytest.mark.parametrize("code", [0, 3])
def test_vm_job_runs_through_begin_launch_end_like_a_bare_job(pbs_vm, test_user, code):
    """begin boots the VM, launch hands the job to vmwrap's payload, end destroys the VM: the job's
    .o/.e files and exit status are what the bare job gives, and its script ran in the guest."""
    mom, work, base = pbs_vm
    job = mom.job(test_user, f'#!/bin/sh\n#VMWRAP --image=busybox\nuname -r; id -u; echo "$PBS_JOBID"; '
                             f'echo err >&2; exit {code}\n', work, name="vmjob")
    assert mom.start(job) == "running", job.history
    assert mom.wait(job) == code, output(job)
    out, err = output(job)
    guest_kernel = Path("/var/cache/vmwrap/appliances/.kernel/version").read_text().strip()
    assert out.splitlines() == [guest_kernel, str(test_user.pw_uid), job.id], out + err
    assert err == "err\n"
    assert _vm_gone(base, job)


@pytest.mark.vm
def test_qdel_stops_the_guest_job_and_leaves_no_vm(pbs_vm, test_user):
    """qdel: execjob_preterm marks the run dir, so the payload passes the SIGTERM on to the guest's
    job (a qrerun's SIGTERM, unmarked, detaches instead); execjob_end destroys the VM."""
    mom, work, base = pbs_vm
    job = mom.job(test_user, "#!/bin/sh\ntrap 'echo got TERM; exit 7' TERM\necho started; sleep 300 & wait\n", work,
                  name="del", variables={"VMWRAP_IMAGE": "busybox"})
    assert mom.start(job) == "running", job.history
    wait_for(lambda: "started" in mom.spool_out(job), "the job to start", 90)
    assert _qemu_running(job)
    mom.qdel(job)
    assert mom.wait(job) != 0
    assert "got TERM" in output(job)[0], output(job)
    assert _vm_gone(base, job)


@pytest.mark.vm
def test_qsig_suspend_pauses_the_whole_vm_and_resume_continues(pbs_vm, test_user):
    """qsig -s suspend: SIGSTOP to the job, then execjob_postsuspend pauses the VM; resume:
    execjob_preresume resumes it, then SIGCONT. Every count appears once, none while suspended."""
    mom, work, base = pbs_vm
    job = mom.job(test_user, "#!/bin/sh\ni=0; while [ $i -lt 14 ]; do i=$((i+1)); echo n=$i; sleep 1; done\n",
                  work, name="susp", resources={"vmwrap_image": "busybox"})
    assert mom.start(job) == "running", job.history
    wait_for(lambda: "n=3\n" in mom.spool_out(job), "the job to count", 90)
    assert mom.suspend(job).accepted
    state = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", _domain(job)], capture_output=True,
                           text=True).stdout.strip()
    assert state == "paused"
    frozen = mom.spool_out(job)
    time.sleep(3)
    assert mom.spool_out(job) == frozen
    assert mom.resume(job).accepted
    assert mom.wait(job) == 0
    assert [int(n) for n in re.findall(r"^n=(\d+)$", output(job)[0], re.M)] == list(range(1, 15))
    assert _vm_gone(base, job)


@pytest.mark.vm
def test_qrerun_saves_the_vm_and_the_next_run_restores_it(pbs_vm, test_user):
    """qrerun: no hook before the SIGTERM (requests.c), so the payload, finding no execjob_preterm
    mark, detaches; execjob_end sees Exit_status JOB_EXEC_RERUN and saves the VM; the next start
    (run_count 2) restores it in execjob_begin. The server keeps the first run's output and hands it
    to the next run's mom (req_jobobit.c). The counter lives only in the guest shell's memory: every
    value appears exactly once, so the second run went on where the first was saved."""
    mom, work, base = pbs_vm
    n = 20
    job = mom.job(test_user, f"#!/bin/sh\ni=0; while [ $i -lt {n} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n",
                  work, name="rerun", variables={"VMWRAP_IMAGE": "busybox"})
    assert mom.start(job) == "running", job.history
    wait_for(lambda: "n=4\n" in mom.spool_out(job), "the job to count", 90)
    mom.qrerun(job)
    assert mom.wait(job) == -11 and job.state == "Q", job.history
    jid = _domain(job)[len("vmwrap-"):]
    assert (base / "store" / jid / "manifest.json").exists() and not _qemu_running(job)
    assert json.loads((base / "store" / f".{jid}.pbs.json").read_text()) == {"job": job.id}
    assert mom.start(job) == "running", job.history
    assert mom.wait(job, timeout=180) == 0, output(job)
    assert [int(v) for v in re.findall(r"^n=(\d+)$", output(job)[0], re.M)] == list(range(1, n + 1)), output(job)
    assert any(h.startswith("0x40 accepted") for h in job.history[3:])
    assert _vm_gone(base, job) and not (base / "store" / jid).exists()
    assert not (base / "store" / f".{jid}.pbs.json").exists()


@pytest.mark.vm
def test_a_plain_sigterm_ends_the_job_as_killed_and_leaves_no_vm(pbs_vm, test_user):
    """`qsig -s TERM` (no execjob_preterm, no rerun): the payload cannot tell it from a rerun's
    SIGTERM, so it detaches; the job still ends as killed by SIGTERM (143), not as a success, and
    execjob_end (Exit_status not JOB_EXEC_RERUN) destroys the VM without saving it."""
    import signal

    mom, work, base = pbs_vm
    job = mom.job(test_user, "#!/bin/sh\necho started; sleep 300\n", work, name="term",
                  variables={"VMWRAP_IMAGE": "busybox"})
    assert mom.start(job) == "running", job.history
    wait_for(lambda: "started" in mom.spool_out(job), "the job to start", 90)
    mom.signal_session(job, signal.SIGTERM)
    assert mom.wait(job) == 143
    assert _vm_gone(base, job) and not (base / "store" / _domain(job)[len("vmwrap-"):]).exists()
