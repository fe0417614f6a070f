"""What admins and scripts see (issue 25): --json shapes, tables within 100 columns, progress only on a
terminal's stderr. Light: no VM, no daemon (libvirt's in-process test driver or a stand-in connection)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from click.testing import CliRunner

from harness.terminal import run_on_pty
from vmwrap.cache import Cache
from vmwrap.cli import main
from vmwrap.config import render
from vmwrap.plan import Action


@pytest.fixture
def site(tmp_path):
    """A tmp site with one image 'a' (three 1 MiB + 4 KiB files) registered."""
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), "cache_dir": str(tmp_path / "cache"),
                           "state_dir": str(tmp_path / "state"), "checkpoint_dir": str(tmp_path / "ckpt"),
                           "cache_max_bytes": 64 << 20, "libvirt_uri": "test:///default"}))
    for name in ("k", "i", "d"):
        (tmp_path / name).write_bytes(os.urandom((1 << 20) + 4096))

    def run(*args, code=0):
        r = CliRunner().invoke(main, ["--config", str(cfg), *args])
        assert r.exit_code == code, (r.output, r.exception)
        return r
    run.cfg, run.tmp = cfg, tmp_path
    run("image", "add", "a", "--kernel", str(tmp_path / "k"), "--initrd", str(tmp_path / "i"),
        "--disk", str(tmp_path / "d"), "--user", "alice", "--description", "d" * 150)
    return run


def _fits(text: str) -> None:
    lines = text.splitlines()
    assert lines and all(len(line) <= 100 for line in lines), max(lines, key=len)


def test_image_list_json_and_table(site):
    [img] = json.loads(site("image", "list", "--json").stdout)
    assert img["name"] == "a" and img["users"] == ["alice"] and img["bytes"] == 3 * ((1 << 20) + 4096)
    assert set(img["artifacts"]) == {"kernel", "initrd", "disk"} and len(img["artifacts"]["disk"]["sha256"]) == 64
    table = site("image", "list").stdout
    _fits(table)
    assert table.splitlines()[1].startswith("a ") and "…" in table  # the 150-char description is cut


def test_cache_list_json_and_table(site):
    site("cache", "fetch", "a")
    c = Cache(site.tmp / "cache", 64 << 20)
    for n in range(30):
        c.pin(c.entries()[0].sha256, f"job-with-a-long-name-{n}")
    doc = json.loads(site("cache", "list", "--json").stdout)
    assert set(doc) == {"blobs", "used_bytes", "max_bytes", "cache_dir"} and len(doc["blobs"]) == 3
    assert {b["image"] for b in doc["blobs"]} == {"a.kernel", "a.initrd", "a.disk"}
    assert sum(len(b["pinned_by"]) for b in doc["blobs"]) == 30 and doc["used_bytes"] == sum(b["bytes"] for b in doc["blobs"])
    _fits(site("cache", "list").stdout)


def test_checkpoints_list_json_and_table(tmp_path):
    from test_checkpoint import new_store, stage

    store = new_store(tmp_path)
    store.commit(stage(store, "77"), "77")
    store.mark_lost("78", "saving its VM on c2 failed: No space left on device")
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"checkpoint_dir": str(store.root), "checkpoint_key_file": store.key_file,
                           "state_dir": str(tmp_path / "state")}))
    r = CliRunner().invoke(main, ["--config", str(cfg), "checkpoints", "list", "--json"])
    doc = json.loads(r.stdout)
    assert [c["job"] for c in doc["checkpoints"]] == ["77"] and doc["lost"][0]["job"] == "78"
    assert set(doc["checkpoints"][0]) == {"job", "bytes", "created", "node", "restarts", "image"}
    _fits(CliRunner().invoke(main, ["--config", str(cfg), "checkpoints", "list"]).stdout)


class _Dom:
    def __init__(self, name: str, state: int) -> None:
        self._name, self._state = name, state

    def name(self) -> str:
        return self._name

    def state(self) -> list[int]:
        return [self._state, 0]


def test_ps_json_and_table(site, monkeypatch):
    assert json.loads(site("ps", "--json").stdout) == []  # libvirt's test driver: no vmwrap- domain
    long = "j" * 64
    conn = SimpleNamespace(listAllDomains=lambda: [_Dom("vmwrap-7", 1), _Dom(f"vmwrap-{long}", 3), _Dom("other", 1),
                                                   # vmwrap's own VMs, not jobs: a template and the probes
                                                   _Dom("vmwrap-template-0123456789ab", 1), _Dom("vmwrap-probe-99", 1),
                                                   _Dom("vmwrap-kvmprobe-98", 1), _Dom("vmwrap-..", 1)])
    monkeypatch.setattr("vmwrap.domain.connect", lambda uri: conn)
    vms = json.loads(site("ps", "--json").stdout)
    assert [(v["job"], v["state"]) for v in vms] == [("7", "running"), (long, "paused")]
    assert set(vms[0]) == {"job", "state", "last_event", "since_s", "image", "digest", "origin"}
    _fits(site("ps").stdout)


def test_ps_failed_json(site, monkeypatch):
    died = [{"job_id": "9", "at": time.time(), "path": "/var/lib/vmwrap/evidence/" + "x" * 120, "reason": "r" * 80}]
    monkeypatch.setattr("vmwrap.evidence.listing", lambda state_dir: died)
    [e] = json.loads(site("ps", "--failed", "--json").stdout)
    assert e["job"] == "9" and e["evidence"] == died[0]["path"] and set(e) == {"job", "at", "evidence", "reason"}
    _fits(site("ps", "--failed").stdout)


def test_doctor_json_carries_each_check_and_the_exit_code(site):
    r = CliRunner().invoke(main, ["--config", str(site.cfg), "doctor", "--json"])
    doc = json.loads(r.stdout)
    assert doc["checks"] and all(set(c) == {"status", "name", "detail"} for c in doc["checks"])
    assert {c["status"] for c in doc["checks"]} <= {"ok", "WARN", "FAIL"}
    assert doc["ok"] == all(c["status"] != "FAIL" for c in doc["checks"]) and r.exit_code == (0 if doc["ok"] else 1)
    (site.tmp / "images.toml").unlink()
    r = CliRunner().invoke(main, ["--config", str(site.cfg), "doctor", "--json"])
    doc = json.loads(r.stdout)
    assert r.exit_code == 1 and doc["ok"] is False
    assert any(c["status"] == "FAIL" and c["name"] == "catalog" for c in doc["checks"])


def test_plan_dry_run_json(site, monkeypatch):
    acts = [Action("limit", "12", "fits the gap before r1", 1800.0), Action("note", "13", "too long for any gap")]
    monkeypatch.setattr("vmwrap.planner.Planner.pass_once", lambda self: acts)
    doc = json.loads(site("plan", "--dry-run", "--json").stdout)
    assert doc["actions"] == [{"job": "12", "action": "limit", "seconds": 1800.0, "reason": "fits the gap before r1"},
                              {"job": "13", "action": "note", "seconds": None, "reason": "too long for any gap"}]
    r = site("plan", "--json", code=2)
    assert "add --dry-run" in r.output
    doc = json.loads(site("sge", "plan", "--dry-run", "--json").stdout)   # Grid Engine's planner: the same shape
    assert doc["enabled"] is False and doc["actions"][0] == {"job": "12", "action": "limit", "seconds": 1800.0,
                                                             "reason": "fits the gap before r1"}


# --- progress: a pseudo-terminal on stderr gets it; a pipe, --quiet and stdout never do ---

_run_on_pty = run_on_pty


def _vmwrap(site, *args: str) -> list[str]:
    return [sys.executable, "-m", "vmwrap.cli", "--config", str(site.cfg), *args]


def test_cache_fetch_progress_on_a_terminal_only(site):
    code, out, err = _run_on_pty(_vmwrap(site, "cache", "fetch", "a"))
    assert code == 0 and "a.disk: fetched 1052672 bytes" in out
    assert "\x1b" not in out  # stdout (a pipe) stays plain
    text = err.decode(errors="replace")
    assert "a.disk" in text and "1.1 MB" in text and "/s" in text  # bytes done and the rate, on stderr
    for e in Cache(site.tmp / "cache", 64 << 20).entries():
        Cache(site.tmp / "cache", 64 << 20).evict(e.sha256)
    code, out, err = _run_on_pty(_vmwrap(site, "cache", "fetch", "a", "--quiet"))
    assert code == 0 and "fetched" in out and err == b""
    for e in Cache(site.tmp / "cache", 64 << 20).entries():
        Cache(site.tmp / "cache", 64 << 20).evict(e.sha256)
    r = subprocess.run(_vmwrap(site, "cache", "fetch", "a"), capture_output=True, text=True)  # a pipe
    assert r.returncode == 0 and r.stderr == "" and r.stdout.count("fetched") == 3


BUILD = """
import sys
from vmwrap import appliance
from vmwrap.catalog import Catalog

def fake_build(name, kind, out_dir, catalog_path, memory_mib=256, users=None, groups=None, on_stage=None, **_):
    for s in ("kernel step", "initrd step", "disk step"):
        on_stage and on_stage(s)
    return Catalog.load(catalog_path).images["a"]

appliance.build = fake_build
from vmwrap.cli import main
main(sys.argv[1:])
"""


def test_image_build_stage_lines_on_a_terminal_only(site):
    argv = [sys.executable, "-c", BUILD, "--config", str(site.cfg), "image", "build", "--name", "b"]
    code, out, err = _run_on_pty(argv)
    text = err.decode(errors="replace")
    assert code == 0 and out.startswith("built a") and "\x1b" not in out
    assert all(s in text for s in ("kernel step", "initrd step", "disk step"))
    assert _run_on_pty(argv + ["-q"])[2] == b""
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""


def test_image_verify_progress_on_a_terminal_only(site):
    code, out, err = _run_on_pty(_vmwrap(site, "image", "verify", "a"))
    assert code == 0 and out.count("ok  ") == 3 and "verify a.disk" in err.decode(errors="replace")
    assert _run_on_pty(_vmwrap(site, "image", "verify", "a", "--quiet"))[2] == b""


def test_fetch_reports_bytes_to_its_callback_and_prints_nothing_itself(site, capfd):
    """The job's path (launcher, prestage) passes no callback; vmwrap's own output never reaches the job's."""
    from vmwrap.catalog import Catalog

    disk = Catalog.load(str(site.tmp / "images.toml")).images["a"].disk
    c = Cache(site.tmp / "cache", 64 << 20)
    seen: list[int] = []
    capfd.readouterr()
    assert not c.fetch(disk, on_bytes=seen.append).hit and sum(seen) == disk.size and len(seen) == 2
    c.evict(disk.sha256)
    assert not c.fetch(disk).hit and capfd.readouterr() == ("", "")


def test_image_add_hashing_progress_on_a_terminal_only(site):
    t = site.tmp
    add = ["image", "add", "b", "--kernel", str(t / "k"), "--initrd", str(t / "i"), "--disk", str(t / "d")]
    code, out, err = _run_on_pty(_vmwrap(site, *add))
    text = err.decode(errors="replace")
    assert code == 0 and out.startswith("added b") and all(f"hash b.{k}" in text for k in ("kernel", "initrd", "disk"))
    assert "1.1 MB" in text
    code, out, err = _run_on_pty(_vmwrap(site, *add, "--quiet"))
    assert code == 0 and err == b""


def test_checkpoints_verify_progress_on_a_terminal_only(tmp_path):
    from test_checkpoint import new_store, stage

    store = new_store(tmp_path)
    store.commit(stage(store, "77"), "77")
    cfg = tmp_path / "vmwrap.toml"
    cfg.write_text(render({"checkpoint_dir": str(store.root), "checkpoint_key_file": store.key_file,
                           "state_dir": str(tmp_path / "state")}))
    argv = [sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), "checkpoints", "verify", "77"]
    code, out, err = _run_on_pty(argv)
    assert code == 0 and "intact" in out and "verify checkpoint 77" in err.decode(errors="replace")
    assert _run_on_pty(argv + ["--quiet"])[2] == b""
    r = subprocess.run(argv, capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == ""
