"""The saveable work dir (vmwrap's 9P over virtio-serial, 1 MiB messages) under a save in the middle
of large reads and writes: after the restore every file the job wrote is complete and byte-correct
on the host. The job copies a random file within its work dir, so requests both ways are in flight."""

import hashlib
import os
import re
import time

import pytest

pytestmark = pytest.mark.vm

SIZE = 24 << 20
FILES = 4
WAIT = 180  # seconds for each stage of the job
SCRIPT = f"""#!/bin/sh
#VMWRAP --image=busybox
dd if=/dev/urandom of=src bs=1M count={SIZE >> 20} iflag=fullblock 2>/dev/null
sha256sum src
echo go
for i in $(seq 1 {FILES}); do dd if=src of=big$i bs=1M 2>/dev/null || echo "dd $i failed"; done
echo done
"""


def test_a_save_in_the_middle_of_large_writes_loses_no_byte(site, workdir, test_user):
    from vmwrap import checkpoint, launcher, payload
    from vmwrap.job import Job

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    store = checkpoint.Store(site.base / "ckpt", checkpoint.keygen(site.base / "ckpt.key"))
    checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`

    def job(restarts):
        return Job("wsave1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid, str(workdir), SCRIPT,
                   restart_count=restarts)

    def wait(cond, run_dir, timeout=None):
        end = time.time() + (timeout or WAIT)
        while not cond():
            assert time.time() < end, [(f, (run_dir / f).read_bytes()[-1500:]) for f in
                                       ("stdout", "stderr", "console.log", "9p.log") if (run_dir / f).exists()]
            time.sleep(0.02)

    def sizes():
        return [(workdir / f"big{i}").stat().st_size if (workdir / f"big{i}").exists() else 0
                for i in range(1, FILES + 1)]

    lx = launcher.Launcher(job(0), settings)
    try:
        lx.prepare()
        lx.boot()
        att = payload.Attachment(lx.run_dir, "wsave1", conn=lx.conn)
        att.start(SCRIPT, {"PATH": "/bin:/usr/bin"}, [])
        wait(lambda: b"go\n" in (lx.run_dir / "stdout").read_bytes(), lx.run_dir)
        want = re.match(rb"([0-9a-f]{64})  src\n", (lx.run_dir / "stdout").read_bytes()).group(1).decode()
        wait(lambda: sizes()[0] >= 4 << 20, lx.run_dir)  # the writes are under way
        att.control.close()
        checkpoint.save("wsave1", lx.run_dir, store, lx.conn, 1)
        launcher.teardown("wsave1", settings)
        at_save = sizes()
        assert 0 < sum(at_save) < FILES * SIZE, at_save  # saved in the middle of the writes
        lx = launcher.Launcher(job(1), settings)
        lx.prepare()
        lx.restore(store)
        wait(lambda: b"done\n" in (lx.run_dir / "stdout").read_bytes(), lx.run_dir)
        assert b"failed" not in (lx.run_dir / "stdout").read_bytes()
        for i in range(FILES + 1):
            data = (workdir / (f"big{i}" if i else "src")).read_bytes()
            assert len(data) == SIZE and hashlib.sha256(data).hexdigest() == want, (i, len(data), at_save)
    finally:
        launcher.teardown("wsave1", settings)
        store.delete("wsave1")
