"""PBS checkpoint/restart through pbs_mom's `$action` scripts (vmwrap/hooks/pbs-action).

The mom config lines are the ones `vmwrap config render pbs` prints, read by the stand-in as
add_mom_action reads them (OpenPBS src/resmom/mom_main.c:1468). qhold of a running job: the mom runs
`$action checkpoint_abort` as root with fds 0-2 closed and waits for it, SIGKILL after its timeout
(requests.c:3608, mom_main.c:2149-2496); on exit 0 execjob_end runs and the job goes back held with
its checkpoint flag, exit status JOB_EXEC_CHKP (requests.c:3842, req_jobobit.c:1796). qrls: the
job is sent to a mom without counting a run (req_runjob.c:1021), execjob_begin runs with
`e.job.is_checkpointed()`, no execjob_launch, and `$action restart` (with $restart_transmogrify)
becomes the job's task (requests.c:4177-4196, mom_main.c:2279). The VMs, libvirt, QEMU and the node
agents are real; the second mom has its own PBS_HOME and vmwrap state dir and shares only the
checkpoint store and `$checkpoint_path`, as two hosts restarting a migrated checkpoint would."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.pbs_standin import EXECJOB_BEGIN, EXECJOB_END, JOB_EXEC_CHKP, Mom, clean_up, hook_config, node_agent, \
    output, parse_mom_config, site_dirs, wait_for
from vmwrap.config import Settings, render
from vmwrap.resources import HOOKS

HOOK = HOOKS / "pbs-mom.py"
ACTION = HOOKS / "pbs-action"
PY = "/opt/vmwrap/venv/bin/python"


def _mom_config(node_config: Path) -> str:
    from vmwrap_plugins.pbs.render import render_pbs

    return render_pbs(Settings(), node_config=str(node_config))


def test_render_prints_the_mom_action_lines():
    """mom_priv/config: `$action NAME TIMEOUT !SCRIPT ARGS` (mom_main.c:1468) for checkpoint_abort,
    checkpoint and restart, and $restart_transmogrify (the restart script becomes the job)."""
    text = _mom_config(Path("/etc/vmwrap/node.toml"))
    for name in ("checkpoint_abort", "checkpoint", "restart"):
        assert (f"$action {name} 900 !{ACTION} --config /etc/vmwrap/node.toml {name} %jobid %uid %gid %path"
                in text.splitlines()), text
    assert "$restart_transmogrify true" in text.splitlines()
    actions, transmogrify = parse_mom_config(text)
    assert transmogrify and actions["restart"].script == str(ACTION) and actions["restart"].timeout == 900
    assert "exec /opt/vmwrap/venv/bin/python -I -m vmwrap_plugins.pbs" in ACTION.read_text()


def _action(cfg: Path, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(ACTION), "--config", str(cfg), *argv], capture_output=True, text=True, env={},
                          cwd="/", timeout=120)


@pytest.fixture
def light(test_user):
    base = Path(f"/var/tmp/vmwrap-pbsc-{os.getpid()}-{os.urandom(2).hex()}")
    base.mkdir(parents=True)
    work = base / "work"
    work.mkdir()
    os.chown(work, test_user.pw_uid, test_user.pw_gid)
    (base / "images.toml").write_text("")
    store = base / "store"
    store.mkdir(mode=0o700)
    cfg = base / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(base / "images.toml"), "state_dir": str(base / "state"),
                           "checkpoint_dir": str(store)}))
    mom = Mom(base, "node1", HOOK, hook_config(base / "hook.json", cfg), config=_mom_config(cfg))
    yield mom, work, cfg, store
    shutil.rmtree(base, ignore_errors=True)


def test_actions_refuse_a_periodic_checkpoint_and_bad_arguments(light, test_user):
    """`$action checkpoint` (the job runs on) cannot be a VM save, which stops the VM; bad argv,
    an unknown action or a job without a VM fail with the reason and exit 1 (a failed checkpoint)."""
    _, _, cfg, _ = light
    u, g = str(test_user.pw_uid), str(test_user.pw_gid)
    r = _action(cfg, "checkpoint", "5.pbssrv", u, g, "/var/spool/pbs/checkpoint/5.pbssrv.CK/00000001")
    assert r.returncode == 1 and "use qhold" in r.stderr, r.stderr
    r = _action(cfg, "checkpoint_abort", "5.pbssrv", u, g, "/x/00000001")
    assert r.returncode == 1 and "has no VM on this node" in r.stderr, r.stderr
    r = _action(cfg, "checkpoint_abort", "../etc", u, g, "/x")
    assert r.returncode == 1 and "is not a PBS job id" in r.stderr, r.stderr
    r = _action(cfg, "checkpoint_abort", "5.pbssrv", "0", "0", "/x")
    assert r.returncode == 1 and "root's jobs" in r.stderr, r.stderr
    r = _action(cfg, "restart", "5.pbssrv", u, g)
    assert r.returncode == 1 and "4 arguments" in r.stderr, r.stderr
    r = _action(cfg, "migrate", "5.pbssrv", u, g, "/x")
    assert r.returncode == 1 and "no such action" in r.stderr, r.stderr


def test_qhold_of_a_job_whose_vms_span_hosts_is_refused_and_it_runs_on(light, test_user):
    """Saving one host's VM of a multi-node job and not the others would be half a job: checkpoint_abort
    fails (the hold is refused, the job runs on) before it touches the VM."""
    _, _, cfg, _ = light
    run_dir = cfg.parent / "state" / "jobs" / "5.pbssrv"
    run_dir.mkdir(parents=True)
    (run_dir / "job.json").write_text(json.dumps({"uid": test_user.pw_uid, "node_index": 0, "nodes": 2}))
    r = _action(cfg, "checkpoint_abort", "5.pbssrv", str(test_user.pw_uid), str(test_user.pw_gid), "/x/00000001")
    assert r.returncode == 1 and "job 5.pbssrv's VMs span 2 hosts, which vmwrap does not save: it runs on" in r.stderr, \
        r.stderr
    assert not (run_dir / "pbs-checkpoint").exists()


def _fake_checkpoint(store: Path, job) -> Path:
    jid = job.id
    (store / jid).mkdir()
    (store / jid / "manifest.json").write_text("{}")
    (store / f".{jid}.pbs.json").write_text(json.dumps({"job": job.id, "checkpoint": True, "uid": job.user.pw_uid,
                                                        "gid": job.user.pw_gid}))
    return store / jid


def test_begin_of_a_checkpointed_job_leaves_its_checkpoint_to_the_restart_action(light, test_user):
    """qrls: run_count is not counted again (req_runjob.c:1021), so a begin that booted would take
    the job for a new one and delete its checkpoint; it boots nothing and keeps it."""
    mom, work, _, store = light
    job = mom.job(test_user, "#!/bin/sh\n#VMWRAP --image=nope\necho x\n", work, name="ck")
    job.run_count, job.checkpointed = 1, True
    ck = _fake_checkpoint(store, job)
    (mom.jobs / f"{job.id}.SC").write_text(job.script)
    r = mom._event(EXECJOB_BEGIN, job)
    assert r.accepted and ck.exists()
    assert not (Path(mom.hook_config).parent / "state" / "jobs" / job.id).exists()
    job.checkpointed = False      # a migrated checkpoint (JOB_SVFLG_ChkptMig): is_checkpointed() is False
    assert mom._event(EXECJOB_BEGIN, job).accepted and ck.exists()


def test_end_after_checkpoint_abort_keeps_the_checkpoint(light, test_user):
    """execjob_end after a successful checkpoint_abort (Exit_status JOB_EXEC_CHKP) keeps the
    checkpoint and its record; an end without qhold's record deletes a leftover one where the job's
    VM ran (its run dir), and leaves it where the job never had a VM (a start that failed there as a
    node fault: the job runs on elsewhere, from that checkpoint)."""
    mom, work, cfg, store = light
    job = mom.job(test_user, "#!/bin/sh\n", work)
    ck = _fake_checkpoint(store, job)
    assert mom._event(EXECJOB_END, job, exit_status=JOB_EXEC_CHKP).accepted
    assert ck.exists() and (store / f".{job.id}.pbs.json").exists()
    (store / f".{job.id}.pbs.json").unlink()
    assert mom._event(EXECJOB_END, job, exit_status=0).accepted
    assert ck.exists()
    (cfg.parent / "state" / "jobs" / job.id).mkdir(parents=True)   # its VM ran (and ended) on this mom
    assert mom._event(EXECJOB_END, job, exit_status=0).accepted
    assert not ck.exists()


# --- real VMs: qhold on one mom, qrls on another ----------------------------------------------------

@pytest.fixture(scope="module")
def two_moms(appliance, virt_type, test_user):
    from vmwrap.catalog import register
    from vmwrap.checkpoint import init_store, keygen

    base = Path(f"/var/tmp/vmwrap-pbsck-{os.getpid()}")
    work = site_dirs(base, test_user, fresh=True)
    register(str(base / "images.toml"), appliance)
    init_store(base / "store", keygen(base / "checkpoint.key"))  # the site's key, `vmwrap checkpoints init`
    shared_ck = base / "pbs-checkpoint"        # $checkpoint_path on shared storage
    moms, agents = [], []
    for name in ("node1", "node2"):
        cfg = base / f"{name}.toml"
        cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                               "state_dir": str(base / name / "state"), "cache_dir": str(base / name / "cache"),
                               "checkpoint_dir": str(base / "store"),
                               "checkpoint_key_file": str(base / "checkpoint.key")}))
        agents.append(node_agent(cfg, base / name / "state"))
        moms.append(Mom(base, name, HOOK, hook_config(base / f"{name}-hook.json", cfg), config=_mom_config(cfg),
                        checkpoint_path=shared_ck))
    yield moms, work, base
    clean_up(base, moms, agents)


def _qemu_running(domain: str) -> bool:
    return subprocess.run(["pgrep", "-f", f"guest={domain},"], capture_output=True).returncode == 0


@pytest.mark.vm
def test_qhold_saves_the_vm_and_qrls_restores_it_on_another_mom(two_moms, test_user):
    """qhold: checkpoint_abort saves the VM (the payload detaches, then leaves), execjob_end keeps the
    checkpoint, the job is held (JOB_EXEC_CHKP). qrls on the second mom: begin boots nothing, the
    restart action restores the VM there and becomes the job. The counter lives only in the guest
    shell's memory: every value appears exactly once, so the second mom went on where the first
    saved; nothing is left on either mom, nor in the store."""
    (mom1, mom2), work, base = two_moms
    n = 20
    job = mom1.job(test_user, f"#!/bin/sh\ni=0; while [ $i -lt {n} ]; do i=$((i+1)); echo n=$i; sleep 1; done\n",
                   work, name="hold", variables={"VMWRAP_IMAGE": "busybox"})
    domain = f"vmwrap-{job.id}"
    assert mom1.start(job) == "running", job.history
    wait_for(lambda: "n=4\n" in mom1.spool_out(job), "the job to count", 90)
    assert mom1.qhold(job) == "held", job.history
    assert job.exit_status == JOB_EXEC_CHKP and job.state == "H"
    assert (base / "store" / job.id / "manifest.json").exists() and not _qemu_running(domain)
    assert not (base / "node1" / "state" / "jobs" / job.id).exists()
    assert json.loads((base / "store" / f".{job.id}.pbs.json").read_text())["job"] == job.id
    mom1.hand_over_output(job)
    assert mom2.start(job) == "running", job.history
    assert job.run_count == 1
    assert mom2.wait(job, timeout=180) == 0, output(job)
    counts = [int(v) for v in re.findall(r"^n=(\d+)$", output(job)[0], re.M)]
    assert counts == list(range(1, n + 1)), output(job)
    assert not _qemu_running(domain) and not (base / "node2" / "state" / "jobs" / job.id).exists()
    assert not (base / "store" / job.id).exists() and not (base / "store" / f".{job.id}.pbs.json").exists()
