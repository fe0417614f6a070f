"""Grid Engine parallel environments and VM jobs (issue 19): a VM job is one VM on one host, so a
`-pe` request is accepted only when its PE keeps every slot on one host (allocation_rule $pe_slots,
or an integer rule at least the slots asked for). The JSV refuses the others at qsub; the prolog
refuses a job whose pe_hostfile names several hosts (a PE changed after qsub, or no JSV)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vmwrap.errors import UserError
from vmwrap_plugins.sge import facts, hooks

RULES = {"smp": "$pe_slots", "mpi": "$round_robin", "fill": "$fill_up", "four": "4"}


@pytest.fixture
def pes(monkeypatch):
    import fnmatch

    monkeypatch.setattr(facts, "pe_allocation_rules",
                        lambda pat: {n: r for n, r in RULES.items() if fnmatch.fnmatchcase(n, pat)})


@pytest.mark.parametrize("pe, lo, hi", [
    ("smp", "8", "8"), ("smp", "2", "9999999"), ("mpi", "1", "1"), ("four", "4", "4"), ("four", "2", "4"),
    ("sm*", "2", "2"), ("nosuch", "2", "2"),   # unknown: qsub's own refusal
])
def test_a_pe_that_keeps_the_slots_on_one_host_is_accepted(pes, pe, lo, hi):
    assert hooks.pe_refusal(pe, lo, hi) is None


@pytest.mark.parametrize("pe, lo, hi, said", [
    ("mpi", "2", "2", "-pe mpi 2 may get slots on several hosts: mpi has allocation_rule $round_robin"),
    ("fill", "2", "9999999", "-pe fill 2- may get slots on several hosts: fill has allocation_rule $fill_up"),
    ("four", "4", "8", "-pe four 4-8 may get slots on several hosts: four has allocation_rule 4"),
    ("*", "2", "2", "-pe * 2 may get slots on several hosts: fill has allocation_rule $fill_up, "
                    "mpi has allocation_rule $round_robin"),
])
def test_a_pe_that_may_spread_the_slots_is_refused_with_the_rule(pes, pe, lo, hi, said):
    why = hooks.pe_refusal(pe, lo, hi)
    assert why == (f"multi-node jobs are not supported yet ({said}): a vmwrap job runs in one VM on one node; "
                   f"{hooks.PE_FIX}"), why


def test_a_pe_nobody_can_look_up_is_refused_for_now(monkeypatch):
    def fail(pattern):
        raise RuntimeError("qconf -spl: cannot reach qmaster")

    monkeypatch.setattr(facts, "pe_allocation_rules", fail)
    assert "cannot tell where -pe mpi puts its slots (qconf -spl: cannot reach qmaster)" in hooks.pe_refusal("mpi", "2", "2")


def test_a_forged_pe_name_never_reaches_qconf():
    with pytest.raises(RuntimeError, match="not a parallel environment name"):
        facts.pe_allocation_rules("mpi;rm -rf /")


def active_dir(tmp_path: Path, hostfile: str | None) -> dict[str, str]:
    d = tmp_path / "spool" / "active_jobs" / "7.1"
    d.mkdir(parents=True)
    os.chmod(d, 0o755)
    if hostfile is not None:
        (d / "pe_hostfile").write_text(hostfile)
    return {"SGE_JOB_SPOOL_DIR": str(d)}


def test_pe_hosts_are_read_from_execds_hostfile(tmp_path):
    env = active_dir(tmp_path, "host1 2 vmwrap.q@host1 UNDEFINED\nhost2 1 vmwrap.q@host2 UNDEFINED\n"
                               "host1 1 other.q@host1 UNDEFINED\n")
    assert hooks.pe_hosts(env) == ["host1", "host2"]
    with pytest.raises(UserError, match=r"\(its parallel environment has slots on 2 hosts: host1 host2\)"):
        hooks.one_node(len(hooks.pe_hosts(env)), "its parallel environment has slots on 2 hosts: host1 host2",
                       hooks.PE_FIX)


def test_no_hostfile_or_a_planted_one_is_no_pe(tmp_path):
    assert hooks.pe_hosts(active_dir(tmp_path / "a", None)) == []
    env = active_dir(tmp_path / "b", None)
    os.symlink("/etc/hosts", Path(env["SGE_JOB_SPOOL_DIR"]) / "pe_hostfile")
    assert hooks.pe_hosts(env) == []   # never followed
    assert hooks.pe_hosts({"SGE_JOB_SPOOL_DIR": str(tmp_path / "x" / "active_jobs" / "1")}) == []


def test_the_jsv_refuses_a_vm_job_with_a_spreading_pe_and_leaves_other_jobs_alone(pes, monkeypatch, tmp_path):
    from types import SimpleNamespace

    from vmwrap.config import Settings

    monkeypatch.setattr(hooks, "_catalog", lambda path: SimpleNamespace(resolve=lambda *a, **k: None))
    s = Settings(state_dir=str(tmp_path))
    vm = {"ac": "vmwrap_image=busybox", "pe_name": "mpi", "pe_min": "2", "pe_max": "2"}
    image, _, why = hooks.check_request(s, vm, "bob", 100)
    assert image is None and why.startswith("multi-node jobs are not supported yet (-pe mpi 2 may get"), why
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
