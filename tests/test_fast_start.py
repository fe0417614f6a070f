"""Fast start (vmwrap/snapshot.py): jobs restored from a pre-booted template behave as cold-booted ones,
two clones of one template share nothing, and a stale or corrupt snapshot means a cold boot.

One site for the module (its template is prepared once, by the first test): real libvirt, real guests."""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from conftest import VMWRAP, Site

pytestmark = pytest.mark.vm

HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


def reachable(base: Path) -> None:
    """QEMU and the work dir server (not root) must reach the site's files: let everyone traverse
    pytest's private base dirs (again before each test: another pytest session starting on this host
    makes /tmp/pytest-of-root 0700 again)."""
    os.chmod(base, 0o755)
    for parent in base.parents:
        if parent == Path("/tmp") or parent == parent.parent:
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o111)


@pytest.fixture(scope="module")
def fast_site(tmp_path_factory, appliance, virt_type):
    base = tmp_path_factory.mktemp("fast")
    reachable(base)
    s = Site(base, appliance, virt_type, fast_start=True)
    s.work = base / "work"
    s.work.mkdir()
    s.work.chmod(0o777)
    yield s
    for left in s.domains():
        subprocess.run(["virsh", "-c", "qemu:///system", "destroy", left], capture_output=True)


@pytest.fixture
def fast(fast_site):
    reachable(fast_site.base)
    return fast_site


def created(site, n: int = 1) -> list[dict]:
    """The `created` ledger records of the site's last n jobs."""
    from vmwrap.ledger import Ledger

    ev = [e for e in Ledger(site.settings().ledger_path).events() if e["event"] == "created"]
    return [e["detail"] for e in ev[-n:]]


def snapshot_files(site) -> tuple[Path, Path]:
    d = Path(site.settings().cache_dir) / "snapshots"
    save = next(d.glob("*.save"))
    return save, save.with_suffix(".json")


def test_restored_job_is_the_cold_booted_job(fast):
    job = HDR + "echo out; echo err >&2; cat /.vmwrap/workdir; echo; exit 3\n"
    cold = fast.run(job, fast.work)
    assert cold.returncode == 3, cold.stderr
    assert created(fast)[0]["started_from"] == "boot" and "no snapshot" in created(fast)[0]["snapshot"]
    r = subprocess.run(VMWRAP + ["snapshot", "prepare", "busybox"], capture_output=True, text=True,
                       env=fast.env(), timeout=300)
    assert r.returncode == 0, r.stderr
    save, meta = snapshot_files(fast)
    assert (save.stat().st_uid, save.stat().st_mode & 0o777, save.parent.stat().st_mode & 0o777) == (0, 0o600, 0o711)
    t0 = time.monotonic()
    warm = fast.run(job, fast.work)
    took = time.monotonic() - t0
    assert created(fast)[0]["started_from"] == "snapshot", created(fast)[0].get("snapshot")
    assert (warm.returncode, warm.stdout, warm.stderr) == (cold.returncode, cold.stdout, cold.stderr) == \
        (3, f"out\n{fast.work}\n".encode(), b"err\n")
    assert fast.leftovers() == []
    print(f"snapshot job took {took:.2f} s")


def test_two_clones_of_one_template_share_nothing(fast):
    """Both restored at once from one file: own random stream, machine id, disk and /tmp; the host's time."""
    for f in ("A-wrote", "B-checked"):
        (fast.work / f).unlink(missing_ok=True)
    probe = ("head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; cat /etc/machine-id; date +%s; "
             "cat /proc/cmdline\n")
    a = HDR + probe + ('echo A > /tmp/mark-A; echo A > /mark-A; touch A-wrote; i=0; '
                       'while [ ! -e B-checked ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n')
    b = HDR + probe + ('i=0; while [ ! -e A-wrote ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done; '
                       'ls /tmp /; touch B-checked\n')
    pa = fast.popen(a, fast.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    pb = fast.popen(b, fast.work, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    outs = [p.communicate(timeout=180) for p in (pa, pb)]
    host_now = time.time()
    assert (pa.returncode, pb.returncode) == (0, 0), outs
    assert [d["started_from"] for d in created(fast, 2)] == ["snapshot", "snapshot"]
    (ra, ida, ta, cmda, *_), (rb, idb, tb, cmdb, *rest_b) = (o[0].decode().split("\n") for o in outs)
    assert "vmwrap.template" in cmda and "vmwrap.template" in cmdb   # both really are clones
    assert len(ra) == len(rb) == 64 and ra != rb
    assert len(ida) == len(idb) == 32 and ida != idb
    # Each clone's clock is the host's (the template was saved more than a test ago).
    assert abs(int(ta) - host_now) < 30 and abs(int(tb) - host_now) < 30
    assert abs(int(ta) - int(tb)) <= 5
    assert "mark-A" not in "\n".join(rest_b) and (fast.work / "A-wrote").exists()
    assert fast.leftovers() == []


def test_clock_is_the_hosts(fast):
    """A clone's clock is the host's, not the template's (saved before the previous tests ran)."""
    save, _ = snapshot_files(fast)
    time.sleep(max(0.0, 6 - (time.time() - save.stat().st_mtime)))  # older than the tolerance below
    t0 = time.time()
    r = fast.run(HDR + "date +%s\n", fast.work)
    t1 = time.time()
    d = created(fast)[0]
    assert d["started_from"] == "snapshot", d.get("snapshot")  # the record says why a clone fell back
    # Within the run (whole seconds, 1 s of slack): the template's clock would read its save time, >= 6 s
    # before the run began. (The end of the run is no bound tighter than that: a loaded host tears down slowly.)
    assert t0 - 1 <= int(r.stdout) <= t1 + 1, (r.stdout, t0, t1, t0 - save.stat().st_mtime)


def test_stale_snapshot_is_not_used(fast):
    save, meta = snapshot_files(fast)
    orig = meta.read_text()
    m = json.loads(orig)
    m["inputs"]["qemu"] += 1  # as if QEMU had been upgraded since the template was saved
    meta.write_text(json.dumps(m))
    try:
        r = fast.run(HDR + "echo fine\n", fast.work)
    finally:
        meta.write_text(orig)
    assert (r.returncode, r.stdout) == (0, b"fine\n")
    d = created(fast)[0]
    assert d["started_from"] == "boot" and "stale" in d["snapshot"], d
    assert fast.leftovers() == []


def test_corrupt_snapshot_falls_back_to_a_cold_boot(fast):
    from vmwrap import snapshot

    save, _ = snapshot_files(fast)
    with open(save, "r+b") as f:
        head = f.read(snapshot.HEADER)
        data_len = int.from_bytes(head[20:24], "little")
        f.seek(snapshot.HEADER + data_len)  # QEMU's stream: same size, garbage where its magic was
        orig = f.read(64)
        f.seek(snapshot.HEADER + data_len)
        f.write(os.urandom(64))
    try:
        r = fast.run(HDR + "echo fine; echo err >&2; exit 5\n", fast.work)
    finally:
        with open(save, "r+b") as f:
            f.seek(snapshot.HEADER + data_len)
            f.write(orig)
    assert (r.returncode, r.stdout, r.stderr) == (5, b"fine\n", b"err\n")
    d = created(fast)[0]
    assert d["started_from"] == "boot" and "restore failed" in d["snapshot"], d
    assert fast.leftovers() == []


def test_a_job_started_from_the_snapshot_is_checkpointed_and_restored(fast, test_user):
    """Preemption still loses nothing: the clone is saved into the checkpoint store and restored."""
    from vmwrap import checkpoint, launcher, payload
    from vmwrap.job import Job

    work = fast.base / "ckpt-work"
    work.mkdir()
    os.chown(work, test_user.pw_uid, test_user.pw_gid)
    settings = fast.settings()
    store = checkpoint.Store(fast.base / "ckpt", checkpoint.keygen(fast.base / "ckpt.key"))
    checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
    script = HDR + "i=0; while :; do i=$((i+1)); echo n=$i; sleep 1; done\n"

    def job(restarts):
        return Job("fast1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid, str(work), script,
                   restart_count=restarts)

    def wait_out(run_dir, text, timeout=120):
        end = time.time() + timeout
        while text not in (run_dir / "stdout").read_bytes():
            assert time.time() < end, [(f, (run_dir / f).read_bytes()[-1500:]) for f in
                                       ("stdout", "stderr", "status", "console.log") if (run_dir / f).exists()]
            time.sleep(0.2)

    try:
        lx = launcher.Launcher(job(0), settings)
        lx.prepare()
        lx.boot()
        assert created(fast)[0]["started_from"] == "snapshot", created(fast)[0].get("snapshot")
        att = payload.Attachment(lx.run_dir, "fast1", conn=lx.conn)
        att.start(script, {"PATH": "/bin:/usr/bin"}, [])
        wait_out(lx.run_dir, b"n=3\n")
        att.control.close()
        checkpoint.save("fast1", lx.run_dir, store, lx.conn, 1)
        launcher.teardown("fast1", settings)
        lx2 = launcher.Launcher(job(1), settings)
        lx2.prepare()
        lx2.restore(store)
        wait_out(lx2.run_dir, b"n=5\n")
        assert (lx2.run_dir / "stdout").read_bytes().startswith(b"n=1\nn=2\nn=3\n")
    finally:
        launcher.teardown("fast1", settings)
    assert fast.leftovers() == []


@pytest.mark.parametrize("args, says", [(["--memory", "64"], "--memory=64M: a guest needs 128M"),
                                        (["--cpus", "999"], "--cpus=999: this node has"),
                                        (["--image-typo"], "No such option"),
                                        (["nosuch"], "no image 'nosuch' in the catalog")])
def test_prepare_refuses_bad_input_in_one_line_and_leaves_nothing(site, args, says):
    argv = args if args == ["nosuch"] else ["busybox", *args]
    r = subprocess.run(VMWRAP + ["snapshot", "prepare", *argv], capture_output=True, text=True, env=site.env(),
                       timeout=120)
    assert r.returncode != 0 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (site.cache / "snapshots").exists()
