"""Parity on Grid Engine (issue 23): the scheduler-neutral scripts of the corpus and Grid Engine's own
cases, submitted bare and with `#VMWRAP` to one real cell in one run; qacct's exit_status and failed,
the output and error bytes and every file the job left must match (docs/parity.md)."""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path

import pytest

from harness.parity import CORPUS, Case, files
from harness.sge_cell import Cell
from vmwrap.catalog import register
from vmwrap.config import render

# The corpus (a bare and a VM twin of each case) runs in its fixture, which counts against the first
# test's timeout: 285-300 s on a fresh machine building appliances beside it (rehearsal of 2026-12-07).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]
USER = "vmwrapuser"

# The corpus's cases that use no Slurm option or variable, and Grid Engine's own.
GE_CASES = tuple(c for c in CORPUS if not c.args and not c.array and not c.depends and not c.cancel_after
                 and "SLURM" not in c.body and "SBATCH" not in c.body) + (
    Case("ge-variables", 'echo "$JOB_NAME" "$NSLOTS" "$QUEUE"\n[ -n "$JOB_ID" ] && echo has-job-id\n'
         '[ "$SGE_O_WORKDIR" = "$PWD" ] && echo in-submit-dir\n', args=("-N", "parityvars")),
    Case("ge-export", 'echo "[$FOO]" "[$BAR]"\n', args=("-v", "FOO=x y,BAR=")),
    Case("ge-directive-after-vmwrap", "{VMWRAP}\n#$ -N latename\necho \"$JOB_NAME\"\n"),
    Case("ge-merged-streams", "for i in 1 2 3 4 5 6; do echo out$i; echo err$i >&2; done\n", args=("-j", "y")),
    Case("ge-shell-option", "echo shell-ok; exit 4\n", args=("-S", "/bin/sh")),
    Case("ge-qdel-while-running", "echo started\nsleep 600\necho never\n", cancel_after="started"),
    Case("ge-array-tasks", 'echo "task $SGE_TASK_ID of $SGE_TASK_FIRST-$SGE_TASK_LAST step $SGE_TASK_STEPSIZE"\n',
         args=("-t", "1-3"), array=3),
    Case("ge-hold-jid", "echo after-dependency\n", depends=True),
)


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-parity-sge-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    cfg = base / "vmwrap.toml"
    cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(base / "state"), "cache_dir": str(base / "cache"),
                           "checkpoint_dir": str(base / "checkpoints")}))
    c = Cell(base, str(cfg), slots=4)
    c.start()
    yield c
    c.stop()
    shutil.rmtree(base, ignore_errors=True)


def _submit(cell, case: Case, vm: bool, user) -> tuple[Path, str]:
    d = cell.base / "work" / ("vm" if vm else "bare") / (case.dir_name or case.name)
    d.mkdir(parents=True)
    for p in (d, d.parent):
        os.chown(p, user.pw_uid, user.pw_gid)
    script = cell.base / "scripts" / ("vm" if vm else "bare") / "job.sh"  # one name: the default job name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.parent.chmod(0o755)
    script = script.with_name(f"{case.name}.sh")
    script.write_text(case.script(vm))
    script.chmod(0o755)
    hold = ()
    if case.depends:  # -hold_jid on a short bare job submitted first
        first = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", "-o", "/dev/null", "-j", "y", "-b", "y",
                         "/bin/sleep", "2", user=USER, cwd=str(d))
        assert first.returncode == 0, first.stdout + first.stderr
        hold = ("-hold_jid", first.stdout.strip().split(".")[0])
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", *hold, *case.args, str(script), *case.script_args,
                 user=USER, cwd=str(d))
    assert r.returncode == 0, (case.name, r.stdout + r.stderr)
    return d, r.stdout.strip().split(".")[0]


def _acct(cell, job: str, tasks: int = 0, timeout: float = 400) -> list[dict]:
    """qacct's records of the job (one per array task, by task number)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = cell.run("qacct", "-j", job)
        if r.returncode == 0 and r.stdout.count("exit_status") >= max(1, tasks):
            recs = [dict(re.findall(r"^(\w+)\s+(.*?)\s*$", part, re.M)) for part in re.split(r"^=+$", r.stdout, flags=re.M)]
            return sorted((rec for rec in recs if "exit_status" in rec), key=lambda rec: rec.get("taskid", ""))
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish: {cell.run('qstat', '-j', job).stdout}")


def _observe(cell, case: Case, d: Path, job: str) -> dict:
    recs = _acct(cell, job, case.array)
    obs = {"exit_status": [rec.get("exit_status") for rec in recs], "failed": [rec.get("failed") for rec in recs],
           "tasks": [rec.get("taskid") for rec in recs]}
    skip = set()
    for kind in ("o", "e"):
        found = sorted(d.glob(f"*.{kind}{job}")) + sorted(d.glob(f"*.{kind}{job}.*"))
        obs[kind] = [(f.name.replace(job, "JOB"), f.read_bytes(), oct(f.stat().st_mode & 0o777)) for f in found]
        skip |= {f.name for f in found}
    obs["files"] = files(d, skip)
    return obs


@pytest.fixture(scope="module")
def runs(cell, test_user) -> dict[str, tuple[dict, dict]]:
    jobs = {(c.name, vm): (c, *_submit(cell, c, vm, test_user)) for c in GE_CASES for vm in (False, True)}
    for (name, vm), (case, d, job) in jobs.items():
        if case.cancel_after:
            end = time.time() + 300
            while time.time() < end:
                o = next(d.glob(f"*.o{job}"), None)
                if o and case.cancel_after in o.read_text(errors="replace"):
                    break
                time.sleep(0.2)
            cell.run("qdel", job, user=USER)
    obs = {key: _observe(cell, case, d, job) for key, (case, d, job) in jobs.items()}
    return {c.name: (obs[c.name, False], obs[c.name, True]) for c in GE_CASES}


def test_the_grid_engine_corpus_is_big_enough():
    assert len(GE_CASES) >= 32 and len({c.name for c in GE_CASES}) == len(GE_CASES)


def _documented(case: str, bare: dict, vm: dict) -> None:
    """What cannot be the same byte for byte: a core file's bytes are those of each side's shell (dash on
    the host, busybox in the guest), so it is compared by kind, mode and owner."""
    if case == "kill-segv-self":  # the queue's core limit applies in the guest too: a core file on both sides
        assert "core" in bare["files"] and "core" in vm["files"], (bare["files"], vm["files"])
        for side in (bare, vm):
            kind, _digest, *rest = side["files"]["core"]
            side["files"]["core"] = (kind, "a core dump", *rest)


@pytest.mark.parametrize("case", GE_CASES, ids=lambda c: c.name)
def test_a_vm_job_looks_like_its_bare_twin(runs, case):
    bare, vm = runs[case.name]
    _documented(case.name, bare, vm)
    diffs = {k: (bare.get(k), vm.get(k)) for k in bare.keys() | vm.keys() if bare.get(k) != vm.get(k)}
    assert not diffs, f"{case.name}: bare vs VM differ: " + repr(diffs)[:3000]
