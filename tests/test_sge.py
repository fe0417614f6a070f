"""Ordinary qsub jobs in per-job VMs on a real Grid Engine 8.1.9 cell (Debian packages)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from harness.sge_cell import Cell
from vmwrap.catalog import register
from vmwrap.config import render

pytestmark = pytest.mark.vm
HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


@pytest.fixture(scope="module")
def cell(appliance, virt_type, test_user):
    base = Path(f"/var/tmp/vmwrap-sge-{os.getpid()}")
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    base.chmod(0o755)
    register(str(base / "images.toml"), appliance)
    cfg = base / "vmwrap.toml"
    # Job ids restart at 1 in a fresh cell: a private state dir and a domain prefix keep them apart.
    cfg.write_text(render({"catalog": str(base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                           "state_dir": str(base / "state"), "cache_dir": str(base / "cache"),
                           "checkpoint_dir": str(base / "checkpoints")}))
    agent = subprocess.Popen(["vmwrap", "--config", str(cfg), "agent"], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    c = Cell(base, str(cfg))
    c.start()
    for _ in range(100):
        if (base / "state" / "agent.sock").exists():
            break
        time.sleep(0.1)
    yield c
    c.stop()
    agent.kill()
    shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def jobdir(cell, test_user):
    d = cell.base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def qsub(cell, jobdir, script, *args) -> str:
    path = jobdir / f"job-{os.urandom(3).hex()}.sh"
    path.write_text(script)
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", *args, str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout.strip().split(".")[0]


def finished(cell, job, timeout=120) -> dict:
    """qacct's record of the finished job (accounting is on in Debian's cell)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r = cell.run("qacct", "-j", job)
        if r.returncode == 0 and "exit_status" in r.stdout:
            return dict(re.findall(r"^(\w+)\s+(.*?)\s*$", r.stdout, re.M))
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not finish: {cell.run('qstat', '-j', job).stdout}")


def queue_in_error(cell) -> bool:
    for ln in cell.run("qstat", "-f", "-q", "vmwrap.q").stdout.splitlines():
        if ln.startswith("vmwrap.q@"):
            f = ln.split()
            return len(f) > 5 and "E" in f[5]
    return False


def output(jobdir, job) -> tuple[str, str]:
    o = next(jobdir.glob(f"*.o{job}"), None)
    e = next(jobdir.glob(f"*.e{job}"), None)
    return (o.read_text() if o else ""), (e.read_text() if e else "")


@pytest.mark.parametrize("code", [0, 3])
def test_qsub_job_runs_in_its_vm_with_bare_output_and_exit_code(cell, jobdir, code, test_user):
    job = qsub(cell, jobdir, HDR + f'uname -r; id -u; pwd; echo err >&2; echo "arg=$1"; exit {code}\n',
               "-b", "n")
    acct = finished(cell, job)
    assert acct["exit_status"] == str(code), acct
    out, err = output(jobdir, job)
    guest_kernel = Path("/var/cache/vmwrap/appliances/.kernel/version").read_text().strip()
    assert out.splitlines()[:3] == [guest_kernel, str(test_user.pw_uid), str(jobdir)], out
    assert err == "err\n"
    assert not (cell.base / "state" / "jobs" / job).exists()


def test_job_without_directive_runs_bare(cell, jobdir):
    job = qsub(cell, jobdir, "#!/bin/sh\nuname -r\n")
    assert finished(cell, job)["exit_status"] == "0"
    assert output(jobdir, job)[0].strip() == os.uname().release


def test_bad_directive_fails_the_job_with_its_reason_and_keeps_the_queue(cell, jobdir):
    """`qsub -clear` drops the JSV of sge_request: the prolog still refuses, the queue stays up."""
    path = jobdir / "bad.sh"
    path.write_text("#!/bin/sh\n#VMWRAP --image=nosuch\necho never\n")
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-clear", "-terse", "-cwd", "-q", "vmwrap.q", str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip()
    acct = finished(cell, job)
    assert acct["exit_status"] == "64", acct
    assert "unknown image" in output(jobdir, job)[1] or "nosuch" in output(jobdir, job)[1]
    assert not queue_in_error(cell)


def test_qdel_stops_the_vm_and_cleans_up(cell, jobdir):
    job = qsub(cell, jobdir, HDR + "echo started; sleep 300\n")
    o = lambda: next(iter(jobdir.glob(f"*.o{job}")), None)  # noqa: E731
    end = time.monotonic() + 60
    while not (o() and "started" in o().read_text()):
        assert time.monotonic() < end, "the job did not start"
        time.sleep(0.3)
    assert cell.run("qdel", job, user="vmwrapuser").returncode == 0
    finished(cell, job, timeout=60)
    assert subprocess.run(["pgrep", "-f", f"guest=vmwrap-{job},"], capture_output=True).returncode != 0
    assert not (cell.base / "state" / "jobs" / job).exists()


def test_qmod_suspend_pauses_the_whole_vm(cell, jobdir):
    job = qsub(cell, jobdir, HDR + "i=0; while [ $i -lt 12 ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
    o = lambda: next(iter(jobdir.glob(f"*.o{job}")), None)  # noqa: E731
    end = time.monotonic() + 60
    while not (o() and "n=3" in o().read_text()):
        assert time.monotonic() < end, "the job did not count"
        time.sleep(0.3)
    assert cell.run("qmod", "-sj", job, user="vmwrapuser").returncode == 0
    time.sleep(1.5)
    frozen = o().read_text()
    state = subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"vmwrap-{job}"],
                           capture_output=True, text=True).stdout.strip()
    assert state == "paused"
    time.sleep(3)
    assert o().read_text() == frozen  # nothing counted while suspended
    assert cell.run("qmod", "-usj", job, user="vmwrapuser").returncode == 0
    assert finished(cell, job)["exit_status"] == "0"
    nums = [int(n) for n in re.findall(r"^n=(\d+)$", o().read_text(), re.M)]
    assert nums == list(range(1, 13))


@pytest.mark.parametrize("directive,args,message", [
    ("#VMWRAP --image=nosuch\n", (), "vmwrap: unknown image 'nosuch'"),
    ("#VMWRAP --image=busybox --memory=lots\n", (), "--memory=lots: not a size"),
    ("#VMWRAP --image=../../etc/x\n", (), "invalid image name"),
    ("#VMWRAP --image=busybox --bogus=1\n", (), "unknown directive"),
    ("", ("-ac", "vmwrap_image=x'y"), "invalid image name"),
    ("#VMWRAP --image=busybox\n", ("-ac", "vmwrap_image=other"), "but -ac vmwrap_image=other"),
])
def test_bad_requests_are_rejected_at_qsub(cell, jobdir, directive, args, message):
    path = jobdir / "bad.sh"
    path.write_text("#!/bin/sh\n" + directive + "echo never\n")
    os.chown(path, 1234, 1234)
    r = cell.run("qsub", "-cwd", "-q", "vmwrap.q", *args, str(path), user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode != 0
    assert "Unable to run job: vmwrap:" in r.stdout + r.stderr and message in r.stdout + r.stderr, r.stdout + r.stderr


PE = ("pe_name {name}\nslots 4\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\n"
      "allocation_rule {rule}\ncontrol_slaves FALSE\njob_is_first_task TRUE\nurgency_slots min\n"
      "accounting_summary FALSE\nqsort_args NONE\n")


def test_a_vm_job_with_a_pe_is_accepted_only_when_its_slots_stay_on_one_host(cell, jobdir):
    """qsub -pe: the JSV asks qmaster for the PE's allocation_rule. $round_robin may spread the slots
    over hosts: refused with the rule named. $pe_slots keeps them on one host: accepted. A job without
    an image keeps its PE (not vmwrap's business)."""
    from harness.sge_cell import qconf

    for name, rule in (("vmwrap_rr", "$round_robin"), ("vmwrap_smp", "$pe_slots")):
        f = cell.base / f"{name}.pe"
        f.write_text(PE.format(name=name, rule=rule))
        qconf("-Ap", str(f))
    try:
        vm, plain = jobdir / "pe.sh", jobdir / "plain.sh"
        vm.write_text(HDR + "echo never\n")
        plain.write_text("#!/bin/sh\necho plain\n")
        for p in (vm, plain):
            os.chown(p, 1234, 1234)
        sub = lambda *a: cell.run("qsub", "-terse", "-h", "-cwd", "-q", "vmwrap.q", *a,  # noqa: E731
                                  user="vmwrapuser", cwd=str(jobdir))
        r = sub("-pe", "vmwrap_rr", "2", str(vm))
        out = r.stdout + r.stderr
        assert r.returncode != 0 and ("vmwrap: -pe vmwrap_rr 2 may get slots on several hosts (vmwrap_rr has "
                                      "allocation_rule $round_robin and control_slaves FALSE), and a VM job spans "
                                      "hosts only in a parallel environment with control_slaves TRUE") in out, out
        for args in (("-pe", "vmwrap_smp", "2", str(vm)), ("-pe", "vmwrap_rr", "2", str(plain))):
            r = sub(*args)
            assert r.returncode == 0, r.stdout + r.stderr
            cell.run("qdel", r.stdout.strip(), user="vmwrapuser")
    finally:
        for name in ("vmwrap_rr", "vmwrap_smp"):
            qconf("-dp", name, check=False)


def test_native_option_for_binary_jobs(cell, jobdir):
    """`qsub -b y -ac vmwrap_image=busybox cmd`: no script to carry a directive."""
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", "-b", "y", "-ac", "vmwrap_image=busybox",
                 "/bin/uname", "-r", user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip()
    assert finished(cell, job)["exit_status"] == "0"
    guest_kernel = Path("/var/cache/vmwrap/appliances/.kernel/version").read_text().strip()
    assert output(jobdir, job)[0].strip() == guest_kernel


def test_config_render_sge():
    r = subprocess.run(["vmwrap", "config", "render", "sge"], capture_output=True, text=True)
    assert r.returncode == 0
    for key in ("prolog ", "starter_method", "suspend_method", "terminate_method", "-jsv "):
        assert key in r.stdout


def test_subordinate_queue_suspension_pauses_the_vm(cell, jobdir):
    """A job in urgent.q (subordinate_list vmwrap.q=1) suspends vmwrap.q: the VM pauses, then goes on."""
    cell.add_queue("urgent.q", subordinate_list="vmwrap.q=1")
    try:
        job = qsub(cell, jobdir, HDR + "i=0; while [ $i -lt 14 ]; do i=$((i+1)); echo n=$i; sleep 1; done\n")
        o = lambda: next(iter(jobdir.glob(f"*.o{job}")), None)  # noqa: E731
        end = time.monotonic() + 60
        while not (o() and "n=3" in o().read_text()):
            assert time.monotonic() < end, "the job did not count"
            time.sleep(0.3)
        path = jobdir / "urgent.sh"
        path.write_text("#!/bin/sh\nsleep 6\n")
        os.chown(path, 1234, 1234)
        r = cell.run("qsub", "-terse", "-cwd", "-q", "urgent.q", str(path), user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode == 0, r.stderr
        state = lambda: subprocess.run(["virsh", "-c", "qemu:///system", "domstate", f"vmwrap-{job}"],  # noqa: E731
                                       capture_output=True, text=True).stdout.strip()
        end = time.monotonic() + 30
        while state() != "paused":
            assert time.monotonic() < end, "the VM was not paused by the subordinate suspension"
            time.sleep(0.3)
        frozen = o().read_text()
        time.sleep(2)
        assert o().read_text() == frozen
        assert finished(cell, job)["exit_status"] == "0"
        assert [int(n) for n in re.findall(r"^n=(\d+)$", o().read_text(), re.M)] == list(range(1, 15))
    finally:
        cell.run("qconf", "-dq", "urgent.q")


def test_qrsh_asking_for_an_image_is_refused_at_submit(cell, jobdir):
    """The session would start on the host beside the VM (docs/interactive.md): the JSV refuses it."""
    r = cell.run("qrsh", "-now", "no", "-ac", "vmwrap_image=busybox", "/bin/echo", "on-the-host", user="vmwrapuser",
                 cwd=str(jobdir))
    out = r.stdout + r.stderr
    assert r.returncode != 0 and "on-the-host" not in r.stdout, out
    assert "vmwrap: interactive jobs (qrsh) cannot run in a VM under Grid Engine yet: submit the work with qsub" in out


def test_server_jsv_rejects_at_submit_without_the_client_cost(cell, jobdir):
    """jsv_url (one JSV process in sge_qmaster, run as the admin user): `-ac` and readable scripts."""
    from harness.sge_cell import CELL, SGE_ROOT

    request = SGE_ROOT / CELL / "common" / "sge_request"
    saved = request.read_text()
    request.write_text("")
    cell.set_server_jsv(cell.base / "hooks" / "sge-jsv")
    try:
        path = jobdir / "job.sh"
        path.write_text("#!/bin/sh\necho hi\n")
        os.chown(path, 1234, 1234)
        r = cell.run("qsub", "-h", "-cwd", "-q", "vmwrap.q", "-ac", "vmwrap_image=nosuch", str(path),
                     user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode != 0 and "vmwrap: unknown image 'nosuch'" in r.stdout + r.stderr, r.stdout + r.stderr
        path.write_text("#!/bin/sh\n#VMWRAP --image=busybox --cpus=0\necho hi\n")
        r = cell.run("qsub", "-h", "-cwd", "-q", "vmwrap.q", str(path), user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode != 0 and "--cpus=0" in r.stdout + r.stderr, r.stdout + r.stderr
        ok = jobdir / "ok.sh"
        ok.write_text("#!/bin/sh\necho hi\n")
        os.chown(ok, 1234, 1234)
        r = cell.run("qsub", "-h", "-terse", "-cwd", "-q", "vmwrap.q", "-ac", "vmwrap_image=busybox", str(ok),
                     user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode == 0, r.stdout + r.stderr
        cell.run("qdel", r.stdout.strip())
    finally:
        cell.set_server_jsv(None)
        request.write_text(saved)


def test_node_fault_puts_the_queue_instance_in_error_with_a_reason(cell, jobdir):
    """libvirtd unreachable: the prolog fails, GE marks vmwrap.q@host in error; the job is not lost."""
    cfg = Path(cell.vmwrap_config)
    good = cfg.read_text()
    cfg.write_text(good + 'libvirt_uri = "qemu:///system?socket=/nonexistent/libvirt-sock"\n')
    try:
        job = qsub(cell, jobdir, HDR + "echo ran\n")
        end = time.monotonic() + 60
        while not queue_in_error(cell):
            assert time.monotonic() < end, cell.run("qstat", "-f").stdout
            time.sleep(0.5)
        explain = cell.run("qstat", "-f", "-explain", "E", "-q", "vmwrap.q").stdout
        assert f"marked QERROR as result of job {job}'s failure" in explain, explain
        # The admin's reason: vmwrap's message where GE keeps the prolog's stderr.
        seen = "".join(p.read_text(errors="replace") for p in jobdir.glob(f"*{job}*"))
        seen += "".join(p.read_text(errors="replace") for p in Path("/var/spool/gridengine/execd").rglob("messages"))
        assert "cannot connect to libvirt" in seen, seen[-3000:]
        assert cell.run("qstat", "-j", job).returncode == 0  # still queued, not lost
    finally:
        cfg.write_text(good)
        cell.run("qmod", "-cq", "vmwrap.q")
    # The first attempt's qacct record says the prolog failed; the job then runs once the queue is cleared.
    end = time.monotonic() + 120
    while "ran" not in output(jobdir, job)[0]:
        assert time.monotonic() < end, cell.run("qstat", "-j", job).stdout
        time.sleep(0.5)


# --- root hooks start from a clean environment (security issue 14) -----------------------------------

GUEST_KERNEL = Path("/var/cache/vmwrap/appliances/.kernel/version")


def _hostile_jobdir(jobdir: Path) -> tuple[Path, Path]:
    """What a user can plant for a root hook: a `qstat` for $PATH, sitecustomize/usercustomize for
    $PYTHONPATH, `vmwrap`/`vmwrap_plugins` packages in the work dir (the prolog's cwd). Each one leaves
    marks/<what>-<uid> when it runs."""
    marks = jobdir / "marks"
    marks.mkdir()
    marks.chmod(0o777)
    evil = jobdir / "evil"
    evil.mkdir()
    (evil / "qstat").write_text(f"#!/bin/sh\ntouch {marks}/qstat-$(id -u)\n")
    (evil / "qstat").chmod(0o755)
    plant = f"import os\nopen(os.path.join({str(marks)!r}, '%s-' + str(os.getuid())), 'w').close()\n"
    for mod in ("sitecustomize", "usercustomize"):
        (evil / f"{mod}.py").write_text(plant % mod)
    for pkg in ("vmwrap", "vmwrap_plugins"):
        (jobdir / pkg).mkdir()
        (jobdir / pkg / "__init__.py").write_text(plant % f"cwd-{pkg}")
    for p in [evil, *evil.iterdir(), jobdir / "vmwrap", jobdir / "vmwrap_plugins", *jobdir.glob("*/__init__.py")]:
        os.chown(p, 1234, 1234)
    return evil, marks


def test_root_hooks_ignore_the_jobs_path_pythonpath_and_cwd(cell, jobdir):
    """`qsub -v PATH=...,PYTHONPATH=...` from a work dir with planted modules: the root prolog and
    epilog (isolated Python, clean environment, qstat by absolute path) run none of it, and the job
    still runs in its VM with the image `-ac` named (the prolog's qstat found it)."""
    evil, marks = _hostile_jobdir(jobdir)
    try:
        job = qsub(cell, jobdir, "#!/bin/sh\nuname -r\n", "-ac", "vmwrap_image=busybox",
                   "-v", f"PATH={evil}:/usr/bin:/bin,PYTHONPATH={evil}")
        acct = finished(cell, job)
        assert acct["exit_status"] == "0", acct
        assert output(jobdir, job)[0].strip() == GUEST_KERNEL.read_text().strip()
        assert sorted(m.name for m in marks.iterdir() if m.name.endswith("-0")) == []
        assert not queue_in_error(cell)
    finally:
        cell.run("qmod", "-cq", "vmwrap.q")


def test_root_hooks_ignore_the_jobs_vmwrap_config(cell, jobdir, virt_type):
    """`qsub -v VMWRAP_CONFIG=<the user's TOML>` on a queue wired as a site would (the hooks by their
    own path, no --config: the site's default config): root never loads the user's file, whose
    state_dir would make root create and boot the job's VM files where the user chooses."""
    from harness.sge_cell import HOOKS
    from vmwrap import config
    from vmwrap.catalog import Catalog

    site = config.load(config.DEFAULT_PATH)
    if "busybox" not in Catalog.load(site.catalog).images:
        pytest.skip(f"the default site {config.DEFAULT_PATH} offers no busybox image (scripts/install-host.sh)")
    mine = jobdir / "mine.toml"
    mine.write_text(render({"catalog": str(cell.base / "images.toml"), "accel": virt_type, "grace_seconds": 5.0,
                            "state_dir": str(jobdir / "userstate"), "cache_dir": str(jobdir / "usercache")}))
    os.chown(mine, 1234, 1234)
    cell.add_queue("site.q", prolog=f"root@{HOOKS / 'sge-prolog'} $job_owner", epilog=f"root@{HOOKS / 'sge-epilog'}",
                   starter_method=str(HOOKS / "sge-starter"),
                   terminate_method=f"{HOOKS / 'sge-method'} terminate $job_id $job_pid")
    try:
        path = jobdir / "job.sh"
        path.write_text(HDR + "uname -r\n")
        os.chown(path, 1234, 1234)
        r = cell.run("qsub", "-terse", "-cwd", "-q", "site.q", "-v", f"VMWRAP_CONFIG={mine}", str(path),
                     user="vmwrapuser", cwd=str(jobdir))
        assert r.returncode == 0, r.stdout + r.stderr
        job = r.stdout.strip()
        acct = finished(cell, job)
        assert acct["exit_status"] == "0", (acct, output(jobdir, job))
        assert output(jobdir, job)[0].strip() == GUEST_KERNEL.read_text().strip()
        assert not (jobdir / "userstate").exists() and not (jobdir / "usercache").exists()
        assert not (site.jobs_dir / job).exists()  # the site's own state held it, and the epilog cleaned up
    finally:
        cell.run("qconf", "-dq", "site.q")


def test_root_prolog_reads_only_the_spooled_job_script(cell, jobdir):
    """A binary job's JOB_SCRIPT is the user's command: naming a file only root may read must not
    make the root prolog read it (its #VMWRAP line would pick the image and show up in the error)."""
    secret = cell.base / f"secret-{os.urandom(3).hex()}"
    secret.write_text("#!/bin/sh\n#VMWRAP --image=nosuch-secret\n")
    secret.chmod(0o600)
    r = cell.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", "-b", "y", "-ac", "vmwrap_image=busybox", str(secret),
                 user="vmwrapuser", cwd=str(jobdir))
    assert r.returncode == 0, r.stdout + r.stderr
    job = r.stdout.strip()
    acct = finished(cell, job)
    out, err = output(jobdir, job)
    assert "nosuch-secret" not in out + err, (acct, out, err)
    assert acct["exit_status"] != "65", (acct, out, err)  # 65: the image the secret named was refused
    assert not queue_in_error(cell)


@pytest.mark.parametrize("directive, request_, reason", [
    ("--memory=300M", "h_vmem=100M", "--memory=300M is more than the job's allocation of 100M"),
    ("", "h_vmem=100M", "image busybox's default memory of 256M is more than the job's allocation of 100M"),
])
def test_vm_memory_above_the_jobs_request_fails_the_job_not_the_queue(cell, jobdir, directive, request_, reason):
    """GE enforces h_vmem on the job's processes only; QEMU runs outside them: the prolog compares."""
    job = qsub(cell, jobdir, f"#!/bin/sh\n#VMWRAP --image=busybox {directive}\necho never\n", "-l", request_)
    acct = finished(cell, job)
    assert acct["exit_status"] == "64", acct
    out, err = output(jobdir, job)
    assert reason in err and "never" not in out, (out, err)
    assert not queue_in_error(cell)
