"""Parity on HTCondor (docs/parity.md): the corpus's scheduler-neutral scripts and HTCondor's own cases,
submitted bare and with `#VMWRAP` in the executable to one real pool (HTCondor 23.9, two startds) in one
run. The job ad's exit (ExitCode, ExitBySignal, ExitSignal, JobStatus), the output and error bytes and
modes, and every file the job left in its initialdir must match."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from harness.condor_pool import ROOT, VmwrapSite
from harness.parity import CORPUS, Case, files

# The corpus (a bare and a VM twin of each case) runs in its fixture, which counts against the first
# test's timeout: 285-300 s on a fresh machine building appliances beside it (rehearsal of 2026-12-07).
pytestmark = [pytest.mark.vm, pytest.mark.timeout(900)]

if not (ROOT / ".vmwrap-condor-root").exists():
    pytest.skip(f"no HTCondor root at {ROOT} (scripts/build-condor-root.sh)", allow_module_level=True)

AD = ["JobStatus", "ExitCode", "ExitBySignal", "ExitSignal", "HoldReason"]

# The corpus's cases that use no Slurm option or variable (the script's own arguments are HTCondor's
# `arguments`), and HTCondor's own: its environment syntax, its job variables, condor_rm while running.
CONDOR_CASES = tuple(c for c in CORPUS if not c.args and not c.array and not c.depends and not c.cancel_after
                     and "SLURM" not in c.body and "SBATCH" not in c.body) + (
    Case("condor-environment", 'echo "[$FOO]" "[$BAR]"\n', args=("environment = \"FOO='x y=z' BAR=\"",)),
    Case("condor-job-variables", '[ -n "$_CONDOR_SCRATCH_DIR" ] && echo has-scratch-dir\n'
         '[ -n "$_CONDOR_JOB_AD" ] && echo has-job-ad\necho "cpus=$OMP_NUM_THREADS"\n'),
    Case("condor-rm-while-running", "echo started\nsleep 600\necho never\n", cancel_after="started"),
)


def _arguments(args: tuple[str, ...]) -> str:
    """HTCondor's new `arguments` syntax: each argument single-quoted (' doubled), " doubled."""
    return '"' + " ".join("'" + a.replace("'", "''").replace('"', '""') + "'" for a in args) + '"'


@pytest.fixture(scope="module")
def condor(appliance, virt_type, test_user, libvirtd):
    with VmwrapSite(Path(f"/var/tmp/vmwrap-parity-condor-{os.getpid()}"), appliance, virt_type) as site:
        yield site


def _submit(condor, case: Case, vm: bool) -> tuple[Path, int]:
    d = condor.jobdir() / (case.dir_name or case.name)
    d.mkdir()
    os.chown(d, 1234, 1234)
    script = d / f"{case.name}.sh"
    script.write_text(case.script(vm))
    os.chown(script, 1234, 1234)
    script.chmod(0o755)
    text = "\n".join([
        "universe = vanilla", f"executable = {script.name}", "should_transfer_files = NO",
        "output = out.txt", "error = err.txt", "log = job.log", "request_memory = 256",
        *([f"arguments = {_arguments(case.script_args)}"] if case.script_args else []),
        *case.args, "queue", ""])
    cluster, r = condor.submit(d, text)
    assert cluster > 0, (case.name, r.stdout + r.stderr)
    return d, cluster


def _observe(condor, case: Case, d: Path, cluster: int) -> dict:
    ad = condor.pool.wait_job(cluster, 0, (3, 4, 5), case.timeout, AD)
    obs = {k: ad.get(k) for k in AD}
    skip = {f"{case.name}.sh", "job.log", "out.txt", "err.txt"} | {p.name for p in d.glob("job-*.sub")}
    for name in ("out.txt", "err.txt"):
        f = d / name
        obs[name] = (f.read_bytes(), oct(f.stat().st_mode & 0o777)) if f.exists() else None
    obs["files"] = files(d, skip)
    obs["in a VM"] = "created" in [e for e, _ in condor.ledger(f"{cluster}.0")]  # the node's ledger
    return obs


@pytest.fixture(scope="module")
def runs(condor) -> dict[str, tuple[dict, dict]]:
    jobs = {(c.name, vm): (c, *_submit(condor, c, vm)) for c in CONDOR_CASES for vm in (False, True)}
    for (name, vm), (case, d, cluster) in jobs.items():
        if case.cancel_after:
            end = time.time() + 300
            while time.time() < end and case.cancel_after not in (
                    (d / "out.txt").read_text(errors="replace") if (d / "out.txt").exists() else ""):
                time.sleep(0.2)
            condor.pool.run("/usr/bin/condor_rm", str(cluster), user=condor.user)
    obs = {key: _observe(condor, case, d, cluster) for key, (case, d, cluster) in jobs.items()}
    return {c.name: (obs[c.name, False], obs[c.name, True]) for c in CONDOR_CASES}


def test_the_htcondor_corpus_is_big_enough():
    assert len(CONDOR_CASES) >= 28 and len({c.name for c in CONDOR_CASES}) == len(CONDOR_CASES)


def _documented(case: str, bare: dict, vm: dict) -> None:
    """What cannot be the same byte for byte: a core file's bytes are each side's shell's."""
    if case == "kill-segv-self":
        for side in (bare, vm):
            if "core" in side["files"]:
                kind, _digest, *rest = side["files"]["core"]
                side["files"]["core"] = (kind, "a core dump", *rest)


@pytest.mark.parametrize("case", CONDOR_CASES, ids=lambda c: c.name)
def test_a_vm_job_looks_like_its_bare_twin(runs, case):
    bare, vm = runs[case.name]
    assert bare["JobStatus"] in (3, 4) and bare["HoldReason"] is None, (case.name, bare)
    assert (bare.pop("in a VM"), vm.pop("in a VM")) == (False, True), case.name
    _documented(case.name, bare, vm)
    diffs = {k: (bare.get(k), vm.get(k)) for k in bare.keys() | vm.keys() if bare.get(k) != vm.get(k)}
    assert not diffs, f"{case.name}: bare vs VM differ: " + repr(diffs)[:3000]
