"""Checkpoints of Torque jobs deleted while held: no epilogue runs for them (the job is not on any
mom), so `vmwrap torque gc` asks pbs_server through qstat (harness/torque_contract.py plays it:
`qstat -f ID` prints `job_state = X`, or `qstat: Unknown Job Id Error ID` with exit status 153,
src/cmds/qstat.c and src/include/pbs_error_db.h) and deletes the checkpoint and its record once
the job is unknown or completed. Anything else, an unreachable server too, keeps it."""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from harness.torque_contract import Server, TorqueJob
from vmwrap.config import render

PY = "/opt/vmwrap/venv/bin/python"


@pytest.fixture
def cell(test_user):
    base = Path(f"/var/tmp/vmwrap-torquegc-{os.getpid()}-{os.urandom(2).hex()}")
    base.mkdir(parents=True)
    server = Server(base, base / "no-filter")
    cfg = base / "vmwrap.toml"
    cfg.write_text(render({"state_dir": str(base / "state"), "checkpoint_dir": str(base / "store")}))
    (base / "store").mkdir(mode=0o700)
    yield server, cfg, base / "store", test_user
    shutil.rmtree(base, ignore_errors=True)


def held(server: Server, store: Path, user, seq: int, record: bool = True) -> TorqueJob:
    """A job qhold saved: its checkpoint in the store, the checkpoint script's record beside it."""
    job = TorqueJob(seq, server.name, "ckpt", user, grp.getgrgid(user.pw_gid).gr_name, "", "/", "", state="H")
    server.jobs[job.id] = job
    (store / job.id).mkdir()
    (store / job.id / "manifest.json").write_text("{}")
    if record:
        (store / f".{job.id}.torque.json").write_text(json.dumps({"job": job.id, "uid": user.pw_uid}))
    return job


def gc(cfg: Path, qstat: Path) -> subprocess.CompletedProcess:
    return subprocess.run([PY, "-I", "-m", "vmwrap_plugins.torque", "--config", str(cfg), "torque", "gc", "--once",
                           "--qstat", str(qstat)], capture_output=True, text=True, timeout=120, env={}, cwd="/")


def test_a_held_job_keeps_its_checkpoint_until_it_is_deleted(cell):
    server, cfg, store, user = cell
    job = held(server, store, user, 301)
    qstat = server.qstat_command()
    r = gc(cfg, qstat)
    assert r.returncode == 0, r.stderr
    assert (store / job.id / "manifest.json").exists()
    server.qdel_queued(job)
    r = gc(cfg, qstat)
    assert r.returncode == 0 and f"job {job.id}: ended while saved, checkpoint deleted" in r.stdout, r.stdout + r.stderr
    assert not (store / job.id).exists() and not (store / f".{job.id}.torque.json").exists()


def test_a_completed_job_loses_its_checkpoint(cell):
    server, cfg, store, user = cell
    job = held(server, store, user, 302)
    job.state = "C"
    r = gc(cfg, server.qstat_command())
    assert r.returncode == 0 and not (store / job.id).exists(), r.stdout + r.stderr


def test_nothing_is_deleted_without_a_clear_answer(cell):
    """An unreachable server, a checkpoint without the checkpoint script's record, a record naming
    another job: kept."""
    server, cfg, store, user = cell
    a = held(server, store, user, 303)
    b = held(server, store, user, 304, record=False)
    c = held(server, store, user, 305)
    (store / f".{c.id}.torque.json").write_text(json.dumps({"job": "999.elsewhere"}))
    for j in (a, b, c):
        server.jobs.pop(j.id)
    server.reachable = False
    qstat = server.qstat_command()
    assert gc(cfg, qstat).returncode == 0 and (store / a.id).exists()
    server.reachable = True
    server.sync()
    assert gc(cfg, qstat).returncode == 0
    assert not (store / a.id).exists() and (store / b.id).exists() and (store / c.id).exists()


def test_qstat_must_be_an_absolute_path(cell):
    _, cfg, _, _ = cell
    r = gc(cfg, Path("qstat"))
    assert r.returncode != 0 and "is not an absolute path to Torque's qstat" in r.stderr
