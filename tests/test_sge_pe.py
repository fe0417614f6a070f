"""Grid Engine parallel environments and VM jobs (issue 19): a `-pe` request is accepted when its PE
keeps every slot on one host (allocation_rule $pe_slots, or an integer rule at least the slots asked
for), or when it may spread them but has control_slaves TRUE: then the job gets a VM on each host
(the master's from the prolog, the others' from its qrsh -inherit tasks) and is never saved. The JSV
refuses the others at qsub; the prolog reads the hosts and this host's slots from execd's
pe_hostfile."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmwrap.errors import NodeError, VmwrapError
from vmwrap_plugins.sge import facts, hooks

RULES = {"smp": "$pe_slots", "mpi": "$round_robin", "fill": "$fill_up", "four": "4", "tight": "$round_robin"}


@pytest.fixture
def pes(monkeypatch):
    import fnmatch

    monkeypatch.setattr(facts, "pe_settings", lambda pat: {
        n: {"allocation_rule": r, "control_slaves": "TRUE" if n == "tight" else "FALSE"}
        for n, r in RULES.items() if fnmatch.fnmatchcase(n, pat)})


@pytest.mark.parametrize("pe, lo, hi", [
    ("smp", "8", "8"), ("smp", "2", "9999999"), ("mpi", "1", "1"), ("four", "4", "4"), ("four", "2", "4"),
    ("sm*", "2", "2"), ("nosuch", "2", "2"),   # unknown: qsub's own refusal
    ("tight", "4", "4"), ("tight", "2", "9999999"),   # spreads, with control_slaves TRUE
])
def test_a_pe_that_keeps_the_slots_on_one_host_is_accepted(pes, pe, lo, hi):
    assert hooks.pe_refusal(pe, lo, hi) is None


@pytest.mark.parametrize("pe, lo, hi, said", [
    ("mpi", "2", "2", "-pe mpi 2 may get slots on several hosts (mpi has allocation_rule $round_robin and "
                      "control_slaves FALSE)"),
    ("fill", "2", "9999999", "-pe fill 2- may get slots on several hosts (fill has allocation_rule $fill_up and "
                             "control_slaves FALSE)"),
    ("four", "4", "8", "-pe four 4-8 may get slots on several hosts (four has allocation_rule 4 and "
                       "control_slaves FALSE)"),
    ("*", "2", "2", "-pe * 2 may get slots on several hosts (fill has allocation_rule $fill_up and control_slaves "
                    "FALSE, mpi has allocation_rule $round_robin and control_slaves FALSE)"),
])
def test_a_pe_that_may_spread_the_slots_without_controlling_them_is_refused_with_the_rule(pes, pe, lo, hi, said):
    why = hooks.pe_refusal(pe, lo, hi)
    assert why == (f"{said}, and a VM job spans hosts only in a parallel environment with control_slaves TRUE; "
                   f"{hooks.PE_FIX}"), why


def test_a_job_that_may_span_hosts_is_refused_when_it_asks_to_be_saved(pes):
    why = hooks.pe_refusal("tight", "4", "4", "-ckpt vmwrap")
    assert why == ("-pe tight 4 may get slots on several hosts, and the VMs of a job spanning hosts are never "
                   "saved: drop -ckpt vmwrap, or use a parallel environment whose allocation_rule is $pe_slots")
    assert hooks.pe_refusal("smp", "4", "4", "-ckpt vmwrap") is None    # one host: saved as ever


def test_a_pe_nobody_can_look_up_is_refused_for_now(monkeypatch):
    def fail(pattern):
        raise RuntimeError("qconf -spl: cannot reach qmaster")

    monkeypatch.setattr(facts, "pe_settings", fail)
    assert "cannot tell where -pe mpi puts its slots (qconf -spl: cannot reach qmaster)" in hooks.pe_refusal("mpi", "2", "2")


def test_a_forged_pe_name_never_reaches_qconf():
    with pytest.raises(RuntimeError, match="not a parallel environment name"):
        facts.pe_settings("mpi;rm -rf /")


def active_dir(tmp_path: Path, hostfile: str | None) -> dict[str, str]:
    d = tmp_path / "spool" / "active_jobs" / "7.1"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    if hostfile is not None:
        (d / "pe_hostfile").write_text(hostfile)
    return {"SGE_JOB_SPOOL_DIR": str(d)}


def test_the_allocation_is_read_from_execds_hostfile_master_first(tmp_path):
    env = active_dir(tmp_path, "host2 2 vmwrap.q@host2 UNDEFINED\nhost1 1 vmwrap.q@host1 UNDEFINED\n"
                               "host2 1 other.q@host2 UNDEFINED\n")
    assert hooks.pe_allocation(env) == [("host2", 3), ("host1", 1)]


def test_a_job_spanning_hosts_gets_the_job_network_and_this_hosts_slots(tmp_path, monkeypatch):
    env = active_dir(tmp_path, "host2 2 vmwrap.q@host2 UNDEFINED\nhost1 1 vmwrap.q@host1 UNDEFINED\n")
    monkeypatch.setattr(hooks, "host_addresses", lambda hosts: [{"host1": "10.0.0.1", "host2": "10.0.0.2"}[h]
                                                                for h in hosts])
    from vmwrap_plugins.sge import facts

    monkeypatch.setattr(facts, "pe_settings", lambda pe: {"mpi": {"control_slaves": "TRUE"}})
    env = {**env, "PE": "mpi"}
    plan, cpus = hooks.job_plan({**env, "HOSTNAME": "host2", "NSLOTS": "3"}, "7")
    assert (plan.nodes, plan.addrs, plan.index, cpus) == (("host2", "host1"), ("10.0.0.2", "10.0.0.1"), 0, 2)
    with pytest.raises(VmwrapError, match="this host \\('host9'\\) is not in job 7's pe_hostfile") as e:
        hooks.job_plan({**env, "HOSTNAME": "host9", "NSLOTS": "3"}, "7")
    assert not isinstance(e.value, NodeError)   # the job fails, the host stays up
    one = active_dir(tmp_path / "one", "host1 4 vmwrap.q@host1 UNDEFINED\n")
    assert hooks.job_plan({**one, "HOSTNAME": "host1", "NSLOTS": "4"}, "7") == (None, 4)


def test_a_hostfile_line_execd_would_not_write_fails_the_node_not_the_job(tmp_path):
    env = active_dir(tmp_path, "host1 lots vmwrap.q@host1 UNDEFINED\n")
    with pytest.raises(NodeError, match="not 'HOST SLOTS ...'"):
        hooks.pe_allocation(env)


def test_no_hostfile_or_a_planted_one_is_no_pe(tmp_path):
    assert hooks.pe_allocation(active_dir(tmp_path / "a", None)) == []
    env = active_dir(tmp_path / "b", None)
    os.symlink("/etc/hosts", Path(env["SGE_JOB_SPOOL_DIR"]) / "pe_hostfile")
    assert hooks.pe_allocation(env) == []   # never followed
    assert hooks.pe_allocation({"SGE_JOB_SPOOL_DIR": str(tmp_path / "x" / "active_jobs" / "1")}) == []


def test_the_jsv_refuses_a_vm_job_with_a_spreading_pe_and_leaves_other_jobs_alone(pes, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vmwrap.config import Settings

    monkeypatch.setattr(hooks, "_catalog", lambda path: SimpleNamespace(resolve=lambda *a, **k: None))
    s = Settings(state_dir=str(tmp_path))
    vm = {"ac": "vmwrap_image=busybox", "pe_name": "mpi", "pe_min": "2", "pe_max": "2"}
    image, _, why = hooks.check_request(s, vm, "bob", 100)
    assert image is None and why.startswith("-pe mpi 2 may get slots on several hosts (mpi has"), why
    assert hooks.check_request(s, {**vm, "pe_name": "tight"}, "bob", 100) == ("busybox", None, None)
    why = hooks.check_request(s, {**vm, "pe_name": "tight", "ckpt": "vmwrap"}, "bob", 100)[2]
    assert why.endswith("never saved: drop -ckpt vmwrap, or use a parallel environment whose allocation_rule is "
                        "$pe_slots"), why
    assert hooks.check_request(s, {**vm, "pe_name": "smp"}, "bob", 100) == ("busybox", None, None)
    assert hooks.check_request(s, {k: v for k, v in vm.items() if k != "ac"}, "bob", 100) == (None, None, None)


def test_the_jsv_refuses_an_interactive_vm_job_and_leaves_other_interactive_jobs_alone(monkeypatch, tmp_path):
    """qrsh/qlogin/qsh would start their session on the host beside the VM: refused, saying what to do."""
    from types import SimpleNamespace

    from vmwrap.config import Settings

    monkeypatch.setattr(hooks, "_catalog", lambda path: SimpleNamespace(resolve=lambda *a, **k: None))
    s = Settings(state_dir=str(tmp_path))
    for client in ("qrsh", "qlogin", "qsh"):
        image, _, why = hooks.check_request(s, {"CLIENT": client, "ac": "vmwrap_image=busybox"}, "bob", 100)
        assert image is None and why == (f"interactive jobs ({client}) cannot run in a VM under Grid Engine yet: "
                                         "submit the work with qsub; `vmwrap shell JOBID` on its host then opens a "
                                         "shell in its VM")
        assert hooks.check_request(s, {"CLIENT": client}, "bob", 100) == (None, None, None)
    assert hooks.check_request(s, {"CLIENT": "qsub", "ac": "vmwrap_image=busybox"}, "bob", 100) == ("busybox", None, None)
