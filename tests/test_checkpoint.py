"""The checkpoint store without a VM: atomic commit, authentication (site key MAC), store ownership,
verification, the restore's own domain XML, markers, garbage collection."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from types import SimpleNamespace

import pytest

from vmwrap import checkpoint, launcher
from vmwrap.errors import CheckpointError, NodeError, UserError
from vmwrap.job import Job

UID, GID = 1234, 1234
UUID = "0b3e1f5c-6d1e-4c3a-9a55-3e0f6c2f4a10"


def shape(**kw) -> dict:
    return {"virt_type": "qemu", "memory_mib": 128, "cpus": 1, "cmdline": "vmwrap.x=1", "work_dir": "/srv/w",
            "disk": False, "ninep": True, "uuid": UUID, **kw}


def job_meta(job: str, **kw) -> dict:
    return {"job_id": job, "scheduler": "slurm", "uid": UID, "gid": GID, "image": "busybox", "run_dir": "/x",
            "restarts": 1, "disk_format": None, "delivered": {"stdout": 3}, "spec": shape(), **kw}


def new_store(tmp_path: Path, name: str = "ck") -> checkpoint.Store:
    key = tmp_path / f"{name}.key"
    if not key.exists():
        checkpoint.keygen(key)
    checkpoint.init_store(tmp_path / name, key)  # as `vmwrap checkpoints init` on the shared storage
    return checkpoint.Store(tmp_path / name, key)


def stage(store: checkpoint.Store, job: str, memory: bytes = b"RAM" * 1000, meta: dict | None = None):
    tmp = store.staging(job)
    for f in checkpoint.FILES:
        (tmp / f).write_bytes(b"")
    (tmp / "memory.save").write_bytes(memory)
    (tmp / "share.json").write_text(json.dumps({"version": 1, "msize": 8192, "fids": {}, "pending": []}))
    (tmp / "stdout").write_bytes(b"n=1\nn=2\n")
    (tmp / "job.json").write_text(json.dumps(meta if meta is not None else job_meta(job)))
    return tmp


def test_commit_then_verify_and_list(tmp_path):
    store = new_store(tmp_path)
    tmp = stage(store, "42")
    assert store.list() == [] and not store.exists("42")  # a staged checkpoint is never visible
    store.commit(tmp, "42")
    assert store.exists("42") and not tmp.exists()
    assert store.verify("42")["files"]["memory.save"]["bytes"] == 3000
    [info] = store.list()
    assert (info.job_id, info.restarts, info.image) == ("42", 1, "busybox")
    d = store.dir("42")  # root's alone: 0700 dir, 0600 files
    assert oct(d.stat().st_mode & 0o777) == "0o700"
    assert {oct((d / f).stat().st_mode & 0o777) for f in os.listdir(d)} == {"0o600"}


def test_a_newer_checkpoint_replaces_the_older(tmp_path):
    store = new_store(tmp_path)
    store.commit(stage(store, "7", b"old"), "7")
    store.commit(stage(store, "7", b"new"), "7")
    assert (store.dir("7") / "memory.save").read_bytes() == b"new"
    assert sorted(p.name for p in store.root.iterdir()) == [checkpoint.STAMP, "7"]  # no leftovers of the swap


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "symlink"])
def test_damage_is_detected(tmp_path, damage):
    store = new_store(tmp_path)
    store.commit(stage(store, "9"), "9")
    f = store.dir("9") / "memory.save"
    if damage == "flip":
        data = bytearray(f.read_bytes())
        data[1500] ^= 1
        f.write_bytes(bytes(data))
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-1])
    elif damage == "symlink":  # same bytes, but root never follows a link in the store
        (tmp_path / "elsewhere").write_bytes(f.read_bytes())
        f.unlink()
        f.symlink_to(tmp_path / "elsewhere")
    else:
        f.unlink()
    with pytest.raises(CheckpointError, match="memory.save is (corrupt|missing|unreadable)"):
        store.verify("9")


def test_missing_checkpoint_says_why(tmp_path):
    store = new_store(tmp_path)
    with pytest.raises(CheckpointError, match="not saved when the job was requeued"):
        store.verify("5")
    store.mark_lost("5", "saving its VM on c2 failed: No space left on device")
    with pytest.raises(CheckpointError, match="No space left on device"):
        store.verify("5")


def _rewrite_manifest(store, job, edit):
    p = store.dir(job) / "manifest.json"
    m = json.loads(p.read_text())
    edit(m)
    p.write_text(json.dumps(m))


def test_a_manifest_without_a_valid_mac_is_refused(tmp_path):
    store = new_store(tmp_path)
    store.commit(stage(store, "11"), "11")
    store.verify("11")
    _rewrite_manifest(store, "11", lambda m: m.pop("mac"))
    with pytest.raises(CheckpointError, match="not authenticated"):
        store.verify("11")
    # signed with another site's key
    other = new_store(tmp_path, "other")
    other.commit(stage(other, "11"), "11")
    shutil.rmtree(store.dir("11"))
    shutil.copytree(other.dir("11"), store.dir("11"))
    other.verify("11")
    with pytest.raises(CheckpointError, match="not authenticated"):
        store.verify("11")


def test_a_tampered_file_with_a_matching_checksum_is_refused(tmp_path):
    """Changing job.json (uid 0) and its checksum in the manifest: only the site key could re-sign it."""
    store = new_store(tmp_path)
    store.commit(stage(store, "12"), "12")
    evil = json.dumps(job_meta("12", uid=0, gid=0)).encode()
    (store.dir("12") / "job.json").write_bytes(evil)
    import hashlib

    _rewrite_manifest(store, "12", lambda m: m["files"]["job.json"].update(
        bytes=len(evil), sha256=hashlib.sha256(evil).hexdigest()))
    with pytest.raises(CheckpointError, match="not authenticated"):
        store.verify("12")


def test_a_checkpoint_moved_to_another_jobs_name_is_refused(tmp_path):
    store = new_store(tmp_path)
    store.commit(stage(store, "13"), "13")
    os.rename(store.dir("13"), store.dir("14"))
    with pytest.raises(CheckpointError, match="not made for job 14"):
        store.verify("14")


@pytest.mark.parametrize("bad", ["group-writable", "world-writable", "user-owned"])
def test_a_store_others_can_write_is_refused(tmp_path, bad):
    store = new_store(tmp_path)
    store.commit(stage(store, "15"), "15")
    if bad == "user-owned":
        os.chown(store.root, UID, GID)
    else:
        store.root.chmod(0o770 if bad == "group-writable" else 0o1777)
    with pytest.raises(NodeError, match=f"checkpoint store {store.root} must be owned by root and writable only by root"):
        store.verify("15")
    with pytest.raises(NodeError, match="must be owned by root"):
        store.staging("16")


def test_the_site_key_must_be_roots_alone(tmp_path):
    key = tmp_path / "k"
    store = checkpoint.Store(tmp_path / "ck", key)
    with pytest.raises(NodeError, match=f"checkpoint key {key} does not exist"):
        store.key()
    checkpoint.keygen(key)
    with pytest.raises(NodeError, match="already exists"):
        checkpoint.keygen(key)
    assert len(store.key()) == 64
    key.chmod(0o640)
    with pytest.raises(NodeError, match=f"checkpoint key {key} must be owned by root with mode 0600 or 0400"):
        store.key()
    key.chmod(0o400)
    store.key()
    os.chown(key, UID, GID)
    with pytest.raises(NodeError, match="uid 1234"):
        store.key()
    os.chown(key, 0, 0)
    link = tmp_path / "link"
    link.symlink_to(key)
    with pytest.raises(NodeError, match="symlink"):
        checkpoint.load_key(link)
    key.chmod(0o600)
    key.write_text("short\n")
    with pytest.raises(NodeError, match="32 to 4096 bytes"):
        store.key()


# --- restore: identity checks and vmwrap's own domain XML ---------------------------------------------

EVIL_XML = """<domain type='kvm' xmlns:qemu='http://libvirt.org/schemas/domain/qemu/1.0'>
  <name>vmwrap-21</name><uuid>%s</uuid><memory unit='KiB'>131072</memory><vcpu>1</vcpu>
  <os><type>hvm</type><kernel>/x/k</kernel><initrd>/x/i</initrd></os>
  <devices><emulator>/tmp/evil-qemu</emulator>
    <disk type='file' device='disk'><source file='/etc/shadow'/><target dev='vdb' bus='virtio'/></disk>
    <filesystem type='mount' accessmode='passthrough'><source dir='/'/><target dir='root'/></filesystem>
  </devices>
  <qemu:commandline><qemu:arg value='-runas'/><qemu:arg value='root'/></qemu:commandline>
</domain>""" % UUID


class FakeDom:
    def __init__(self, conn, name):
        self._conn, self._name = conn, name

    def connect(self):
        return self._conn

    def name(self):
        return self._name

    def setMemoryParameters(self, params, flags):
        pass

    def resume(self):
        pass


class FakeConn:
    def __init__(self):
        self.restored: list[tuple[str, str, int]] = []

    def lookupByName(self, name):
        return FakeDom(self, name)

    def saveImageGetXMLDesc(self, path, flags):  # what a tampered memory.save would carry
        return EVIL_XML

    def restoreFlags(self, path, dxml, flags):
        self.restored.append((path, dxml, flags))
        self.image = Path(path).read_bytes()  # what libvirtd would read from that path now


@pytest.fixture
def restoring(tmp_path, monkeypatch):
    """A committed checkpoint of job 21 whose saved XML is hostile, and what restore() needs around it."""
    from vmwrap import share

    store = new_store(tmp_path)
    store.commit(stage(store, "21", memory=EVIL_XML.encode()), "21")
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o711)
    started = []

    def fake_start(rd, job, sf):
        started.append(json.loads(Path(sf).read_text()))
        (rd / share.SOCKET).touch()
    monkeypatch.setattr(share, "start", fake_start)
    monkeypatch.setattr(share, "stop", lambda rd: None)
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox", restart_count=1)
    paths = {"kernel": Path("/cache/blobs/k"), "initrd": Path("/cache/blobs/i")}
    return store, run_dir, job, paths, started


def test_restore_uses_vmwraps_own_xml_not_the_saved_one(restoring):
    store, run_dir, job, paths, started = restoring
    conn = FakeConn()
    checkpoint.restore("21", run_dir, store, conn, job, paths, image="busybox")
    [(path, dxml, _)] = conn.restored
    assert path == str(run_dir / "memory.save")  # a verified copy in root's run dir, not the store's file
    assert not (run_dir / "memory.save").exists()  # removed once libvirt has restored from it
    for evil in ("commandline", "evil-qemu", "/etc/shadow", "emulator", "vdb", "dir='/'", "kvm"):
        assert evil not in dxml
    root = ET.fromstring(dxml)
    assert root.get("type") == "qemu" and root.findtext("uuid") == UUID and root.findtext("name") == "vmwrap-21"
    assert root.find("devices/disk") is None  # the checkpoint recorded no disk
    assert [f.find("source").get("dir") for f in root.iter("filesystem")] == [str(run_dir / "ctl")]
    assert root.findtext("os/kernel") == "/cache/blobs/k"
    assert root.find("seclabel/label").text == f"+{UID}:+{GID}"  # QEMU as the job's user
    assert dxml == checkpoint.restore_xml(job_meta("21"), job, run_dir, paths)[0]
    # the streams are back, private to the job's user; the server got the saved state
    st = (run_dir / "stdout").stat()
    assert (run_dir / "stdout").read_bytes() == b"n=1\nn=2\n" and (st.st_uid, st.st_mode & 0o777) == (UID, 0o600)
    assert all(((run_dir / s).stat().st_mode & 0o777) == 0o600 for s in checkpoint.STREAMS)
    assert started == [{"version": 1, "msize": 8192, "fids": {}, "pending": []}]
    assert json.loads((run_dir / "restored.json").read_text())["delivered"] == {"stdout": 3}
    assert json.loads((run_dir / "spec.json").read_text())["memory_mib"] == 128  # a second save finds it


def test_a_network_the_site_took_from_the_image_since_the_save_is_not_restored(restoring):
    store, run_dir, job, paths, started = restoring
    store.commit(stage(store, "21", meta=job_meta("21", spec=shape(network="nat"))), "21")
    conn = FakeConn()
    with pytest.raises(CheckpointError, match="has network 'nat', which image busybox no longer has .its catalog "
                                              "entry says network = 'none'"):
        checkpoint.restore("21", run_dir, store, conn, job, paths, image="busybox", network="none")
    assert conn.restored == [] and started == []
    checkpoint.restore("21", run_dir, store, conn, job, paths, image="busybox", network="nat")
    assert [i.get("type") for i in ET.fromstring(conn.restored[0][1]).iter("interface")] == ["user"]


@pytest.mark.parametrize("field", ["uid", "gid", "image", "job_id"])
def test_restore_refuses_another_jobs_checkpoint(restoring, field):
    store, run_dir, job, paths, started = restoring
    image = "busybox"
    if field in ("uid", "gid"):
        job = dataclasses.replace(job, **{field: 0})
    elif field == "image":
        image = "debian"
    else:  # a checkpoint vmwrap signed for job 20, found under job 21's name
        store.commit(stage(store, "21", meta=job_meta("20")), "21")
    conn = FakeConn()
    with pytest.raises(CheckpointError, match=f"made for another {field}"):
        checkpoint.restore("21", run_dir, store, conn, job, paths, image=image)
    assert conn.restored == [] and started == [] and not (run_dir / "stdout").exists()


def test_restore_refuses_a_disk_saved_over_a_base_the_catalog_has_since_replaced(restoring):
    store, run_dir, job, paths, started = restoring
    old, new = "a" * 64, "b" * 64
    store.commit(stage(store, "21", meta=job_meta("21", disk_sha256=old)), "21")
    conn = FakeConn()
    with pytest.raises(CheckpointError, match=r"base sha256 aaaaaaaaaaaa\.\.\., which the catalog has since replaced"):
        checkpoint.restore("21", run_dir, store, conn, job, {**paths, "disk": Path(f"/cache/blobs/{new}")},
                           image="busybox")
    assert conn.restored == [] and started == [] and not (run_dir / "stdout").exists()
    checkpoint.check_base(job_meta("21", disk_sha256=old), "21", {**paths, "disk": Path(f"/cache/blobs/{old}")})
    checkpoint.check_base(job_meta("21"), "21", {**paths, "disk": Path(f"/cache/blobs/{new}")})  # older checkpoint


@pytest.mark.parametrize("bad", [{"memory_mib": 1 << 40}, {"memory_mib": "128"}, {"cpus": 0}, {"cpus": 4096},
                                 {"virt_type": "xen"}, {"cmdline": "a\nb"}, {"disk": True}, {"ninep": 1},
                                 {"uuid": "x"}, {"work_dir": "/etc"}, {"network": "bridge"}, {"network": 1}])
def test_restore_xml_validates_the_recorded_shape(tmp_path, bad):
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox")
    paths = {"kernel": Path("/k"), "initrd": Path("/i")}
    checkpoint.restore_xml(job_meta("21"), job, tmp_path, paths)
    with pytest.raises(CheckpointError, match="unusable VM|work dir"):
        checkpoint.restore_xml(job_meta("21", spec=shape(**bad)), job, tmp_path, paths)


def test_a_vm_saved_without_a_step_port_is_restored_without_one(tmp_path):
    """libvirt refuses a restore whose channels differ from the saved VM's ("Target domain channel count 6
    does not match source 5"): a checkpoint of an older vmwrap (no `steps` in its shape) gets no step port."""
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox")
    paths = {"kernel": Path("/k"), "initrd": Path("/i")}

    def ports(meta):
        root = ET.fromstring(checkpoint.restore_xml(meta, job, tmp_path, paths)[0])
        return [c.find("target").get("name") for c in root.iter("channel")]
    assert "steps" not in job_meta("21")["spec"]
    assert "org.vmwrap.steps" not in ports(job_meta("21"))
    assert ports(job_meta("21", spec=shape(steps=True))).count("org.vmwrap.steps") == 1
    assert len(ports(job_meta("21", spec=shape(steps=True)))) == len(ports(job_meta("21"))) + 1
    with pytest.raises(CheckpointError, match="unusable VM steps"):
        checkpoint.restore_xml(job_meta("21", spec=shape(steps="yes")), job, tmp_path, paths)


def test_a_vm_saved_without_a_shell_port_is_restored_without_one(tmp_path):
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox")
    paths = {"kernel": Path("/k"), "initrd": Path("/i")}

    def ports(meta):
        root = ET.fromstring(checkpoint.restore_xml(meta, job, tmp_path, paths)[0])
        return [c.find("target").get("name") for c in root.iter("channel")]
    assert "shell" not in job_meta("21")["spec"] and "org.vmwrap.shell" not in ports(job_meta("21"))
    assert ports(job_meta("21", spec=shape(shell=True))).count("org.vmwrap.shell") == 1
    with pytest.raises(CheckpointError, match="unusable VM shell"):
        checkpoint.restore_xml(job_meta("21", spec=shape(shell=1)), job, tmp_path, paths)


def test_a_vm_saved_with_several_step_and_shell_ports_is_restored_with_as_many(tmp_path):
    """A checkpoint records how many step and shell ports its VM had (none recorded: one each, as older
    vmwraps' VMs had): libvirt refuses a restore whose channel count differs from the saved VM's."""
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox")
    paths = {"kernel": Path("/k"), "initrd": Path("/i")}

    def ports(meta):
        root = ET.fromstring(checkpoint.restore_xml(meta, job, tmp_path, paths)[0])
        return [c.find("target").get("name") for c in root.iter("channel")]
    got = ports(job_meta("21", spec=shape(steps=True, steps_ports=4, shell=True, shell_ports=3)))
    assert [p for p in got if p.startswith(("org.vmwrap.steps", "org.vmwrap.shell"))] == [
        "org.vmwrap.steps", "org.vmwrap.steps.1", "org.vmwrap.steps.2", "org.vmwrap.steps.3",
        "org.vmwrap.shell", "org.vmwrap.shell.1", "org.vmwrap.shell.2"]
    for bad in ({"steps_ports": 0}, {"steps_ports": 99}, {"shell_ports": "4"}, {"shell_ports": True}):
        with pytest.raises(CheckpointError, match=f"unusable VM {next(iter(bad))}"):
            checkpoint.restore_xml(job_meta("21", spec=shape(steps=True, shell=True, **bad)), job, tmp_path, paths)


def test_a_vm_saved_with_a_network_is_restored_with_it(tmp_path):
    job = Job("21", "slurm", "u", UID, GID, "/srv/w", "", image="busybox")
    paths = {"kernel": Path("/k"), "initrd": Path("/i")}

    def cards(meta):
        return [i.get("type") for i in ET.fromstring(checkpoint.restore_xml(meta, job, tmp_path, paths)[0]).iter("interface")]
    assert "network" not in job_meta("21")["spec"] and cards(job_meta("21")) == []  # an older vmwrap's: none
    assert cards(job_meta("21", spec=shape(network="nat"))) == ["user"]
    assert cards(job_meta("21", spec=shape(network="none"))) == []


def test_delivered_offsets_from_the_users_dir_are_read_safely(tmp_path):
    user = tmp_path / "ctl" / "user"
    user.mkdir(parents=True)
    f = user / "delivered.json"
    f.write_text(json.dumps({"stdout": 5, "stderr": "x", "other": 9}))
    assert checkpoint._delivered(tmp_path) == {"stdout": 5}
    f.unlink()
    os.mkfifo(f)  # would block a plain open() forever
    assert checkpoint._delivered(tmp_path) == {}
    f.unlink()
    (tmp_path / "secret").write_text(json.dumps({"stdout": 7}))
    f.symlink_to(tmp_path / "secret")
    assert checkpoint._delivered(tmp_path) == {}
    f.unlink()
    f.write_text(json.dumps({"stdout": 5, "pad": "x" * 5000}))
    assert checkpoint._delivered(tmp_path) == {}


def test_first_start_deletes_a_stale_checkpoint_of_the_same_job_id(tmp_path, monkeypatch):
    """Slurm reuses job ids after a controller reset: a new job must not continue an old VM."""
    from vmwrap_plugins.slurm import hooks
    from vmwrap.config import Settings

    store = new_store(tmp_path)
    store.commit(stage(store, "31"), "31")
    store.mark_lost("31", "old")
    booted = []

    class FakeLauncher:
        on_lost_checkpoint = None
        run_token = "run-1"
        request = SimpleNamespace(image=SimpleNamespace(checkpoint=True))

        def __init__(self, job, settings):
            self.job = job
            self.run_dir = tmp_path / "run"
            self.run_dir.mkdir(exist_ok=True)

        def prepare(self):
            pass

        def restore(self, store):
            raise AssertionError("restored a stale checkpoint")

        def boot(self):
            booted.append(self.job.job_id)
    job = Job("31", "slurm", "root", 0, 0, str(tmp_path), "", image="busybox", restart_count=0)
    monkeypatch.setattr(hooks, "job_from_env", lambda env: (job, {}))
    monkeypatch.setattr(launcher, "teardown", lambda *a, **k: None)
    monkeypatch.setattr(launcher, "Launcher", FakeLauncher)
    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(store.root),
                 checkpoint_key_file=store.key_file)
    assert hooks.prolog(s, {"SLURM_JOB_ID": "31", "SLURM_JOB_RESTART_COUNT": "0"}) == 0
    assert booted == ["31"] and not store.exists("31") and store.lost_reason("31") is None


def test_job_ids_cannot_escape_the_store(tmp_path):
    store = checkpoint.Store(tmp_path / "ck")
    for bad in ("../etc", "a/b", "", ".hidden", "x" * 65):
        with pytest.raises(UserError):
            store.dir(bad)


def test_gc_keeps_queued_jobs_only(tmp_path):
    store = new_store(tmp_path)
    store.commit(stage(store, "1"), "1")
    store.commit(stage(store, "2"), "2")
    store.mark_ran("3")
    store.mark_lost("3", "x")
    assert store.jobs() == {"1", "2", "3"}
    assert store.gc(lambda j: j == "2") == ["1", "3"]
    assert store.jobs() == {"2"}


def test_shared_records_never_follow_a_planted_link(tmp_path):
    """The planner's deadline and the save-rate log are written by root into the store."""
    store = new_store(tmp_path)
    victim = tmp_path / "victim"
    victim.write_text("keep\n")
    (store.root / "5.deadline").symlink_to(victim)
    (store.root / ".save-rates").symlink_to(victim)
    store.set_deadline("5", 1234.5)
    store.record_rate(10**9, 2.0)
    assert victim.read_text() == "keep\n"
    assert store.deadline("5") == 1234.5 and not (store.root / "5.deadline").is_symlink()
    assert store.measured_save_rate() is None  # the link is not read either


def test_a_save_image_swapped_in_the_store_after_its_check_is_not_what_libvirt_reads(restoring, monkeypatch):
    """A node that can write the store replaces memory.save between vmwrap's hash and libvirt's open."""
    store, run_dir, job, paths, started = restoring
    good = (store.dir("21") / "memory.save").read_bytes()
    mem = store.dir("21") / "memory.save"

    def swap():
        mem.chmod(0o600)
        mem.write_bytes(b"swapped by a hostile node")

    def after(fn, is_mem):
        def wrapped(*a, **kw):
            r = fn(*a, **kw)
            if is_mem(*a):
                swap()
            return r
        return wrapped
    # Whichever way restore checks the save image, the swap comes right after that check.
    monkeypatch.setattr(checkpoint, "_copy_verified", after(checkpoint._copy_verified, lambda d, n, *r: n == "memory.save"))
    monkeypatch.setattr(checkpoint, "_check", after(checkpoint._check, lambda p, *r: Path(p).name == "memory.save"))
    conn = FakeConn()
    checkpoint.restore("21", run_dir, store, conn, job, paths, image="busybox")
    assert conn.image == good


def test_delete_removes_a_plain_file_or_link_at_the_jobs_dir_without_following_it(tmp_path):
    """A non-directory where a job's checkpoint dir should be is removed (rmtree used to skip it
    silently); a link there goes, not what it points at."""
    store = checkpoint.Store(tmp_path / "ck")
    store.root.mkdir()
    (store.root / "42").write_text("not a dir")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    (store.root / "43").symlink_to(outside)
    (store.root / "44").mkdir()
    (store.root / "44" / "link").symlink_to(outside)
    (store.root / ".42.tmp").write_text("half")
    assert store.delete("42") and store.delete("43") and store.delete("44")
    assert not store.delete("45")
    assert sorted(p.name for p in store.root.iterdir()) == []
    assert (outside / "keep").read_text() == "x"


# Issue 21: a save seals what it wrote without reading the checkpoint back.

def _libvirt_like_writer(path: Path, body: bytes, follower, *, prealloc: bool = False, rewrite_at: int | None = None):
    """Write a save image the way libvirt 9.0 does: header with the "partial" magic, the stream appended
    in order (its last block padded as O_DIRECT pads it, then truncated back), the header rewritten with
    the final magic at the end. `prealloc` sizes the file first (a writer vmwrap does not expect);
    `rewrite_at` changes a byte already followed (ditto)."""
    header = checkpoint.SAVE_PARTIAL + bytes(range(80))
    data = header + body
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if prealloc:
            os.ftruncate(fd, len(data))
        piece = 256 << 10
        for off in range(0, len(data) - len(data) % 4096, piece):
            os.pwrite(fd, data[off:min(off + piece, len(data) - len(data) % 4096)], off)
            if off >= 1 << 20 and follower.n == 0:  # let the follower catch up once: it really follows
                deadline = time.monotonic() + 10
                while follower.n == 0 and time.monotonic() < deadline:
                    time.sleep(0.005)
                assert follower.n > 0, "the follower did not read while the file was being written"
        tail = len(data) - len(data) % 4096
        os.pwrite(fd, data[tail:] + b"\0" * (-len(data) % 4096), tail)  # the padded last block
        time.sleep(0.1)  # its padding is in the file a while: the follower must not take it for data
        os.ftruncate(fd, len(data))
        if rewrite_at is not None:
            deadline = time.monotonic() + 60  # the follower runs at nice 19: a loaded host delays it
            while follower.n <= rewrite_at and time.monotonic() < deadline:
                time.sleep(0.005)
            assert follower.n > rewrite_at, "the follower did not get past the byte to rewrite"
            os.pwrite(fd, bytes([data[rewrite_at] ^ 0xff]), rewrite_at)  # flipped: never the same byte
    finally:
        os.close(fd)
    fd = os.open(path, os.O_WRONLY)  # libvirt reopens the file to mark the image complete
    os.write(fd, checkpoint.SAVE_MAGIC + header[len(checkpoint.SAVE_PARTIAL):])
    os.close(fd)


@pytest.fixture
def small_lag(monkeypatch):
    monkeypatch.setattr(checkpoint, "FOLLOW_LAG", 64 << 10)


def test_the_save_image_is_hashed_while_libvirt_writes_it(tmp_path, small_lag):
    path = tmp_path / "memory.save"
    body = os.urandom((6 << 20) + 1234)
    follower = checkpoint._Follower(path)  # started before libvirt creates the file
    _libvirt_like_writer(path, body, follower)
    data = path.read_bytes()
    assert data.startswith(checkpoint.SAVE_MAGIC)
    assert follower.finish() == (len(data), hashlib.sha256(data).hexdigest())


@pytest.mark.parametrize("odd", ["rewrite", "prealloc", "replaced"])
def test_a_save_image_not_written_as_followed_is_hashed_again(tmp_path, small_lag, monkeypatch, odd):
    """Whatever the follower cannot vouch for, it says so (None): the caller then hashes the file itself."""
    monkeypatch.setattr(checkpoint, "FOLLOW_SAMPLES", 1000)  # every piece kept: the check is certain here
    path = tmp_path / "memory.save"
    body = os.urandom(4 << 20)
    follower = checkpoint._Follower(path)
    _libvirt_like_writer(path, body, follower, prealloc=odd == "prealloc",
                         rewrite_at=(2 << 20) + 5 if odd == "rewrite" else None)
    if odd == "replaced":
        data = path.read_bytes()
        path.unlink()
        path.write_bytes(data)
    assert follower.finish() is None


def test_commit_seals_what_was_written_without_reading_it_back(tmp_path, monkeypatch):
    store = new_store(tmp_path)
    tmp = stage(store, "50")
    src = tmp_path / "overlay.src"
    src.write_bytes(b"QFI\xfb" + os.urandom(3 << 20))
    (tmp / "overlay.qcow2").unlink()
    known = {"overlay.qcow2": checkpoint._copy_out(src, tmp / "overlay.qcow2")}
    assert known["overlay.qcow2"] == (src.stat().st_size, hashlib.sha256(src.read_bytes()).hexdigest())
    for f in checkpoint.FILES:
        if f != "overlay.qcow2":
            data = (tmp / f).read_bytes()
            (tmp / f).unlink()
            known[f] = checkpoint._write_sealed(tmp / f, data)
    real = checkpoint._hash_file

    def no_second_pass(p, *a):
        raise AssertionError(f"commit read {Path(p).name} back to hash it")
    monkeypatch.setattr(checkpoint, "_hash_file", no_second_pass)
    store.commit(tmp, "50", known)
    assert store.last_commit["reread_bytes"] == 0
    monkeypatch.setattr(checkpoint, "_hash_file", real)
    assert store.verify("50")["files"]["overlay.qcow2"]["bytes"] == src.stat().st_size


def test_a_staged_file_changed_after_it_was_written_is_not_sealed(tmp_path):
    """The seal covers the bytes the save wrote: a node that rewrites a staged file before the seal
    (the store is shared) no longer gets its bytes sealed, the restore finds them corrupt."""
    store = new_store(tmp_path)
    tmp = stage(store, "51")
    known = {f: (len(b := (tmp / f).read_bytes()), hashlib.sha256(b).hexdigest()) for f in checkpoint.FILES}
    (tmp / "stdout").write_bytes(b"n=1\nn=X\n")
    store.commit(tmp, "51", known)
    with pytest.raises(CheckpointError, match="stdout is corrupt"):
        store.verify("51")


def test_commit_still_hashes_what_the_caller_did_not(tmp_path):
    """periodic checkpoints and a follower that gave up: those files are hashed by the commit itself."""
    store = new_store(tmp_path)
    tmp = stage(store, "52")
    known = {f: (len(b := (tmp / f).read_bytes()), hashlib.sha256(b).hexdigest())
             for f in checkpoint.FILES if f != "memory.save"}
    store.commit(tmp, "52", known)
    assert store.last_commit["reread_bytes"] == 3000
    store.verify("52")


def test_a_failed_save_stops_the_follower_without_reading_the_rest(tmp_path, monkeypatch):
    """A save aborted at a reservation's deadline must free the node now, not hash GBs it drops."""
    monkeypatch.setattr(checkpoint, "FOLLOW_LAG", 1 << 40)  # nothing is read while the save runs
    path = tmp_path / "memory.save"
    follower = checkpoint._Follower(path)
    path.write_bytes(os.urandom(16 << 20))
    follower.abandon()
    assert follower.n == 0 and not follower.thread.is_alive()
