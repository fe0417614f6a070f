"""Bad input through `vmwrap run`: a specific message, the right exit code, nothing left behind."""

import dataclasses
import os
import subprocess
import sys

import pytest

from vmwrap.catalog import register
from vmwrap.payload import EXIT_IMAGE, EXIT_NODE, EXIT_USER

HDR = "#!/bin/sh\n"


@pytest.mark.parametrize("directive, message", [
    ("--image=nope", "unknown image 'nope' (this site offers: busybox"),
    ("--image=../x", "invalid image name '../x'"),
    ("--image='busybox'", "invalid image name \"'busybox'\""),
    ('--image=a"b', "invalid image name 'a\"b'"),
    ("--image=<x>", "invalid image name '<x>'"),
    ("--image=a&b", "invalid image name 'a&b'"),
    ("--image=busy box", "unexpected 'box'"),
    ("--image=busybox --memory=0", "at least 1M"),
    ("--image=busybox --memory=64M", "at least 128M to boot"),
    ("--image=busybox --memory=-1", "must be positive"),
    ("--image=busybox --memory=much", "not a size"),
    ("--image=busybox --memory=60T", "this node has"),
    ("--image=busybox --cpus=0", "must be at least 1"),
    ("--image=busybox --cpus=x", "not a whole number"),
    ("--image=busybox --cpus=512", "this node has"),
    ("--image=busybox --image=busybox", "duplicate directive --image"),
    ("--image=busybox --gpu=1", "unknown directive --gpu"),
])
def test_bad_directive(site, workdir, directive, message):
    r = site.run(HDR + f"#VMWRAP {directive}\necho ran\n", workdir)
    assert r.returncode == EXIT_USER, r.stderr
    assert message in r.stderr.decode()
    assert b"ran" not in r.stdout
    assert site.leftovers() == []


def test_no_image_requested(site, workdir):
    r = site.run(HDR + "echo ran\n", workdir)
    assert r.returncode == EXIT_USER
    assert "no image requested: add '#VMWRAP --image=NAME'" in r.stderr.decode()


def test_more_than_the_allocation(site, workdir):
    r = site.run(HDR + "#VMWRAP --image=busybox --memory=512M\n", workdir, "--memory", "256")
    assert r.returncode == EXIT_USER
    assert "more than the job's allocation of 256M" in r.stderr.decode()


def test_image_the_user_may_not_use(site, workdir, appliance, test_user):
    register(str(site.catalog), dataclasses.replace(appliance, name="private", users=["root"]))
    r = site.run(HDR + "#VMWRAP --image=private\n", workdir, "--user", test_user.pw_name)
    assert r.returncode == EXIT_USER
    assert f"user '{test_user.pw_name}' may not use image 'private'" in r.stderr.decode()


def test_checksum_mismatch(site, workdir, appliance):
    bad = dataclasses.replace(appliance.disk, sha256="0" * 64)
    register(str(site.catalog), dataclasses.replace(appliance, name="broken", disk=bad))
    r = site.run(HDR + "#VMWRAP --image=broken\n", workdir)
    assert r.returncode == EXIT_IMAGE
    assert "checksum mismatch" in r.stderr.decode()
    assert site.leftovers() == []
    assert os.listdir(site.cache / "blobs") and not (site.cache / "blobs" / ("0" * 64)).exists()
    assert os.listdir(site.cache / "tmp") == []


def test_missing_work_dir(site, tmp_path):
    r = site.run(HDR + "#VMWRAP --image=busybox\n", tmp_path / "absent")
    assert r.returncode == EXIT_USER
    assert "does not exist on this node" in r.stderr.decode()


def test_work_dir_with_newline_is_refused(site, tmp_path):
    d = tmp_path / "a\nb"
    d.mkdir()
    r = site.run(HDR + "#VMWRAP --image=busybox\n", d)
    assert r.returncode == EXIT_USER
    assert "control character" in r.stderr.decode()


def test_job_id_with_path_tricks(site, workdir):
    r = site.run(HDR + "#VMWRAP --image=busybox\n", workdir, "--job-id", "../../etc")
    assert r.returncode == EXIT_USER
    assert "invalid job id" in r.stderr.decode()


def test_libvirtd_not_running(site, workdir):
    cfg = site.config.read_text() + 'libvirt_uri = "qemu+unix:///system?socket=/nonexistent/sock"\n'
    site.config.write_text(cfg)
    r = site.run(HDR + "#VMWRAP --image=busybox\n", workdir)
    assert r.returncode == EXIT_NODE
    assert "cannot connect to libvirt" in r.stderr.decode() and "is libvirtd running?" in r.stderr.decode()
    assert site.leftovers() == []


def test_a_state_dir_too_deep_for_the_vms_sockets_is_the_nodes_fault_named(site, workdir):
    """libvirtd would refuse the control socket's path ("UNIX socket path ... too long") and the job would
    read as one whose QEMU its user killed: say what to change before anything is made."""
    deep = site.base / ("d" * 60)
    site.config.write_text(site.config.read_text().replace(f'state_dir = "{site.state}"', f'state_dir = "{deep}"'))
    assert f'state_dir = "{deep}"' in site.config.read_text()
    r = site.run(HDR + "#VMWRAP --image=busybox\n", workdir, "--job-id", "deep-1")
    err = r.stderr.decode()
    assert r.returncode == EXIT_NODE, err
    assert f"the run dir {deep}/jobs/deep-1 is too deep for its VM's sockets" in err, err
    assert "set a shorter state_dir" in err and "killed" not in err
    assert not (deep / "jobs" / "deep-1").exists() and site.domains() == []


def test_unreadable_script(site, workdir):
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "run", str(workdir / "none.sh")],
                       capture_output=True, env=site.env())
    assert r.returncode == EXIT_USER and b"cannot read job script" in r.stderr


def test_a_kernel_panic_does_not_push_the_users_last_words_out_of_the_console_tail():
    from vmwrap.payload import summarise_console
    trace = "\n".join(f"[    2.4{i:05d}]  ? some_kernel_fn+0x{i:x}/0x100" for i in range(200))
    text = ("boot noise\n" * 50 + "my-init: cannot mount /data\n"
            "[    2.414033] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n" + trace)
    out = summarise_console(text)
    assert "my-init: cannot mount /data" in out
    assert "Kernel panic - not syncing" in out
    assert "some_kernel_fn" not in out and "backtrace omitted" in out
    assert len(out) < 2200
    # no panic: the plain tail
    assert summarise_console("a\n" * 5000 + "last words\n").endswith("last words\n")
