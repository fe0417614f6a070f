"""HTCondor prestaging on a real pool: the node's prestager fetches the images of idle VM jobs that
could start on its startd (HTCondor plans no start times: the schedd's idle jobs, matched against
each startd's whole slot, stand in) and the startd then advertises them in VmwrapCachedImages."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, STARTDS, VmwrapSite
from vmwrap.ledger import Ledger

USER = "vmwrapuser"

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condor-prestage-{os.getpid()}"), appliance, virt_type) as site:
        yield site


def _occupy_every_startd(condor, jobs: list[int]) -> None:
    """A bare `sleep` running on each startd (added to `jobs` for removal), so that VM jobs stay idle."""
    blockers = [_submit(condor, f"executable = /bin/sleep\narguments = 300\nrequirements = "
                                f"TARGET.VmwrapStartd == \"{s}\"\n") for s in STARTDS]
    jobs += blockers
    for b in blockers:
        condor.pool.wait_job(b, 0, (2,), 90)


def _submit(condor, text: str) -> int:
    cluster, r = condor.submit(condor.jobdir(), "transfer_executable = false\noutput = out.txt\nerror = err.txt\n"
                                                + text + "queue\n")
    assert cluster > 0, r.stderr
    return cluster


def _published(condor) -> dict:
    ads = condor.pool.query("startds", "PartitionableSlot =?= true", ["VmwrapStartd", "VmwrapCachedImages"])
    return {a["VmwrapStartd"]: a.get("VmwrapCachedImages") for a in ads}


def _prestage(condor, startd: str) -> str:
    r = condor.advertise(startd)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stderr


@pytest.mark.vm
def test_idle_vm_jobs_images_are_prestaged_on_the_startds_they_could_run_on(condor, appliance):
    """Both startds busy with bare jobs, empty node caches. An idle VM job that only node1 can run:
    one prestage pass on node1 fetches its image (node1 then advertises it), one on node2 does not.
    A job whose image the user changed into a path after submit (condor_qedit) is left out, logged."""
    from vmwrap.cache import Cache

    for s in STARTDS:
        shutil.rmtree(condor.node_cache_dir(s), ignore_errors=True)
    jobs = []
    try:
        _occupy_every_startd(condor, jobs)
        vm = _submit(condor, 'executable = /bin/echo\narguments = hi\nrequest_memory = 512\n'
                             '+VmwrapImage = "busybox"\nrequirements = TARGET.VmwrapStartd == "node1"\n')
        forged = _submit(condor, 'executable = /bin/echo\narguments = hi\nrequest_memory = 512\n'
                                 '+VmwrapImage = "busybox"\nrequirements = TARGET.VmwrapStartd == "node2"\n')
        jobs += [vm, forged]
        r = condor.pool.run("/usr/bin/condor_qedit", str(forged), "VmwrapImage", '"../../etc/shadow"', user=USER)
        assert r.returncode == 0, r.stdout + r.stderr
        time.sleep(5)  # a negotiation cycle or two: they stay idle, the startds are busy
        assert [condor.pool.job(j, 0, ["JobStatus"])["JobStatus"] for j in (vm, forged)] == [1, 1]

        log2 = _prestage(condor, "node2")
        assert f"job {forged}.0: not prestaged: invalid image name '../../etc/shadow'" in log2, log2
        log1 = _prestage(condor, "node1")
        for s, holds in (("node1", True), ("node2", False)):
            cache = Cache(condor.node_cache_dir(s), 1 << 34)
            assert all(cache.has(a) for a in appliance.artifacts().values()) is holds, s
        ev = [e for e in Ledger(condor.state / "ledger.sqlite").events(f"{vm}.0") if e["event"] == "prestage"]
        assert [e["detail"]["action"] for e in ev] == ["fetched"], (ev, log1)
        assert not [e for e in Ledger(condor.state / "ledger.sqlite").events(f"{forged}.0")
                    if e["event"] == "prestage"]
        condor.wait_until(lambda: _published(condor) == {"node1": "+busybox+", "node2": "+"},
                          "node1 advertising busybox, node2 nothing", 60)
    finally:
        for j in reversed(jobs):  # VM jobs first: none starts on a freed startd
            condor.pool.run("/usr/bin/condor_rm", str(j), user=USER)


@pytest.mark.vm
def test_planned_starts_follow_the_negotiators_order(condor):
    """The adapter's plan: idle VM jobs only, each with the startds it matches, in JobPrio order
    (condor_prio), then submission; a held job or a bare job is no start to prepare for."""
    import shlex

    from vmwrap_plugins.htcondor.facts import Schedd
    from vmwrap_plugins.htcondor.hooks import HTCondor

    jobs = []
    try:
        _occupy_every_startd(condor, jobs)
        vm = 'executable = /bin/echo\narguments = hi\nrequest_memory = 512\n+VmwrapImage = "busybox"\n'
        first, second, anywhere = (_submit(condor, vm + f'requirements = TARGET.VmwrapStartd == "{s}"\n')
                                   for s in ("node1", "node1", "node2"))
        held = _submit(condor, vm + "hold = true\n")
        bare = _submit(condor, "executable = /bin/echo\narguments = hi\n")
        jobs += [first, second, anywhere, held, bare]
        r = condor.pool.run("/usr/bin/condor_prio", "-p", "5", str(second), user=USER)
        assert r.returncode == 0, r.stdout + r.stderr
        plan = HTCondor(schedd=Schedd(shlex.split(condor.condor_python()))).planned_starts()
        host = os.uname().nodename
        assert [(p["job"], p["image"]) for p in plan] == [(f"{second}.0", "busybox"), (f"{first}.0", "busybox"),
                                                          (f"{anywhere}.0", "busybox")], plan
        assert [p["start"] for p in plan] == sorted(p["start"] for p in plan)
        assert abs(plan[0]["start"] - time.time()) < 30
        assert f"node1@{host}" in plan[0]["nodes"] and f"node2@{host}" not in plan[0]["nodes"], plan
        assert f"node2@{host}" in plan[2]["nodes"] and f"node1@{host}" not in plan[2]["nodes"], plan
        assert HTCondor().planned_starts() is None  # no schedd to ask: no plan
    finally:
        for j in reversed(jobs):  # VM jobs first: none starts on a freed startd
            condor.pool.run("/usr/bin/condor_rm", str(j), user=USER)
