"""Grid Engine places a VM job on a host that holds its image (cache-aware placement, issue 15).

A real two-host Grid Engine 8.1.9 cell (harness.sge_cell). Each host's prestager (`vmwrap sge
prestage --node HOST --once`) publishes the images its own cache holds as the host's
`vmwrap_cached` complex value; the JSV gives each VM job the soft request `vmwrap_cached=*+IMAGE+*`.
With the image cached on one host only, every job lands there, whichever host that is; without the
complex the JSV asks for nothing (qsub would refuse an unknown resource). Light tests without a cell
check what reaches qconf and the JSV's answers.
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import time

import pytest

from harness import sge_jobs
from harness.sge_cell import HOST2, qconf
from harness.sge_jobs import module_cell
from vmwrap_plugins.sge import facts, hooks

IMAGE = "busybox"


# -- light: what reaches qconf and the JSV's answers ------------------------------------------------

def test_published_value_names_valid_images_only(caplog):
    with caplog.at_level(logging.WARNING, "vmwrap.sge"):
        v = facts.cached_value(["busybox", "deb-12.x_y", "a,b=c", "x*", "../etc", "busybox", "$(id)"])
    assert v == "+busybox+deb-12.x_y+"
    assert facts.cached_value([]) == "+"
    assert "not published" in caplog.text
    assert facts.soft_request("busybox") == "vmwrap_cached=*+busybox+*"
    with pytest.raises(Exception, match="invalid image name"):
        facts.soft_request("x*|*")


def test_published_value_is_cut_at_a_whole_name():
    names = [f"img{i:03d}-" + "x" * 55 for i in range(100)]
    v = facts.cached_value(names)
    assert len(v) <= facts.CACHED_VALUE_MAX and v.startswith("+img000-") and v.endswith("+")
    assert all(n in names for n in v.strip("+").split("+"))


def test_host_complex_values_reads_qconf_se_with_continuations():
    text = ("hostname              sgehost2\nload_scaling          NONE\n"
            "complex_values        h_vmem=4G,vmwrap_cached=+busybox+deb+, \\\n"
            "                      slots=2\nload_values           arch=lx-amd64\n")
    assert facts.host_complex_values(text) == {"h_vmem": "4G", "vmwrap_cached": "+busybox+deb+", "slots": "2"}
    assert facts.host_complex_values("complex_values        NONE\n") == {}


def test_publish_refuses_a_host_name_qconf_must_not_see():
    with pytest.raises(RuntimeError, match="host name"):
        facts.publish_cached("-e x", ["busybox"])


def _jsv(monkeypatch, tmp_path, defined: bool, params: str) -> list[str]:
    from vmwrap.config import Settings

    monkeypatch.setattr(facts, "cached_complex_defined", lambda: defined)
    monkeypatch.setattr(hooks, "check_request", lambda *a, **k: (IMAGE, None, None))
    out = io.StringIO()
    hooks.jsv(Settings(), io.StringIO(f"START\n{params}BEGIN\nQUIT\n"), out)
    return out.getvalue().splitlines()[1:]


def test_jsv_adds_the_soft_request_when_the_cell_has_the_complex(monkeypatch, tmp_path):
    assert _jsv(monkeypatch, tmp_path, True, "PARAM l_soft arch=lx-amd64\n") == [
        "PARAM ac vmwrap_image=busybox", "PARAM l_soft arch=lx-amd64,vmwrap_cached=*+busybox+*",
        "RESULT STATE CORRECT"]
    assert _jsv(monkeypatch, tmp_path, True, "PARAM ac vmwrap_image=busybox\n") == [
        "PARAM l_soft vmwrap_cached=*+busybox+*", "RESULT STATE CORRECT"]


def test_jsv_asks_for_nothing_without_the_complex_or_when_the_job_names_it(monkeypatch, tmp_path):
    assert _jsv(monkeypatch, tmp_path, False, "") == ["PARAM ac vmwrap_image=busybox", "RESULT STATE CORRECT"]
    assert _jsv(monkeypatch, tmp_path, True, "PARAM ac vmwrap_image=busybox\nPARAM l_hard vmwrap_cached=*\n") == [
        "RESULT STATE ACCEPT"]


# -- the real cell ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    with module_cell("sgeplace", appliance, virt_type, hosts=2) as c:
        try:
            yield c
        finally:
            c.run("qdel", "-f", "-u", "vmwrapuser")
            _undefine(c)


def _undefine(cell) -> None:
    for h in cell.hosts:
        qconf("-dattr", "exechost", "complex_values", facts.CACHED, h, check=False)
    text = qconf("-sc").stdout
    if any(ln.split()[:1] == [facts.CACHED] for ln in text.splitlines()):
        f = cell.base / "complex"
        f.write_text("".join(ln + "\n" for ln in text.splitlines() if ln.split()[:1] != [facts.CACHED]))
        qconf("-Mc", str(f))


def _define(cell) -> None:
    """What the admin does, as `vmwrap config render sge` says: the complex line into the list."""
    from vmwrap_plugins.sge.render import render_sge

    line = next(ln.strip() for ln in render_sge().splitlines() if ln.strip().startswith(facts.CACHED + " "))
    f = cell.base / "complex"
    f.write_text(qconf("-sc").stdout.rstrip("\n") + "\n" + line + "\n")
    qconf("-Mc", str(f))


@pytest.fixture
def jobdir(cell, test_user):
    return sge_jobs.jobdir(cell, test_user)


def qsub(cell, jobdir) -> str:
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(f"#!/bin/sh\n#VMWRAP --image={IMAGE}\necho in-vm\n")
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip()


def ran_on(cell, job: str, timeout: float = 180) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = cell.run("qacct", "-j", job)
        if r.returncode == 0 and cell.run("qstat", "-j", job).returncode != 0:
            acct = dict(re.findall(r"^(\w+)\s+(.*?)\s*$", r.stdout, re.M))
            assert acct.get("exit_status") == "0", r.stdout
            return acct["hostname"]
        time.sleep(1)
    raise AssertionError(f"job {job} did not finish: {cell.run('qstat', '-j', job).stdout}")


def vmwrap(cell, host: str, *argv: str) -> subprocess.CompletedProcess:
    r = subprocess.run(["vmwrap", "--config", cell.configs[host], *argv], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, (argv, r.stdout, r.stderr)
    return r


def hold_only_on(cell, holder: str) -> None:
    """The image in `holder`'s cache alone; each host's prestager publishes what it holds."""
    for h in cell.hosts:
        if h == holder:
            vmwrap(cell, h, "cache", "fetch", IMAGE)
        else:
            r = subprocess.run(["vmwrap", "--config", cell.configs[h], "cache", "evict", IMAGE],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 or "not cached" in (r.stdout + r.stderr).lower(), r.stderr
        vmwrap(cell, h, "sge", "prestage", "--node", h, "--once")
    for h in cell.hosts:
        want = f"+{IMAGE}+" if h == holder else "+"
        assert facts.host_complex_values(qconf("-se", h).stdout).get(facts.CACHED) == want, qconf("-se", h).stdout


vm = pytest.mark.vm


@vm
def test_without_the_complex_jobs_run_and_ask_for_no_host(cell, jobdir):
    _undefine(cell)
    job = qsub(cell, jobdir)
    soft = cell.run("qstat", "-j", job).stdout
    assert "soft resource_list" not in soft, soft
    assert ran_on(cell, job) in cell.hosts


@vm
@pytest.mark.parametrize("holder", ["second", "first"])
def test_jobs_land_on_the_host_that_holds_their_image(cell, jobdir, holder):
    host = HOST2 if holder == "second" else cell.host
    _define(cell)
    try:
        facts._sc_seen.clear()
        hold_only_on(cell, host)
        for _ in range(3):
            job = qsub(cell, jobdir)
            info = cell.run("qstat", "-j", job).stdout
            assert re.search(r"soft resource_list:\s+vmwrap_cached=\*\+busybox\+\*", info), info
            assert ran_on(cell, job) == host
    finally:
        _undefine(cell)
