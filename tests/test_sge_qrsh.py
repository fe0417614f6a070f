"""Issue 19 (Grid Engine tight integration, groundwork): the guest's `qrsh -inherit` as a checked host
command. The guest is hostile: its host must be one of the job's, its options few, and its command
must never reach the host shell qrsh_starter runs tasks through."""

import shlex

import pytest

from vmwrap.errors import UserError
from vmwrap_plugins.sge import steps

TASK = ["/opt/vmwrap/venv/bin/python", "-m", "vmwrap_plugins.sge.task", "/run/vmwrap/jobs/7/tasks.sock", "tok", "7"]
HOSTS = ["vm", "sgehost2"]


def test_openmpis_call_becomes_qrsh_with_the_command_as_one_inert_word():
    argv = ["-inherit", "-nostdin", "-V", "sgehost2", "orted", "-mca", "ess", "env", "$(reboot)", "a b;c"]
    index, host = steps.qrsh_command(argv, TASK, HOSTS)
    assert index == 4 and host[:4] == ["/usr/bin/qrsh", "-inherit", "-nostdin", "sgehost2"] and host[4:-1] == TASK
    # what qrsh_starter's `sh -c "..."` makes of the joined words: exactly the words given
    assert shlex.split(" ".join(host[4:])) == host[4:]
    # ... and on that host (in its VM) the words run as qrsh_starter runs them bare: joined, by a shell
    assert steps.decode_command(host[-1]) == ["/bin/sh", "-c", "orted -mca ess env $(reboot) a b;c"]


def test_with_noshell_the_task_is_the_words_as_given():
    argv = ["-inherit", "-noshell", "sgehost2", "printf", "%s\n", "a b"]
    index, host = steps.qrsh_command(argv, TASK, HOSTS)
    assert index == 3 and steps.decode_command(host[-1]) == ["printf", "%s\n", "a b"]


@pytest.mark.parametrize("argv, said", [
    (["sgehost2", "hostname"], "only `qrsh -inherit HOST COMMAND`"),
    (["-inherit", "-l", "h_rt=1", "sgehost2", "x"], "qrsh option '-l' is not supported"),
    (["-inherit", "-nostdin"], "no host given"),
    (["-inherit", "otherhost", "x"], "host 'otherhost' is not one of this job's hosts (vm sgehost2)"),
    (["-inherit", "vm"], "no command given"),
])
def test_what_is_not_a_task_on_the_jobs_hosts_is_refused(argv, said):
    with pytest.raises(UserError) as e:
        steps.qrsh_command(argv, TASK, HOSTS)
    assert said in str(e.value)


def test_a_task_word_a_shell_would_touch_is_never_sent():
    with pytest.raises(UserError, match="not shell-inert"):
        steps.qrsh_command(["-inherit", "vm", "x"], [*TASK[:3], "/tmp/a b"], HOSTS)


def test_a_forged_command_word_is_refused():
    with pytest.raises(UserError, match="not what the job's qrsh sent"):
        steps.decode_command("$(id)")


def test_a_task_knows_the_masters_host_by_execds_spool_there():
    """The master names its host by execd's spool there, which a task's dir there starts with: host
    names may be spelt otherwise (host_aliases), and GE sets no HOSTNAME for a task."""
    from vmwrap_plugins.sge.hooks import execd_spool
    from vmwrap_plugins.sge.task import on_master_host

    master = execd_spool("/var/spool/gridengine/execd/localhost/active_jobs/301807.1")
    assert master == "/var/spool/gridengine/execd/localhost"
    here = {"SGE_JOB_SPOOL_DIR": "/var/spool/gridengine/execd/localhost/active_jobs/301807.1/2.vm", "HOSTNAME": "x"}
    there = {"SGE_JOB_SPOOL_DIR": "/var/spool/gridengine/execd/sgehost2/active_jobs/301807.1/1.sgehost2",
             "HOSTNAME": "vm"}
    assert on_master_host(here, master) and not on_master_host(there, master)
    assert on_master_host(there, "sgehost2") and not on_master_host(here, "sgehost2")   # named by name
    for bad in ("", "relative/active_jobs/1.1", "/var/spool/x/1.1", "/a/../b/active_jobs/1.1"):
        assert execd_spool(bad) is None, bad


def test_the_starter_runs_a_vm_task_with_its_own_hosts_config(monkeypatch, tmp_path):
    """A task the job's VM started runs as given, told this host's config (from this host's starter
    line, never the job's variables); any other qrsh task keeps the job's environment untouched."""
    from vmwrap.config import Settings
    from vmwrap_plugins.sge import hooks

    ran = []

    def fake_exec(path, argv, env=None):
        ran.append((argv, env))
        raise SystemExit(0)

    monkeypatch.setattr(hooks.os, "execve", fake_exec)
    monkeypatch.setattr(hooks.os, "execvp", lambda path, argv: fake_exec(path, argv))
    monkeypatch.setenv("JOB_SCRIPT", "QRSH")
    monkeypatch.setenv("JOB_ID", "7")
    monkeypatch.setenv("VMWRAP_CONFIG", "/home/user/mine.toml")
    settings = Settings(state_dir=str(tmp_path))
    task = [*TASK[:3], "sock", "tok", "7", "vm", "ZWNobw=="]
    with pytest.raises(SystemExit):
        hooks.starter(settings, task, config_path="/etc/vmwrap/node2.toml")
    assert ran[-1][0] == task and ran[-1][1]["VMWRAP_CONFIG"] == "/etc/vmwrap/node2.toml"
    with pytest.raises(SystemExit):
        hooks.starter(settings, task)
    assert "VMWRAP_CONFIG" not in ran[-1][1]
    with pytest.raises(SystemExit):
        hooks.starter(settings, ["/bin/hostname"], config_path="/etc/vmwrap/node2.toml")
    assert ran[-1] == (["/bin/hostname"], None)


def test_the_vm_gets_the_jobs_pe_hostfile_and_qrsh_where_open_mpi_looks(tmp_path):
    """$PE_HOSTFILE names a copy of execd's pe_hostfile (from the job's active dir, never the path the
    environment names) in the VM's control files; qrsh goes to $SGE_ROOT/bin/$ARC as well."""
    from vmwrap import rundir
    from vmwrap_plugins.sge import hooks

    active = tmp_path / "spool" / "vm" / "active_jobs" / "7.1"
    active.mkdir(parents=True)
    (active / "pe_hostfile").write_text("vm 1 vmwrap.q@vm UNDEFINED\nsgehost2 1 vmwrap.q@sgehost2 UNDEFINED\n")
    run_dir = tmp_path / "run"
    rundir.user_dir(run_dir).mkdir(parents=True)
    env = {"SGE_JOB_SPOOL_DIR": str(active), "PE_HOSTFILE": "/elsewhere/pe_hostfile",
           "SGE_ROOT": "/usr/share/gridengine", "ARC": "lx-amd64"}
    assert hooks.guest_view(run_dir, env) == ("/usr/share/gridengine/bin/lx-amd64",)
    assert env["PE_HOSTFILE"] == "/.vmwrap/user/given.pe_hostfile"
    given = rundir.user_dir(run_dir) / "given.pe_hostfile"
    assert given.read_bytes() == (active / "pe_hostfile").read_bytes()
    # a job in no parallel environment, or whose spool dir is not execd's: nothing given
    for env in ({"SGE_ROOT": "/usr/share/gridengine", "ARC": "lx-amd64"},
                {"SGE_JOB_SPOOL_DIR": str(tmp_path), "PE_HOSTFILE": str(active / "pe_hostfile")}):
        given.unlink(missing_ok=True)
        before = dict(env)
        hooks.guest_view(run_dir, env)
        assert env.get("PE_HOSTFILE") == before.get("PE_HOSTFILE") and not given.exists()
    (active / "pe_hostfile").unlink()
    (active / "pe_hostfile").symlink_to("/etc/passwd")     # never a link
    env = {"SGE_JOB_SPOOL_DIR": str(active), "PE_HOSTFILE": "/x"}
    assert hooks.guest_view(run_dir, env) == () and env["PE_HOSTFILE"] == "/x"


def test_a_task_the_agent_turns_away_as_busy_asks_again_until_its_deadline(monkeypatch):
    """All of a job's tasks on a host may start at once, more than the agent serves one user at a time:
    a task turned away as busy asks again (any other refusal is final); past the deadline it fails."""
    from vmwrap import agent
    from vmwrap.errors import NodeError
    from vmwrap_plugins.sge import task

    answers, asked = [], []

    def request(settings, op, job, timeout):
        asked.append((op, job))
        a = answers.pop(0)
        if a is not None:
            raise a
        return {"ok": True}

    monkeypatch.setattr(agent, "request", request)
    monkeypatch.setattr(task, "PEER_RETRY_FIRST", 0.01)
    answers[:] = [agent.Busy("busy"), agent.Busy("busy"), None]
    task.start_peer(None, "7")
    assert asked == [("peer", "7")] * 3
    answers[:], asked[:] = [NodeError("refused: not your job"), None], []
    with pytest.raises(NodeError, match="not your job"):
        task.start_peer(None, "7")
    assert len(asked) == 1
    monkeypatch.setattr(task, "PEER_START_TIMEOUT", 0.3)
    answers[:] = [agent.Busy("still busy")] * 1000
    with pytest.raises(agent.Busy, match="still busy"):
        task.start_peer(None, "7")
