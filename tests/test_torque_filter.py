"""Torque's submit side and the prologue's reading of what users write, without VMs: qsub runs the
real filter (vmwrap/hooks/torque-submitfilter) as the submitter through harness/torque_contract.py,
and the user sees exactly what qsub would print (src/cmds/qsub_functions.c, get_script)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from harness.torque_contract import ADMIN_REJECT, FILTER_ERROR, Server
from vmwrap import directives
from vmwrap.catalog import Artifact, Image, register
from vmwrap.config import Settings, render
from vmwrap.errors import UserError
from vmwrap.resources import HOOKS
from vmwrap_plugins.torque import hooks, jobs

ROOT = Path(__file__).resolve().parent.parent
ART = Artifact("/x", "a" * 64, 1)
HUGE = "9" * 5000


@pytest.fixture(scope="module")
def base(test_user):
    b = Path(f"/var/tmp/vmwrap-torque-filter-{os.getpid()}")
    shutil.rmtree(b, ignore_errors=True)
    b.mkdir(parents=True)
    b.chmod(0o755)
    for img in (Image("busybox", "kernel", ART, ART), Image("private", "kernel", ART, ART, users=["alice"])):
        register(str(b / "images.toml"), img)
    (b / "vmwrap.toml").write_text(render({"catalog": str(b / "images.toml"), "state_dir": str(b / "state"),
                                           "checkpoint_dir": str(b / "ckpt")}))
    yield b
    shutil.rmtree(b, ignore_errors=True)


@pytest.fixture(scope="module")
def server(base):
    filt = base / "submitfilter"   # as `vmwrap config render torque` installs it for a non-default config
    filt.write_text(f"#!/bin/sh\nexec {HOOKS / 'torque-submitfilter'} --config {base / 'vmwrap.toml'} \"$@\"\n")
    filt.chmod(0o755)
    return Server(base, filt)


@pytest.fixture
def jobdir(base, test_user):
    d = base / "work" / f"t{os.urandom(3).hex()}"
    d.mkdir(parents=True)
    os.chown(d, test_user.pw_uid, test_user.pw_gid)
    return d


def qsub(server, jobdir, user, script: str, *args):
    p = jobdir / "job.sh"
    p.write_text(script)
    os.chown(p, user.pw_uid, user.pw_gid)
    return server.qsub(p, *args, user=user, cwd=jobdir)


CASES = [  # the Slurm job_submit.lua corpus (tests/test_slurm_lua.py), as #VMWRAP lines
    "--image=nope", "--image=../x", "--image='busybox'", '--image=a"b', "--image=<x>", "--image=a&b",
    "--image=busy box", "--image=", "--image", "", "image=x", "--imgae=x", "--image=a --image=b",
    "--memory=0", "--memory=-5G", "--memory=lots", "--memory=99999999999T", "--cpus=0", "--cpus=-2",
    "--cpus=two", "--cpus=1.5", "--cpus=100000", "--on-lost-checkpoint=maybe", "--image=busybox --gpu=1",
]


@pytest.mark.parametrize("directive", CASES)
def test_filter_rejects_what_the_parser_rejects_with_its_message(server, jobdir, test_user, directive):
    """torque.cfg SUBMITFILTER (Admin Guide appendix J; qsub_functions.c get_script): exit 255 ->
    qsub prints the filter's stderr, then 'administratively rejected', and exits 1."""
    script = f"#!/bin/sh\n#PBS -N t\n#VMWRAP {directive}\necho hi\n"
    try:
        directives.parse(script)
        expected = "vmwrap: unknown image 'nope'"
    except UserError as e:
        expected = f"vmwrap: {e}"
    rc, err, job = qsub(server, jobdir, test_user, script)
    assert (rc, job) == (1, None)
    assert err.startswith(expected) and err.endswith(ADMIN_REJECT), err


@pytest.mark.parametrize("script, args, message", [
    ("#!/bin/sh\necho hi\n", ("-v", "VMWRAP_IMAGE=nope"), "vmwrap: unknown image 'nope'"),
    ("#!/bin/sh\necho hi\n", ("-v", "A=1,VMWRAP_IMAGE=../../etc"), "vmwrap: invalid image name '../../etc'"),
    ("#!/bin/sh\n#PBS -v VMWRAP_IMAGE=x'y\necho hi\n", (), "vmwrap: invalid image name"),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-v", "VMWRAP_IMAGE=other"),
     "vmwrap: the script asks for image 'busybox' but -v VMWRAP_IMAGE=other"),
    ("#!/bin/sh\n#VMWRAP --image=private\necho hi\n", (), "vmwrap: user 'vmwrapuser' may not use image 'private'"),
    ("#!/bin/sh\n#VMWRAP --memory=1G\necho hi\n", (), "vmwrap: #VMWRAP options without an image"),
    ("#!/bin/sh\n#VMWRAP-TORQUE-WRAPPED\n#VMWRAP --image=busybox\necho hi\n", (),
     "vmwrap: the script contains #VMWRAP-TORQUE-WRAPPED, which vmwrap reserves"),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-I",), "vmwrap: interactive jobs (qsub -I) cannot run in a VM"),
    ("#!/bin/sh\n#PBS -I\necho hi\n", ("-v", "VMWRAP_IMAGE=busybox"), "vmwrap: interactive jobs (qsub -I) cannot run"),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-VI",), "vmwrap: interactive jobs (qsub -I) cannot run in a VM"),
    (f"#!/bin/sh\n#VMWRAP --image=busybox --cpus={HUGE}\necho hi\n", (), "vmwrap: line 2: --cpus=999999999999...: absurdly large"),
    (f"#!/bin/sh\n#VMWRAP --image=busybox --memory={HUGE}G\necho hi\n", (), "vmwrap: line 2: --memory=999999999999...: absurdly large"),
])
def test_filter_rejects_native_and_forged_requests(server, jobdir, test_user, script, args, message):
    rc, err, job = qsub(server, jobdir, test_user, script, *args)
    assert (rc, job) == (1, None)
    assert message in err and err.endswith(ADMIN_REJECT), err


@pytest.mark.parametrize("script, args, nodes", [
    ("#!/bin/sh\n#PBS -l nodes=2\n#VMWRAP --image=busybox\necho hi\n", (), 2),
    ("#!/bin/sh\n#PBS -l nodes=1:ppn=4+1:ppn=4\n#VMWRAP --image=busybox\necho hi\n", (), 2),
    ("#!/bin/sh\n#PBS -l walltime=60,nodes=2:ppn=1\n#VMWRAP --image=busybox\necho hi\n", (), 2),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-l", "nodes=3"), 3),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-Vlnodes=host1+host2",), 2),
    ("#!/bin/sh\necho hi\n", ("-v", "VMWRAP_IMAGE=busybox", "-l", "nodes=2:ppn=2"), 2),
    # the command line overrides the script's #PBS line
    ("#!/bin/sh\n#PBS -l nodes=1:ppn=2\n#VMWRAP --image=busybox\necho hi\n", ("-l", "nodes=2"), 2),
])
def test_filter_refuses_a_vm_job_on_more_than_one_node(server, jobdir, test_user, script, args, nodes):
    """A VM job is one VM on one node (the prologue runs on the mother superior only): refused at qsub
    with the reason every scheduler gives (vmwrap.request.multi_node_refusal)."""
    rc, err, job = qsub(server, jobdir, test_user, script, *args)
    assert (rc, job) == (1, None)
    assert err.startswith(f"vmwrap: multi-node jobs are not supported yet (-l nodes asks for {nodes} nodes): "
                          "a vmwrap job runs in one VM on one node; ask for one node with its processors: "
                          "-l nodes=1:ppn=N\n") and err.endswith(ADMIN_REJECT), err


PROCS = "-l procs={n} lets Torque take its processors from several nodes"
PROCS_FIX = "ask for one node with its processors: -l nodes=1:ppn=N"
TASKS = "-L asks for {n} tasks, which Torque may place on several nodes"
TASKS_FIX = "ask for one task with its processors: -L tasks=1:lprocs=N"


@pytest.mark.parametrize("script, args, n, asked, fix", [
    ("#!/bin/sh\n#PBS -l procs=4\n#VMWRAP --image=busybox\necho hi\n", (), 4, PROCS, PROCS_FIX),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-l", "walltime=60,procs=2"), 2, PROCS, PROCS_FIX),
    ("#!/bin/sh\n#PBS -l procs=1\n#VMWRAP --image=busybox\necho hi\n", ("-l", "procs=8"), 8, PROCS, PROCS_FIX),
    # Torque 6's -L: each request is `tasks` tasks (default 1), which may land on different nodes
    ("#!/bin/sh\n#PBS -L tasks=2:lprocs=4\n#VMWRAP --image=busybox\necho hi\n", (), 2, TASKS, TASKS_FIX),
    ("#!/bin/sh\n#VMWRAP --image=busybox\necho hi\n", ("-L", "tasks=1:lprocs=2", "-L", "lprocs=1"), 2, TASKS,
     TASKS_FIX),
])
def test_filter_refuses_a_vm_job_whose_processors_may_span_nodes(server, jobdir, test_user, script, args, n,
                                                                 asked, fix):
    """-l procs=N lets Torque take the N processors from several nodes: refused unless N is 1."""
    rc, err, job = qsub(server, jobdir, test_user, script, *args)
    assert (rc, job) == (1, None)
    assert err.startswith(f"vmwrap: multi-node jobs are not supported yet ({asked.format(n=n)}): a vmwrap job "
                          f"runs in one VM on one node; {fix}\n") and err.endswith(ADMIN_REJECT), err


@pytest.mark.parametrize("script, args", [
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l nodes=1:ppn=4\n#VMWRAP --image=busybox\necho hi\n", ()),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l procs=1\n#VMWRAP --image=busybox\necho hi\n", ()),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -L tasks=1:lprocs=4\n#VMWRAP --image=busybox\necho hi\n", ()),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l procs=4\necho hi\n", ()),   # no VM: not vmwrap's business
    ("#!/bin/sh\n#PBS -N vm\n#VMWRAP --image=busybox\necho hi\n", ("-l", "nodes=1:ppn=2,walltime=60")),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l nodes=2\n#VMWRAP --image=busybox\necho hi\n", ("-l", "nodes=1:ppn=2")),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l nodes=2:ppn=2\necho hi\n", ()),   # no VM: not vmwrap's business
])
def test_filter_accepts_a_job_on_one_node(server, jobdir, test_user, script, args):
    rc, err, job = qsub(server, jobdir, test_user, script, *args)
    assert (rc, err) == (0, "") and job.name == "vm", err


def test_filter_leaves_a_job_without_a_request_alone(server, jobdir, test_user):
    script = "#!/bin/bash\n#PBS -N plain\necho hi\n"
    rc, err, job = qsub(server, jobdir, test_user, script)
    assert (rc, err) == (0, "") and job.script == script and job.name == "plain"


@pytest.mark.parametrize("script, args", [
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l walltime=60\n#VMWRAP --image=busybox\necho hi\n", ()),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l walltime=60\necho hi\n", ("-v", "VMWRAP_IMAGE=busybox")),
    ("#!/bin/sh\n#PBS -N vm\n#PBS -l walltime=60\n#PBS -v VMWRAP_IMAGE=busybox\necho hi\n", ()),
])
def test_filter_wraps_a_vm_job_and_keeps_its_pbs_lines(server, jobdir, test_user, script, args):
    """qsub reads #PBS lines from the filter's output: they stay in the leading comments; the
    request is there as #VMWRAP for the prologue; the original script follows in a here-document."""
    rc, err, job = qsub(server, jobdir, test_user, script, *args)
    assert (rc, err) == (0, ""), err
    assert job.name == "vm" and "walltime=60" in job.resources and job.shell == "/bin/sh"
    assert directives.parse(job.script).image == "busybox" and jobs.wrapped(job.script)
    # the wrapper hands the shell the original script verbatim
    r = subprocess.run(["/bin/sh", "-c", job.script.replace(str(HOOKS / "torque-job"), "cat").replace(
        f"--config {server.base / 'vmwrap.toml'} ", "")], capture_output=True, text=True)
    assert r.stdout == script


def test_filter_exit_status_other_than_255_is_an_error_code(server, jobdir, test_user, base):
    """Another non-zero status: 'submit filter returned an error code' (the catalog is unreadable)."""
    broken = base / "broken"
    broken.write_text("#!/bin/sh\ncat >/dev/null; echo 'vmwrap: broken' >&2; exit 1\n")
    broken.chmod(0o755)
    rc, err, job = Server(base, broken).qsub(jobdir / "x", user=test_user, cwd=jobdir) if (jobdir / "x").write_text("x") else (0, "", None)
    assert (rc, job) == (1, None) and err == "vmwrap: broken\n" + FILTER_ERROR


# --- the prologue reads ids, resource lists and the spooled script (root; users write most of it) -----

@pytest.mark.parametrize("tid, jid, seq", [("123.srv.example.org", "123.srv", "123"), ("7[3].srv", "7-3.srv", "7-3"),
                                           ("42", "42", "42"), ("1." + "a" * 200, "1." + "a" * 62, "1")])
def test_job_ids(tid, jid, seq):
    assert jobs.job_id(tid) == jid and jobs.sequence(tid) == seq


@pytest.mark.parametrize("tid", ["", "../1", "1;rm", HUGE, "1.srv/x", "-1.srv", "1[x].srv"])
def test_bad_job_ids(tid):
    with pytest.raises(UserError):
        jobs.job_id(tid)


@pytest.mark.parametrize("rl, ppn, mib", [
    ("neednodes=1:ppn=2,nodes=1:ppn=2,walltime=00:10:00,mem=512mb", 2, 512),
    ("nodes=1:ppn=4,pmem=256mb", 4, 1024),
    ("nodes=1,mem=1gb,vmem=600mb", None, 600),
    ("nodes=1,mem=64mw", None, 512),
    ("procs=3", 3, None),
    (f"nodes=1:ppn={HUGE}", None, None),
])
def test_resource_list(rl, ppn, mib):
    res = jobs.resources(rl)
    assert jobs.ppn(res) == ppn and jobs.memory_mib(res, ppn) == mib


@pytest.mark.parametrize("mem", [HUGE, "lots", "-5gb", "1.5gb", "5xb"])
def test_bad_memory_is_a_user_error(mem):
    with pytest.raises(UserError, match="cannot read the job's memory request"):
        jobs.memory_mib(jobs.resources(f"nodes=1,mem={mem}"), None)


MULTI = "multi-node jobs are not supported yet (the job was given {} nodes): a vmwrap job runs in one VM on one node"


@pytest.mark.parametrize("resources, env, message", [
    (f"nodes=1,mem={HUGE}", {}, "cannot read the job's memory request"),
    ("nodes=2,walltime=60", {}, MULTI.format(2)),          # qalter -l nodes=2 after the filter let it in
    ("nodes=1:ppn=1+1:ppn=1", {}, MULTI.format(2)),
    ("procs=4", {"PBS_NUM_NODES": "3"}, MULTI.format(3)),  # procs the scheduler spread
])
def test_prologue_with_crafted_requests_fails_the_job_and_keeps_the_node(tmp_path, monkeypatch, resources, env,
                                                                         message):
    """Appendix G: exit 0 runs the job (its payload prints the reason), never the node's fault."""
    s = Settings(state_dir=str(tmp_path / "state"), catalog=str(tmp_path / "none.toml"),
                 checkpoint_dir=str(tmp_path / "ckpt"))
    monkeypatch.setattr(hooks, "take_out", lambda *a: pytest.fail("the node was taken out"))
    spool = tmp_path / "mom_priv" / "jobs"
    spool.mkdir(parents=True)
    spool.chmod(0o751)
    sc = spool / "5.srv.SC"
    sc.write_text("#!/bin/sh\n#VMWRAP --image=busybox\n#VMWRAP-TORQUE-WRAPPED\nexec x\n")
    argv = ["5.srv", "root", "root", "j", resources, "batch", "", str(sc)]
    assert hooks.prologue(s, argv, env) == 0
    err = (s.jobs_dir / "5.srv" / "error").read_text()
    assert err.startswith("user\n") and message in err, err


def test_prologue_takes_a_one_node_procs_job(tmp_path):
    assert jobs.node_total(jobs.resources("procs=4"), "1") == 1
    assert jobs.node_total(jobs.resources("nodes=1:ppn=4")) == 1


def test_prologue_refuses_a_vm_request_that_bypassed_the_filter(tmp_path, monkeypatch):
    s = Settings(state_dir=str(tmp_path / "state"), checkpoint_dir=str(tmp_path / "ckpt"))
    spool = tmp_path / "mom_priv" / "jobs"
    spool.mkdir(parents=True)
    sc = spool / "6.srv.SC"
    sc.write_text("#!/bin/sh\n#VMWRAP --image=busybox\necho bare\n")
    assert hooks.prologue(s, ["6.srv", "root", "root", "j", "nodes=1", "batch", "", str(sc)], {}) == 0
    assert "not submitted through vmwrap's submit filter" in (s.jobs_dir / "6.srv" / "error").read_text()


def test_prologue_reads_no_script_but_the_spooled_one(tmp_path, test_user):
    """Arg 8 must be <PBS_HOME>/mom_priv/jobs/<ID>.SC in a root dir no one else may write."""
    d = tmp_path / "mom_priv" / "jobs"
    d.mkdir(parents=True)
    for f in ("1.srv.SC", "12.srv.SC", "2.srv.SC"):
        (d / f).write_text("#VMWRAP --image=busybox\n")
    assert jobs.spooled_script(str(d / "1.srv.SC"), "1.srv", 1234) is not None
    for bad in (str(d / ".." / "jobs" / "1.srv.SC"), str(d / "2.srv.SC"), str(d / "12.srv.SC"), "/etc/shadow",
                str(tmp_path / "x.SC")):
        assert jobs.spooled_script(bad, "1.srv", 1234) is None
    d.chmod(0o777)
    assert jobs.spooled_script(str(d / "1.srv.SC"), "1.srv", 1234) is None
    d.chmod(0o755)
    (d / "1.srv.SC").unlink()
    (d / "1.srv.SC").symlink_to("/etc/shadow")
    assert jobs.spooled_script(str(d / "1.srv.SC"), "1.srv", 1234) is None


def test_health_check_reports_a_node_fault_once_recorded(tmp_path):
    """$node_check_script: a line starting with ERROR marks the node down (Admin Guide, 'Compute
    node health check'); nothing while the node is fine; `vmwrap torque online` clears it."""
    from io import StringIO

    s = Settings(state_dir=str(tmp_path / "state"))
    out = StringIO()
    hooks.health(s, out)
    assert out.getvalue() == ""
    hooks.take_out(s, "vmwrap: libvirt is\nunreachable")
    hooks.health(s, out)
    assert out.getvalue() == "ERROR vmwrap: libvirt is unreachable\n"
    assert hooks.online(s) and not hooks.online(s)


# --- vmwrap config render torque and the packaging -------------------------------------------------------

@pytest.fixture(scope="module")
def entry_points(tmp_path_factory):
    """pyproject.toml's entry points as an installed distribution would have them (the venv's own
    metadata is only rewritten by a reinstall)."""
    d = tmp_path_factory.mktemp("ep") / "vmwrap_torque_check-0.dist-info"
    d.mkdir()
    proj = tomllib.loads((ROOT / "pyproject.toml").read_text())
    eps = proj["project"]["entry-points"]
    assert "vmwrap_plugins.torque" in proj["tool"]["setuptools"]["packages"]
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: vmwrap-torque-check\nVersion: 0\n")
    (d / "entry_points.txt").write_text("".join(
        f"[{g}]\ntorque = {eps[g]['torque']}\n" for g in ("vmwrap.schedulers", "vmwrap.cli")))
    return d.parent


def test_config_render_torque(entry_points):
    env = dict(os.environ, PYTHONPATH=f"{entry_points}:{ROOT}")
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "config", "render", "torque", "--node-config",
                        "/etc/vmwrap/node.toml"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    for want in ("SUBMITFILTER /usr/local/sbin/vmwrap-submitfilter", "mom_priv/prologue", "mom_priv/epilogue",
                 "chmod 0500", "$checkpoint_script", "$restart_script", "$remote_checkpoint_dirs",
                 "$node_check_script", "$prologalarm", "--config /etc/vmwrap/node.toml", " agent",
                 "VMWRAP_IMAGE=NAME", "torque gc --qstat /usr/local/bin/qstat"):
        assert want in r.stdout, want
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "torque", "--help"], capture_output=True, text=True, env=env)
    assert r.returncode == 0 and "prologue" in r.stdout and "submitfilter" in r.stdout


def test_hook_scripts_are_isolated_and_executable():
    for name in ("prologue", "epilogue", "submitfilter", "job", "checkpoint", "restart", "health"):
        p = HOOKS / f"torque-{name}"
        assert os.access(p, os.X_OK)
        assert "python -I -m vmwrap_plugins.torque" in p.read_text()
