"""Teardown and save against what the job's user (or its QEMU) can leave in the run dir."""

import os

import pytest

from vmwrap import checkpoint, launcher
from vmwrap.config import Settings
from vmwrap.errors import NodeError


def test_a_deep_tree_in_ctl_user_does_not_break_teardown(tmp_path, libvirtd):
    s = Settings(state_dir=str(tmp_path / "state"), cache_dir=str(tmp_path / "cache"))
    user = s.jobs_dir / "4242" / "ctl" / "user"
    user.mkdir(parents=True)
    fd = os.open(user, os.O_RDONLY)
    for _ in range(3000):  # what the job's user can make with mkdirat: Python's rmtree recursion dies on it
        os.mkdir("d", dir_fd=fd)
        nfd = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = nfd
    os.close(fd)
    launcher.teardown("4242", s)
    assert not (s.jobs_dir / "4242").exists()


def test_save_refuses_a_file_the_job_made_a_huge_hole(tmp_path, monkeypatch):
    written = [0]
    real_write = os.write

    def bounded(fd, data):  # without the fix this copies zeros until the disk is full: stop at 256 MiB
        written[0] += len(data)
        assert written[0] < 256 << 20, "save copies the hole byte by byte"
        return real_write(fd, data)
    monkeypatch.setattr(checkpoint.os, "write", bounded)
    src = tmp_path / "overlay.qcow2"
    src.write_bytes(b"QFI\xfb")
    os.truncate(src, 1 << 42)  # `truncate -s 4T` (ext4 caps a file at 16 TiB): terabytes of zeros to copy
    with pytest.raises(NodeError, match="sparse"):
        checkpoint._copy_out(src, tmp_path / "copy")


def test_save_copies_only_what_was_there_when_it_opened(tmp_path, monkeypatch):
    src = tmp_path / "stdout"
    src.write_bytes(b"x" * 1000)
    real_read = os.read

    calls = [0]

    def growing(fd, n):  # the guest keeps appending while root copies (without the fix: forever)
        calls[0] += 1
        assert calls[0] < 1000, "save keeps copying what the guest appends"
        with open(src, "ab") as f:
            f.write(b"y" * 1000)
        return real_read(fd, n)
    monkeypatch.setattr(checkpoint.os, "read", growing)
    checkpoint._copy_out(src, tmp_path / "copy")
    assert (tmp_path / "copy").read_bytes() == b"x" * 1000
