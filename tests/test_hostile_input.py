"""Issue 14: what users write (job comments, names, requests, GE context) never fails a root prolog,
a planner pass or a prestage pass, and a VM never gets more memory than its job was allocated.
Pure unit tests: scheduler output is fed in, no scheduler runs."""

from __future__ import annotations

import os

import pytest

from vmwrap_plugins.sge import hooks as sge
from vmwrap_plugins.slurm import hooks
from vmwrap import request, wire
from vmwrap.catalog import Artifact, Catalog, Image
from vmwrap.config import Settings
from vmwrap.errors import UserError, VmwrapError
from vmwrap.job import Job

HUGE = "9" * 5000   # int() refuses more than 4300 digits with ValueError
ART = Artifact("/x", "a" * 64, 1)
CATALOG = Catalog({"busybox": Image("busybox", "kernel", ART, ART),
                   "big": Image("big", "kernel", ART, ART, memory_mib=1024)})


# --- Slurm: the comment's request ------------------------------------------------------------------

@pytest.mark.parametrize("comment", [
    f"vmwrap:image=busybox,memory={HUGE},cpus=,lost=",
    f"vmwrap:image=busybox,memory=,cpus={HUGE},lost=",
    "vmwrap:image=busybox,memory=1234567890,cpus=,lost=",      # 10 digits: more than the filter writes
    "vmwrap:image=busybox,memory=,cpus=40960,lost=",
    "vmwrap:image=../../etc,memory=,cpus=,lost=",
    "vmwrap:image=busybox,memory=,cpus=,lost=maybe",
    "vmwrap:image=busybox,memory=,cpus=,lost=trailing",
    "vmwrap:image=busybox,memory=-1,cpus=,lost=",
    "vmwrap:",
])
def test_a_malformed_request_is_a_user_error_never_a_crash(comment):
    with pytest.raises(UserError, match="not a VM request vmwrap wrote"):
        wire.decode(comment)


def test_requests_the_filter_writes_still_parse():
    assert wire.decode("vmwrap:image=busybox,memory=300,cpus=2,lost=restart | my\nnote") == \
        wire.Accepted("busybox", memory_mib=300, cpus=2, on_lost_checkpoint="restart")
    assert wire.decode("vmwrap:image=a.b_c-1,memory=,cpus=,lost=").memory_mib is None
    assert wire.decode("a user's note") is None and wire.decode(None) is None


@pytest.mark.parametrize("value, cpus", [("2", 2), ("2(x3)", 2), ("4,2(x2)", 4), (HUGE, None),
                                         (HUGE + "(x2)", None), ("2(x" + HUGE + ")", None), ("", None), ("x", None)])
def test_cpus_per_node_is_bounded(value, cpus):
    assert hooks.allocated_cpus(value) == cpus


SHOW = ("JobId=7 JobName=job.sh UserId=bob(1234) GroupId=bob(1234) Priority=1 JobState=RUNNING "
        "NumNodes=1 NumCPUs=1 NumTasks=1 CPUs/Task=1 TRES=cpu=1,mem=200M,node=1,billing=1 "
        "MinCPUsNode=1 MinMemoryNode=200M MinTmpDiskNode=0 Features=(null) Comment={comment} WorkDir=/w\n")


@pytest.mark.parametrize("show, cpus, mib", [
    (SHOW, 1, 200),
    (SHOW.replace("MinMemoryNode=200M", "MinMemoryCPU=100M").replace("mem=200M", "mem=200M"), 2, 200),
    (SHOW.replace("MinMemoryNode=200M", "MinMemoryCPU=100M").replace("mem=200M", "mem=400M"), 1, 100),
    (SHOW.replace("MinMemoryNode=200M", "MinMemoryNode=0").replace("mem=200M", "mem=2.50G"), 1, 2560),
    (SHOW.replace("MinMemoryNode=200M", "MinMemoryNode=0").replace("mem=200M,", ""), 1, None),  # no memory accounting
    (SHOW.replace("JobName=job.sh", "JobName=x MinMemoryNode=900G TRES=mem=900G"), 1, 200),  # forged: only lowers
    (SHOW.replace("JobName=job.sh", f"JobName=x MinMemoryNode={HUGE}G TRES=mem={HUGE}"), 1, 200),
    (SHOW.replace("MinMemoryNode=200M", f"MinMemoryNode={HUGE}M"), 1, 200),  # unparsable: the other ceiling
    (SHOW.replace("{comment}", "a MinMemoryNode=50M b"), 1, 50),
])
def test_memory_allocation_from_scontrol(show, cpus, mib):
    assert hooks.allocated_memory_mib(show.replace("{comment}", "x"), cpus) == mib


def env(comment, **kw):
    e = {"SLURM_JOB_ID": "77", "SLURM_JOB_USER": "root", "SLURM_JOB_UID": "0", "SLURM_JOB_GID": "0",
         "SLURM_JOB_WORK_DIR": "/tmp", "SLURM_JOB_CPUS_PER_NODE": "1", "SLURM_JOB_COMMENT": comment}
    e.update(kw)
    return e


def test_job_from_env_fills_the_allocation_and_carries_the_request_as_directives():
    job, req = hooks.job_from_env(env("vmwrap:image=busybox,memory=300,cpus=1,lost=restart"),
                                  show_job=lambda jid: SHOW.replace("{comment}", "x"))
    assert (job.memory_mib, job.cpus, job.image, job.on_lost_checkpoint) == (200, 1, "busybox", "restart")
    with pytest.raises(UserError, match=r"--memory=300M is more than the job's allocation of 200M"):
        request.resolve(job, Settings(), CATALOG)


def test_slurm_prolog_refuses_a_vm_job_on_several_nodes_without_slurmds_node_list():
    """A multi-node job's VMs are placed from slurmd's SLURM_JOB_NODELIST (never from the job record, whose
    JobName and Comment users write). Slurm counting 2 nodes without that list fails the job: its VM is
    never booted as if it were alone; a forged 'NumNodes=1' in a field does not hide the count."""
    shown = SHOW.replace("{comment}", "x NumNodes=1").replace("NumNodes=1 ", "NumNodes=2 ", 1)
    with pytest.raises(VmwrapError, match=r"job 77 has 2 nodes but slurmd gave no node list"):
        hooks.job_from_env(env("vmwrap:image=busybox,memory=,cpus=,lost="), show_job=lambda jid: shown)


@pytest.mark.parametrize("value", ["c[1-2] c3", "-c1", "c1;reboot", "c1\nc2", "$(x)"])
def test_slurm_node_list_is_a_host_list_or_refused(value):
    with pytest.raises(VmwrapError, match="SLURM_JOB_NODELIST=.* from slurmd is not a host list"):
        hooks.node_list({"SLURM_JOB_NODELIST": value})


@pytest.mark.parametrize("field", ["SLURM_JOB_UID", "SLURM_JOB_GID", "SLURM_JOB_RESTART_COUNT"])
def test_job_from_env_bounds_numbers(field):
    with pytest.raises(UserError, match=field):
        hooks.job_from_env(env("vmwrap:image=busybox,memory=,cpus=,lost=", **{field: HUGE}),
                           show_job=lambda jid: SHOW.replace("{comment}", "x"))


@pytest.fixture
def settings(tmp_path):
    return Settings(state_dir=str(tmp_path / "state"), catalog=str(tmp_path / "none.toml"),
                    checkpoint_dir=str(tmp_path / "ckpt"))


@pytest.mark.parametrize("comment", [f"vmwrap:image=busybox,memory={HUGE},cpus=,lost=",
                                     "vmwrap:image=busybox,memory=200000,cpus=,lost=x"])
def test_prolog_with_a_crafted_comment_fails_the_job_and_keeps_the_node(settings, comment, monkeypatch):
    monkeypatch.setattr(hooks.Slurm, "take_out", lambda *a: pytest.fail("the node was taken out"))
    assert hooks.prolog(settings, env(comment)) == 0
    err = (settings.jobs_dir / "77" / "error").read_text()
    assert err.startswith("user\n") and "not a VM request vmwrap wrote" in err


def test_prolog_turns_an_unexpected_exception_into_a_job_failure(settings, monkeypatch, capsys):
    def boom(env):
        raise ValueError("Exceeds the limit (4300 digits) for integer string conversion")
    monkeypatch.setattr(hooks, "job_from_env", boom)
    monkeypatch.setattr(hooks.Slurm, "take_out", lambda *a: pytest.fail("the node was taken out"))
    assert hooks.prolog(settings, env("vmwrap:image=busybox,memory=,cpus=,lost=")) == 0
    err = (settings.jobs_dir / "77" / "error").read_text()
    assert "internal error in vmwrap's prolog (ValueError: Exceeds the limit" in err
    assert "Traceback" in capsys.readouterr().err   # the bug stays visible
    from vmwrap.ledger import Ledger
    assert [e["detail"]["kind"] for e in Ledger(settings.ledger_path).events("77")] == ["internal"]


def test_prolog_when_slurm_cannot_say_the_allocation_fails_the_job(settings, monkeypatch):
    def unreachable(jid):
        raise VmwrapError(f"cannot read job {jid}'s memory allocation from Slurm (scontrol show job: timeout)")
    monkeypatch.setattr(hooks, "slurm_job", unreachable)
    monkeypatch.setattr(hooks.job_from_env, "__defaults__", (unreachable,))
    monkeypatch.setattr(hooks.Slurm, "take_out", lambda *a: pytest.fail("the node was taken out"))
    assert hooks.prolog(settings, env("vmwrap:image=busybox,memory=,cpus=,lost=")) == 0
    assert "cannot read job 77's memory allocation" in (settings.jobs_dir / "77" / "error").read_text()


# --- request.resolve: the allocation and the site's max are ceilings for every source of the size --------

def job(script="", memory=None, image="busybox"):
    return Job("1", "test", "root", 0, 0, "/tmp", script, memory_mib=memory, image=image)


@pytest.mark.parametrize("j, s, message", [
    (job("#VMWRAP --memory=300M\n", memory=200), Settings(), "--memory=300M is more than the job's allocation of 200M"),
    (job(memory=200, image="big"), Settings(), "image big's default memory of 1024M is more than the job's allocation"),
    (job(memory=200), Settings(default_memory_mib=256), "the site's default VM memory of 256M is more than"),
    (job("#VMWRAP --memory=600M\n"), Settings(max_memory_mib=512), "more than this site's limit of 512M per VM"),
    (job(image="big"), Settings(max_memory_mib=512), "image big's default memory of 1024M is more than this site's"),
    (job(memory=4096, image="big"), Settings(max_memory_mib=512), "this site's limit of 512M"),
])
def test_resolve_refuses_memory_above_any_ceiling(j, s, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        request.resolve(j, s, CATALOG)


def test_resolve_sizes_within_the_ceilings():
    assert request.resolve(job(memory=300), Settings(default_memory_mib=256), CATALOG).memory_mib == 256
    assert request.resolve(job("#VMWRAP --memory=300M\n", memory=300), Settings(max_memory_mib=300),
                           CATALOG).memory_mib == 300


# --- Grid Engine: context and resource requests from qstat -j ------------------------------------------

QSTAT = ("job_number:                 12\nowner:                      bob\n"
         "hard resource_list:         h_rt=600,h_vmem={vmem}\n"
         "env_list:                   A=b\ncontext:                    vmwrap_image={image}\n")


@pytest.mark.parametrize("vmem, slots, mib", [
    ("512M", 1, 512), ("512M", 4, 2048), ("1G", 1, 1024), ("1g", 1, 953), ("0x20000000", 1, 512),
    ("INFINITY", 1, None), ("1.5G", 2, 3072), ("010", 1, 0),
])
def test_ge_memory_requests_per_slot(vmem, slots, mib):
    assert sge.requested_memory_mib(QSTAT.format(vmem=vmem, image="busybox"), slots) == mib


def test_ge_least_of_several_memory_requests():
    q = QSTAT.format(vmem="2G", image="busybox").replace("h_rt=600", "mem_free=300M,virtual_free=1G")
    assert sge.requested_memory_mib(q, 1) == 300
    assert sge.requested_memory_mib(q + "hard resource_list:  h_vmem=100G\n", 1) == 300  # a forged line cannot raise it


@pytest.mark.parametrize("vmem", [HUGE, HUGE + "G", "lots", "1e9", "-5G"])
def test_ge_bad_memory_requests_are_user_errors(vmem):
    with pytest.raises(UserError, match="cannot read the job's memory request"):
        sge.requested_memory_mib(QSTAT.format(vmem=vmem, image="busybox"), 1)


@pytest.mark.parametrize("image, message", [("../x", "invalid image name"), (HUGE, "invalid image name"),
                                            ("a,vmwrap_image=b", "more than one vmwrap_image")])
def test_ge_context_is_validated(image, message):
    with pytest.raises(UserError, match=message):
        sge.parse_context(QSTAT.format(vmem="1G", image=image))
    assert sge.parse_context(QSTAT.format(vmem="1G", image="busybox")) == "busybox"
    assert sge.parse_context("context:\nvmwrap_image=x\n") is None


def ge_env(tmp_path, **kw):
    e = {"JOB_ID": "12", "SGE_TASK_ID": "undefined", "NSLOTS": "1", "JOB_SCRIPT": str(tmp_path / "nope")}
    e.update(kw)
    return e


def test_ge_job_from_env_fills_the_requested_memory(tmp_path, monkeypatch):
    monkeypatch.setattr(sge, "qstat_job", lambda jid: QSTAT.format(vmem="256M", image="busybox"))
    j = sge.job_from_env(ge_env(tmp_path, NSLOTS="2"), "root")
    assert (j.image, j.cpus, j.memory_mib) == ("busybox", 2, 512)
    monkeypatch.setattr(sge, "qstat_job", lambda jid: QSTAT.format(vmem="256M", image="busybox").replace("h_vmem", "h_x"))
    assert sge.job_from_env(ge_env(tmp_path), "root").memory_mib is None   # then only the site's max applies


@pytest.mark.parametrize("qstat, nslots, message", [
    (QSTAT.format(vmem=HUGE, image="busybox"), "1", "cannot read the job's memory request"),
    (QSTAT.format(vmem="1G", image="../../x"), "1", "invalid image name"),
    (QSTAT.format(vmem="1G", image="busybox"), HUGE, "NSLOTS="),
])
def test_ge_prolog_with_crafted_requests_fails_the_job_and_keeps_the_queue(settings, tmp_path, monkeypatch,
                                                                           qstat, nslots, message):
    monkeypatch.setattr(sge, "qstat_job", lambda jid: qstat)
    assert sge.prolog(settings, ge_env(tmp_path, NSLOTS=nslots), "root") == 0
    err = (settings.jobs_dir / "12" / "error").read_text()
    assert err.startswith("user\n") and message in err


def test_ge_prolog_turns_an_unexpected_exception_into_a_job_failure(settings, tmp_path, monkeypatch):
    monkeypatch.setattr(sge, "job_from_env", lambda env, owner: int(HUGE))
    assert sge.prolog(settings, ge_env(tmp_path), "root") == 0
    assert "internal error in vmwrap's prolog (ValueError" in (settings.jobs_dir / "12" / "error").read_text()


def test_ge_prolog_fails_a_vm_job_whose_pe_spans_hosts_without_control_slaves_and_keeps_the_queue(
        settings, tmp_path, monkeypatch):
    """The JSV refuses a -pe that may spread without control_slaves TRUE; a PE changed after qsub (or a
    cell without the JSV) still gives a VM job slots on several hosts: its prolog fails the job (a user
    error), not the queue. So does a host of its pe_hostfile that does not resolve, or qconf failing."""
    from vmwrap_plugins.sge import facts

    spool = tmp_path / "spool" / "active_jobs" / "12.1"
    spool.mkdir(parents=True)
    os.chmod(spool, 0o755)
    (spool / "pe_hostfile").write_text("host1 1 vmwrap.q@host1 UNDEFINED\nhost2 1 vmwrap.q@host2 UNDEFINED\n")
    monkeypatch.setattr(sge, "qstat_job", lambda jid: QSTAT.format(vmem="1G", image="busybox"))
    env = ge_env(tmp_path, NSLOTS="2", SGE_JOB_SPOOL_DIR=str(spool), PE="mpi", HOSTNAME="host1")
    control = {"control_slaves": "FALSE", "allocation_rule": "$round_robin"}
    monkeypatch.setattr(facts, "pe_settings", lambda pe: {pe: control})
    assert sge.prolog(settings, env, "root") == 0
    err = (settings.jobs_dir / "12" / "error").read_text()
    assert err.startswith("user\n") and ("the job's parallel environment mpi gave it slots on 2 hosts (host1 host2) "
                                         "and has control_slaves FALSE") in err, err
    control["control_slaves"] = "TRUE"
    assert sge.prolog(settings, env, "root") == 0
    err = (settings.jobs_dir / "12" / "error").read_text()
    assert "cannot resolve host 'host1' of the job's parallel environment" in err, err

    def no_qmaster(pe):
        raise RuntimeError("qconf -sp mpi: unable to contact qmaster")
    monkeypatch.setattr(facts, "pe_settings", no_qmaster)
    assert sge.prolog(settings, env, "root") == 0
    assert "cannot read parallel environment 'mpi''s control_slaves" in (settings.jobs_dir / "12" / "error").read_text()


def test_a_node_address_slurm_cannot_give_fails_the_job_not_this_node(monkeypatch):
    """The job network's tunnels need every node's address: slurmctld not answering, or another node's
    NodeAddr that does not resolve, is no fault of the node whose prolog asks (it is not drained)."""
    import subprocess as sp

    from vmwrap.errors import NodeError

    def shown(out: str, rc: int = 0):
        return lambda *a, **k: sp.CompletedProcess(a, rc, out, "slurm_load_node error")
    monkeypatch.setattr(hooks.subprocess, "run", shown("", 1))
    with pytest.raises(VmwrapError, match="cannot read node c1's address from Slurm") as e:
        hooks.node_addresses(["c1", "c2"])
    assert not isinstance(e.value, NodeError)
    monkeypatch.setattr(hooks.subprocess, "run", shown("NodeName=c1 Arch=x NodeAddr=10.0.0.1 x\n"
                                                        "NodeName=c2 Arch=x NodeAddr=no-such-host.invalid x\n"))
    with pytest.raises(VmwrapError, match="node c2's address 'no-such-host.invalid' does not resolve") as e:
        hooks.node_addresses(["c1", "c2"])
    assert not isinstance(e.value, NodeError)
    monkeypatch.setattr(hooks.subprocess, "run", shown("NodeName=c1 NodeAddr=10.0.0.1 x\nNodeName=c2 NodeAddr=10.0.0.2 x\n"))
    assert hooks.node_addresses(["c1", "c2"]) == ["10.0.0.1", "10.0.0.2"]
