"""HTCondor: VM jobs rank execute nodes whose vmwrap cache holds their image (the startd's probe
publishes VmwrapCachedImages, the submit transform adds to Rank), and `#VMWRAP` lines in the job's
executable ask for a VM like +VmwrapImage (checked on the execute node: the schedd never reads the
executable). Light tests need only the HTCondor root (classad_eval); the pool tests boot VMs."""

from __future__ import annotations

import os
import socket as so
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, STARTDS, VmwrapSite
from vmwrap.config import Settings
from vmwrap.resources import HOOKS

USER = "vmwrapuser"

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)


# -- light: what reaches a ClassAd, the Rank, the directives ------------------------------------

def test_cached_images_are_validated_before_they_reach_a_classad(tmp_path):
    """Only image names reach VmwrapCachedImages; the probe (the real wrapper, run by the startd)
    publishes the prestager's line only when it is exactly such a list."""
    from vmwrap_plugins.htcondor.hooks import HTCondor, cached_ad

    assert cached_ad(["other", "busybox", "../x", 'a"b', "a b", "x+y", "ok.1_-2", "busybox"]) == \
        'VmwrapCachedImages = "+busybox+ok.1_-2+other+"'
    assert cached_ad([]) == 'VmwrapCachedImages = "+"'
    assert len(cached_ad([f"img{i:05d}" for i in range(2000)])) < 4100  # bounded
    sock = tmp_path / "condor.sock"
    probe = [sys.executable, "-I", str(HOOKS / "condor-wrapper"), "--socket", str(sock), "--fault-ad"]

    def published() -> str:
        out = subprocess.run(probe, capture_output=True, text=True, timeout=30).stdout.splitlines()
        return [ln for ln in out if ln.startswith("VmwrapCachedImages")][0]

    assert published() == "VmwrapCachedImages = undefined"  # no prestager yet
    HTCondor(cached_file=Path(str(sock) + ".cached")).publish_cached("n", ["busybox", "bad name"])
    assert published() == 'VmwrapCachedImages = "+busybox+"'
    for forged in ('VmwrapCachedImages = "+a+" || true', 'VmwrapCachedImages = "+a+"\nHasVmwrap = false',
                   'VmwrapCachedImages = "+a"+b+"', 'VmwrapCachedImages = "+../x+"', "Foo = 1"):
        Path(str(sock) + ".cached").write_text(forged + "\n")
        assert published() == "VmwrapCachedImages = undefined", forged
    link = tmp_path / "elsewhere.cached"
    link.write_text('VmwrapCachedImages = "+busybox+"\n')
    Path(str(sock) + ".cached").unlink()
    Path(str(sock) + ".cached").symlink_to(link)
    assert published() == "VmwrapCachedImages = undefined"  # no link followed


def _eval(expr: str, my: str, target: str) -> str:
    """classad_eval of the root's HTCondor: `expr` in the job ad `my` against the machine ad `target`."""
    d = ROOT / "tmp" / f"vmwrap-rank-{os.getpid()}"
    d.mkdir(exist_ok=True)
    try:
        (d / "target.ad").write_text(f"[ {target} ]\n")
        r = subprocess.run(["chroot", str(ROOT), "/usr/bin/env", "-i", "CONDOR_CONFIG=/dev/null",
                            "/usr/bin/classad_eval", "-target-file", f"/tmp/{d.name}/target.ad", "-quiet",
                            *[a.strip() for a in my.split(";") if a.strip()], expr],
                           capture_output=True, text=True, timeout=30)
    finally:
        (d / "target.ad").unlink(missing_ok=True)
        d.rmdir()
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_rank_prefers_a_node_holding_the_image_on_top_of_the_users_rank():
    from vmwrap_plugins.htcondor.render import rank_expr

    e = rank_expr(1000)
    job = 'VmwrapImage = "busybox"'
    holds, other = 'VmwrapCachedImages = "+a+busybox+"; Memory = 512', 'VmwrapCachedImages = "+busybox2+"; Memory = 512'
    assert float(_eval(e, job + "; VmwrapUserRank = 0.0", holds)) == 1000.0
    assert float(_eval(e, job + "; VmwrapUserRank = 0.0", other)) == 0.0           # no prefix/substring match
    assert float(_eval(e, job, "Memory = 512")) == 0.0                                # nothing advertised, no rank
    assert float(_eval(e, job + "; VmwrapUserRank = Memory", holds)) == 1512.0        # the user's rank is kept
    assert float(_eval(e, job + "; VmwrapUserRank = Memory", other)) == 512.0
    assert float(_eval(e, job + "; VmwrapUserRank = TARGET.Nope", holds)) == 1000.0   # undefined: 0


def test_directives_in_the_executable_make_a_vm_job(tmp_path, test_user):
    from vmwrap.errors import UserError
    from vmwrap_plugins.htcondor.hooks import job_from_ad

    ad = {"ClusterId": 3, "ProcId": 0, "RequestCpus": 1, "RequestMemory": 512}
    job = job_from_ad(ad, test_user.pw_uid, str(tmp_path), "#!/bin/sh\n#VMWRAP --image=busybox --memory=256M\necho\n")
    assert (job.image, job.script.splitlines()[1]) == ("busybox", "#VMWRAP --image=busybox --memory=256M")
    assert job_from_ad(ad, test_user.pw_uid, str(tmp_path), "#!/bin/sh\necho\n#VMWRAP --image=busybox\n") is None
    assert job_from_ad({**ad, "VmwrapImage": "busybox"}, test_user.pw_uid, str(tmp_path),
                       "#!/bin/sh\n#VMWRAP --image=busybox\n").image == "busybox"
    for script, reason in (("#VMWRAP --image=../etc\n", "invalid image name"),
                           ("#VMWRAP --image=busybox --image=x\n", "duplicate"),
                           ("#VMWRAP --imag=busybox\n", "unknown directive --imag"),
                           ("#VMWRAP --image=busybox --memory=10G0\n", "not a size"),
                           ("#VMWRAP --image='busybox'\n", "invalid image name")):
        with pytest.raises(UserError, match=reason):
            job_from_ad(ad, test_user.pw_uid, str(tmp_path), "#!/bin/sh\n" + script)
    with pytest.raises(UserError, match="ask for one image"):
        job_from_ad({**ad, "VmwrapImage": "busybox"}, test_user.pw_uid, str(tmp_path), "#VMWRAP --image=other\n")


def test_wrapper_asks_the_bridge_for_a_directive_job_and_reads_no_link(tmp_path):
    """A job without VmwrapImage goes to the bridge when its executable has a #VMWRAP line (the head
    travels in the request), runs as usual without one; a link or a FIFO as executable is not read."""
    from vmwrap_plugins.htcondor.bridge import receive

    sock = tmp_path / "b.sock"
    srv = so.socket(so.AF_UNIX, so.SOCK_STREAM)
    srv.bind(str(sock))
    srv.listen(4)
    got = []

    def answer():
        while True:
            try:
                c, _ = srv.accept()
            except OSError:
                return
            with c:
                fds, req = receive(c, timeout=10)
                for fd in fds:
                    os.close(fd)
                got.append(req)
                c.sendall(b'{"exit": 3}\n')

    threading.Thread(target=answer, daemon=True).start()
    ad = tmp_path / ".job.ad"
    ad.write_text("ClusterId = 5\nProcId = 0\n")
    env = {"PATH": "/usr/bin:/bin", "_CONDOR_JOB_AD": str(ad)}
    wrapper = [sys.executable, "-I", str(HOOKS / "condor-wrapper"), "--socket", str(sock)]
    script = tmp_path / "job.sh"
    script.write_text("#!/bin/sh\n#VMWRAP --image=busybox\necho bare\n")
    script.chmod(0o755)
    r = subprocess.run(wrapper + [str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout) == (3, ""), r.stderr
    assert got[-1]["script"] == script.read_text() and got[-1]["argv"] == [str(script)]
    script.write_text("#!/bin/sh\necho bare\n")
    r = subprocess.run(wrapper + [str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, len(got)) == (0, "bare\n", 1)
    big = tmp_path / "big.sh"  # bounded: the head is cut at a whole line
    big.write_text("#!/bin/sh\n#VMWRAP --image=busybox\n" + "# filler line\n" * 10000 + "echo bare\n")
    big.chmod(0o755)
    r = subprocess.run(wrapper + [str(big)], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 3 and len(got[-1]["script"]) <= 1 << 16 and got[-1]["script"].endswith("\n")
    link = tmp_path / "link.sh"
    link.symlink_to(tmp_path / "big.sh")
    r = subprocess.run(wrapper + [str(link)], env=env, capture_output=True, text=True, timeout=30)
    assert (r.returncode, r.stdout, len(got)) == (0, "bare\n", 2)  # not read through the link: runs as usual
    srv.close()


# -- on the pool -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-condor-place-{os.getpid()}"), appliance, virt_type) as site:
        yield site


def _all_free(condor) -> bool:
    """Every startd's whole (partitionable) slot is free: no dynamic slot of an earlier job is left,
    which would make the other node the only one with room."""
    ads = condor.pool.query("startds", "true", ["Name", "Cpus", "State"])
    return len(ads) == len(STARTDS) and all(a["Cpus"] == 1 and a["State"] == "Unclaimed" for a in ads)


def _cache_only_on(condor, holder: str, appliance) -> None:
    """The image in `holder`'s cache only; every startd's prestager pass publishes what it holds."""
    import shutil

    from vmwrap.cache import Cache

    for s in STARTDS:
        shutil.rmtree(condor.node_cache_dir(s), ignore_errors=True)
    cache = Cache(condor.node_cache_dir(holder), 1 << 34)
    for art in appliance.artifacts().values():
        cache.fetch(art)
    for s in STARTDS:
        r = condor.advertise(s)
        assert r.returncode == 0, r.stdout + r.stderr
    want = {s: ('+busybox+' if s == holder else '+') for s in STARTDS}

    def published():
        ads = condor.pool.query("startds", "true", ["VmwrapStartd", "VmwrapCachedImages", "State"])
        seen = {a["VmwrapStartd"]: a.get("VmwrapCachedImages") for a in ads}
        return seen == want and _all_free(condor)

    condor.wait_until(published, f"VmwrapCachedImages {want} on unclaimed startds", 60)


@pytest.mark.vm
@pytest.mark.parametrize("holder", ["node2", "node1"])
def test_vm_jobs_go_to_the_node_that_caches_their_image(condor, appliance, holder):
    """Both nodes are free and equal but for the cache: three VM jobs in a row all run on `holder`."""
    _cache_only_on(condor, holder, appliance)
    for i in range(3):
        d = condor.jobdir()
        cluster, r = condor.submit(d, "executable = /bin/echo\narguments = hi\ntransfer_executable = false\n"
                                      "output = out.txt\nerror = err.txt\nrequest_memory = 512\n"
                                      '+VmwrapImage = "busybox"\nqueue\n')
        assert cluster > 0, r.stderr
        ad = condor.pool.wait_job(cluster, 0, (4, 5), 180, ["LastRemoteHost", "RemoteHost", "HoldReason", "Rank"])
        assert ad["JobStatus"] == 4, (ad, condor.logs())
        host = ad.get("LastRemoteHost") or ad.get("RemoteHost") or ""
        assert f"@{holder}@" in host, (i, ad)
        assert "created" in [e for e, _ in condor.ledger(f"{cluster}.0")]  # it ran in a VM
        condor.wait_until(lambda: _all_free(condor), "free startds", 90)


DIRECTIVE_JOB = """#!/bin/sh
#VMWRAP {directive}
echo "ran $1"
"""


def _directive_job(condor, directive: str) -> tuple[Path, int]:
    d = condor.jobdir()
    (d / "job.sh").write_text(DIRECTIVE_JOB.format(directive=directive))
    (d / "job.sh").chmod(0o755)
    os.chown(d / "job.sh", 1234, 1234)
    cluster, r = condor.submit(d, "executable = job.sh\narguments = x\noutput = out.txt\nerror = err.txt\n"
                                  "request_memory = 512\nqueue\n")
    assert cluster > 0, r.stderr
    return d, cluster


@pytest.mark.vm
def test_a_directive_in_the_executable_runs_the_job_in_a_vm(condor):
    d, cluster = _directive_job(condor, "--image=busybox")
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 180, ["ExitCode", "HoldReason", "VmwrapImage"])
    assert (ad["JobStatus"], ad["ExitCode"], ad["VmwrapImage"]) == (4, 0, None), (ad, condor.logs())
    assert (d / "out.txt").read_text() == "ran x\n"
    assert "created" in [e for e, _ in condor.ledger(f"{cluster}.0")]


@pytest.mark.vm
@pytest.mark.parametrize("directive,reason", [
    ("--image=../etc/passwd", "vmwrap: line 2: invalid image name '../etc/passwd'"),
    ("--image=busybox --cpus=two", "vmwrap: line 2: --cpus=two: not a whole number"),
    ("--image=nope", "vmwrap: unknown image 'nope'"),
])
def test_a_bad_directive_holds_the_job_with_the_reason(condor, directive, reason):
    _, cluster = _directive_job(condor, directive)
    ad = condor.pool.wait_job(cluster, 0, (4, 5), 120, ["HoldReason"])
    assert ad["JobStatus"] == 5 and ad["HoldReason"].startswith(reason), (ad, condor.logs())
    assert "created" not in [e for e, _ in condor.ledger(f"{cluster}.0")]
    condor.pool.run("/usr/bin/condor_rm", str(cluster), user=USER)


def test_the_transforms_rank_vm_jobs_and_ready_every_vanilla_job_for_a_hold(appliance, tmp_path):
    """condor_transform_ads with the rendered submit side: a VM job's Rank adds the cache term to the
    user's rank; any vanilla job (its executable may say #VMWRAP) gets the chirp hold path."""
    from vmwrap.catalog import register
    from vmwrap_plugins.htcondor.render import submit_side

    register(str(tmp_path / "images.toml"), appliance)
    d = ROOT / "tmp" / f"vmwrap-xf-{os.getpid()}"
    d.mkdir(exist_ok=True)
    try:
        (d / "config").write_text(submit_side(Settings(catalog=str(tmp_path / "images.toml"))) + "\n")
        (d / "ads").write_text('JobUniverse = 5\nRank = Memory\nVmwrapImage = "busybox"\nRequirements = true\n\n'
                               'JobUniverse = 5\nCmd = "/bin/true"\nRequirements = true\n')
        r = subprocess.run(["chroot", str(ROOT), "/usr/bin/env", "-i", f"CONDOR_CONFIG=/tmp/{d.name}/config",
                            "/usr/bin/condor_transform_ads", "-jobtransforms", "VmwrapHold,Vmwrap",
                            "-in", f"/tmp/{d.name}/ads"], capture_output=True, text=True, timeout=30)
    finally:
        for f in d.iterdir():
            f.unlink()
        d.rmdir()
    ads = r.stdout.strip().split("\n\n")
    assert len(ads) == 2, r.stdout + r.stderr  # (it exits 1 even when it transformed both)
    vm, bare = (dict(ln.split(" = ", 1) for ln in ad.splitlines()) for ad in ads)
    assert vm["VmwrapUserRank"] == "Memory"
    assert vm["Rank"].startswith("ifThenElse(isReal(real(VmwrapUserRank)),real(VmwrapUserRank),0.0) + "), vm
    assert 'stringListMember(VmwrapImage,TARGET.VmwrapCachedImages,"+") =?= true,1000.0,0.0)' in vm["Rank"], vm
    assert "Rank" not in bare and bare["WantIOProxy"] == "true" and "VmwrapHoldReason" in bare["OnExitHold"]
