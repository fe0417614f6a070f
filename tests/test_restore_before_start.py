"""A VM saved while its guest still boots (a periodic checkpoint or a requeue in the job's first
seconds, on a loaded node) restores into a guest that waits for the host's GO and reads the job's
files from the new run dir: the restored job's step hands them over as at a first start, and the job
runs. Before, the restored step sent nothing and the job sat in its VM until its time limit (a CI run
of tests/test_slurm_periodic.py: 6.5 minutes of a restored job that never ran)."""

import os
import threading

import pytest

pytestmark = pytest.mark.vm

SCRIPT = "#!/bin/sh\n#VMWRAP --image=busybox\necho \"ran in $(pwd)\"; echo to-stderr >&2; exit 3\n"


def test_a_vm_saved_during_its_boot_runs_the_job_after_its_restore(site, workdir, test_user):
    from vmwrap import checkpoint, launcher, payload, rundir
    from vmwrap.job import Job

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    store = checkpoint.Store(site.base / "ckpt", checkpoint.keygen(site.base / "ckpt.key"))
    checkpoint.init_store(store.root, store.key_file)

    def job(restarts):
        return Job("early1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid, str(workdir), SCRIPT,
                   restart_count=restarts)

    lx = launcher.Launcher(job(0), settings)
    try:
        lx.prepare()
        lx.boot()
        checkpoint.save("early1", lx.run_dir, store, lx.conn, 1)   # at once: the guest is still booting
        status = (lx.run_dir / rundir.STATUS).read_bytes() if (lx.run_dir / rundir.STATUS).exists() else b""
        assert b"started" not in status, status
        launcher.teardown("early1", settings)
        lx = launcher.Launcher(job(1), settings)
        lx.prepare()
        lx.restore(store)
        out = os.open(workdir.parent / "out", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        err = os.open(workdir.parent / "err", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        att = payload.Attachment(lx.run_dir, "early1", out_fd=out, err_fd=err, conn=lx.conn)
        att.start(SCRIPT, {"PATH": "/bin:/usr/bin"}, [])
        rc: list[int] = []
        t = threading.Thread(target=lambda: rc.append(att.stream()), daemon=True)
        t.start()
        t.join(90)
        console = (lx.run_dir / rundir.CONSOLE).read_bytes()[-1500:] if (lx.run_dir / rundir.CONSOLE).exists() else b""
        assert rc == [3], (rc, (lx.run_dir / rundir.STATUS).read_bytes(), console)
        assert (workdir.parent / "out").read_text() == f"ran in {workdir}\n"
        assert (workdir.parent / "err").read_text() == "to-stderr\n"
    finally:
        launcher.teardown("early1", settings)
        store.delete("early1")
