"""QEMU never runs as root and a job's files are its own (security issue, findings 2 and 7).

A batch user is root inside their VM: these tests make the guest's job root on purpose (the control
file says uid 0) and check that nothing it does reaches the host as root."""

import hashlib
import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest


HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


def qemu_uid(name: str) -> int | None:
    """uid of the running QEMU of domain `name` (from /proc, not from libvirt's word)."""
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            cmd = (d / "cmdline").read_bytes()
            status = (d / "status").read_text()
        except OSError:
            continue
        if b"qemu-system" in cmd and f"guest={name},".encode() in cmd:
            return int(next(ln for ln in status.splitlines() if ln.startswith("Uid:")).split()[1])
    return None


def run_in_process(site, job, monkeypatch, guest_root: bool = False, during=None) -> tuple[int, bytes, bytes]:
    """launcher.run in this process (so the test can make the guest job root), output captured."""
    from vmwrap import launcher

    if guest_root:
        orig = launcher.Launcher._write_control

        def as_guest_root(self):
            orig(self)
            (self.run_dir / "ctl" / "ids").write_text("0 0 - 22\n")  # the user is root in the guest
        monkeypatch.setattr(launcher.Launcher, "_write_control", as_guest_root)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    chunks = {out_r: [], err_r: []}

    def drain(fd):
        while buf := os.read(fd, 65536):
            chunks[fd].append(buf)
    threads = [threading.Thread(target=drain, args=(fd,), daemon=True) for fd in (out_r, err_r)]
    for t in threads:
        t.start()
    watcher = None
    if during is not None:
        watcher = threading.Thread(target=during, daemon=True)
        watcher.start()
    code = launcher.run(job, site.settings(), out_fd=out_w, err_fd=err_w)
    os.close(out_w)
    os.close(err_w)
    for t in threads:
        t.join(10)
    if watcher is not None:
        watcher.join(60)
    return code, b"".join(chunks[out_r]), b"".join(chunks[err_r])


def make_job(script: str, workdir: Path, pw, job_id: str):
    from vmwrap.job import Job

    return Job(job_id=job_id, scheduler="none", user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
               work_dir=str(workdir), script=script, environment={"PATH": "/bin:/usr/bin"})


@pytest.fixture
def userdir(workdir, test_user):
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    workdir.chmod(0o755)
    return workdir


def test_qemu_runs_as_the_jobs_user_and_its_files_are_private(site, userdir, test_user, monkeypatch):
    seen = {}
    name = "vmwrap-sec-ids"
    run_dir = site.state / "jobs" / "sec-ids"

    def look():
        end = time.monotonic() + 60
        while time.monotonic() < end:
            uid = qemu_uid(name)
            if uid is not None and (run_dir / "overlay.qcow2").exists():
                seen["qemu_uid"] = uid
                for f in ("overlay.qcow2", "stdout", "stderr", "status", "console.log"):
                    st = os.stat(run_dir / f)
                    seen[f] = (st.st_uid, stat.S_IMODE(st.st_mode))
                return
            time.sleep(0.05)

    job = make_job(HDR + "sleep 3; echo done\n", userdir, test_user, "sec-ids")
    code, out, err = run_in_process(site, job, monkeypatch, during=look)
    assert code == 0, err
    assert out == b"done\n"
    assert seen.get("qemu_uid") == test_user.pw_uid, seen
    for f in ("overlay.qcow2", "stdout", "stderr", "status", "console.log"):
        assert seen[f] == (test_user.pw_uid, 0o600), (f, seen[f])


def test_a_root_jobs_qemu_is_not_root(site, workdir, monkeypatch):
    import pwd

    seen = {}

    def look():
        end = time.monotonic() + 60
        while time.monotonic() < end and "uid" not in seen:
            uid = qemu_uid("vmwrap-sec-rootjob")
            if uid is not None:
                seen["uid"] = uid
            time.sleep(0.05)

    job = make_job(HDR + "sleep 2; id -u\n", workdir, pwd.getpwuid(0), "sec-rootjob")
    code, out, err = run_in_process(site, job, monkeypatch, during=look)
    assert code == 0, err
    assert out == b"0\n"
    assert seen.get("uid") == pwd.getpwnam("libvirt-qemu").pw_uid


@pytest.mark.parametrize("share", ["serial", "virtio-9p"])
def test_guest_root_cannot_make_root_owned_or_setuid_root_files_on_the_host(share, tmp_path, appliance, virt_type,
                                                                            userdir, test_user, monkeypatch):
    from conftest import Site

    site = Site(tmp_path / "site", appliance, virt_type, workdir_share=share)
    script = HDR + "id -u; echo x > evil; chown 0:0 evil; chmod 4755 evil; mknod dev c 1 1; true\n"
    job = make_job(script, userdir, test_user, f"sec-9p-{share.replace('-', '')}")
    code, out, err = run_in_process(site, job, monkeypatch, guest_root=True)
    assert out.startswith(b"0\n"), err  # the job really was root in its VM
    st = os.lstat(userdir / "evil")
    assert st.st_uid == test_user.pw_uid, f"{share}: host file owned by uid {st.st_uid}"
    assert not (st.st_uid == 0 and st.st_mode & stat.S_ISUID)
    dev = userdir / "dev"
    assert not (dev.exists() and stat.S_ISCHR(os.lstat(dev).st_mode)), f"{share}: guest made a device node"


def test_a_work_dir_the_user_does_not_own_is_refused(site, tmp_path, test_user, monkeypatch):
    job = make_job(HDR + "cat /etc/shadow\n", Path("/"), test_user, "sec-chdir")
    code, out, err = run_in_process(site, job, monkeypatch)
    assert code == 64
    assert b"work dir / belongs to uid 0, not to the job's user" in err
    assert site.leftovers() == []


def test_restricted_image_blob_readable_only_by_its_running_jobs_users(tmp_path, test_user):
    from vmwrap.cache import Cache
    from vmwrap.catalog import Artifact

    src = tmp_path / "disk.img"
    src.write_bytes(b"secret image bytes" * 1000)
    art = Artifact(str(src), hashlib.sha256(src.read_bytes()).hexdigest(), src.stat().st_size)
    cache_root = tmp_path / "cache"
    c = Cache(cache_root, 1 << 30)
    os.chmod(tmp_path, 0o755)
    for parent in tmp_path.parents:
        if parent == Path("/tmp"):
            break
        os.chmod(parent, os.stat(parent).st_mode | 0o111)

    def readable_by(user: str) -> bool:
        return subprocess.run(["runuser", "-u", user, "--", "head", "-c1", str(c.blob(art.sha256))],
                              capture_output=True).returncode == 0

    c.pin(art.sha256, "j1", test_user.pw_uid)
    c.fetch(art)
    assert stat.S_IMODE(c.blob(art.sha256).stat().st_mode) == 0o400  # root-only until someone decides
    assert not readable_by(test_user.pw_name)
    c.restrict(art.sha256)
    assert readable_by(test_user.pw_name)      # the running job's user (its QEMU) may read it
    assert not readable_by("nobody")            # nobody else
    c.unpin_job("j1")
    assert not readable_by(test_user.pw_name)  # gone with the job
    c.publish(art.sha256)
    assert readable_by("nobody")                # an open image's blob is for everyone


def test_a_restricted_images_job_boots_with_kernel_and_initrd_kept_from_other_users(site, userdir, appliance,
                                                                                      test_user):
    """The launcher granted a restricted image's disk to its users only but published its kernel and
    initrd 0444 to everyone on the node: they may hold what the site restricts the image for."""
    import dataclasses

    from vmwrap.catalog import register

    register(str(site.catalog), dataclasses.replace(appliance, name="private", users=[test_user.pw_name]))
    r = site.run("#!/bin/sh\n#VMWRAP --image=private\necho booted\n", userdir, "--user", test_user.pw_name)
    assert r.returncode == 0, r.stderr.decode()[-2000:]
    assert r.stdout == b"booted\n"                       # its QEMU (the job's user) could read them all
    for art in (appliance.kernel, appliance.initrd):
        blob = site.cache / "blobs" / art.sha256
        assert not blob.stat().st_mode & 0o004, art          # not published (an ACL may show as group bits)
        assert subprocess.run(["runuser", "-u", "nobody", "--", "head", "-c1", str(blob)],
                              capture_output=True).returncode != 0
    assert site.leftovers() == []


def test_every_vm_has_a_hard_memory_limit(site, userdir, test_user, monkeypatch):
    """QEMU's whole memory (guest RAM + QEMU itself) is capped by its cgroup, set before the guest runs."""
    import libvirt

    from vmwrap import domain

    seen = {}

    def look():
        conn = libvirt.open("qemu:///system")
        end = time.monotonic() + 60
        try:
            while time.monotonic() < end and "limit" not in seen:
                dom = domain.lookup(conn, "vmwrap-sec-mem")
                if dom is not None and dom.isActive() and dom.info()[0] == libvirt.VIR_DOMAIN_RUNNING:
                    seen["limit"] = domain.memory_limit_mib(dom)
                time.sleep(0.05)
        finally:
            conn.close()

    job = make_job(HDR + "#VMWRAP --memory=200M\nsleep 2\n", userdir, test_user, "sec-mem")
    code, out, err = run_in_process(site, job, monkeypatch, during=look)
    assert code == 0, err
    assert seen.get("limit") == 200 + site.settings().vm_memory_overhead_mib


def qemu_pid(name: str) -> int | None:
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if b"qemu-system" in (cmd := (d / "cmdline").read_bytes()) and f"guest={name},".encode() in cmd:
                    return int(d.name)
            except OSError:
                continue
    return None


@pytest.mark.parametrize("call", ["save", "pause"])
def test_a_user_who_stops_their_qemu_cannot_hang_roots_libvirt_calls(call, site, userdir, test_user, monkeypatch):
    """QEMU runs as the job's user, who may SIGSTOP it: root's save (epilog) and pause (node agent)
    would then wait on its monitor forever, and a hung epilog drains the node. The VM is destroyed
    within seconds instead and the call fails as the job's fault."""
    from vmwrap import agent, checkpoint, domain
    from vmwrap.errors import GuestStalledError

    name, job_id = f"vmwrap-sec-stop-{call}", f"sec-stop-{call}"
    run_dir = site.state / "jobs" / job_id
    seen = {}

    def attack():
        end = time.monotonic() + 120
        while time.monotonic() < end and not (userdir / "counting").exists():
            time.sleep(0.1)
        pid = qemu_pid(name)
        assert pid, "no QEMU"
        r = subprocess.run(["runuser", "-u", test_user.pw_name, "--", "kill", "-STOP", str(pid)])
        assert r.returncode == 0   # the job's user can stop their own QEMU
        settings = site.settings()
        conn = domain.connect(settings.libvirt_uri)
        t0 = time.monotonic()
        result = {}

        def root_call():
            try:
                if call == "save":
                    store = checkpoint.Store(site.base / "ckpt", checkpoint.keygen(site.base / "ckpt.key"))
                    checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
                    checkpoint.save(job_id, run_dir, store, conn, 1)
                else:
                    agent.handle(settings, conn, 0, "pause", job_id)
            except Exception as e:  # noqa: BLE001
                result["error"] = e
        t = threading.Thread(target=root_call, daemon=True)
        t.start()
        t.join(60)
        seen.update(result, returned=not t.is_alive(), took=time.monotonic() - t0)
        if t.is_alive():  # without the watchdog: let the test end
            subprocess.run(["kill", "-KILL", str(pid)])

    job = make_job(HDR + "touch counting; i=0; while :; do i=$((i+1)); sleep 1; done\n", userdir, test_user, job_id)
    code, out, err = run_in_process(site, job, monkeypatch, during=attack)
    assert seen["returned"] and seen["took"] < 20, seen
    assert isinstance(seen.get("error"), GuestStalledError), seen
    assert "QEMU was stopped" in str(seen["error"])
    assert qemu_pid(name) is None and code != 0
