"""Real guests under libvirt/QEMU: the job must behave as it would bare."""

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

pytestmark = pytest.mark.vm

HDR = "#!/bin/sh\n#VMWRAP --image=busybox\n"


@pytest.mark.parametrize("code", [0, 1, 42])
def test_exit_codes(site, workdir, code):
    r = site.run(HDR + f"echo out; echo err >&2; exit {code}\n", workdir)
    assert (r.returncode, r.stdout, r.stderr) == (code, b"out\n", b"err\n")
    assert site.leftovers() == []


def test_killed_by_signal_is_128_plus_n(site, workdir):
    r = site.run(HDR + "echo before; kill -9 $$; echo after\n", workdir)
    assert r.returncode == 128 + 9
    assert r.stdout == b"before\n"


def test_stdin_is_closed(site, workdir):
    r = site.run(HDR + 'if read line; then echo "got:$line"; else echo eof; fi\n', workdir, input=b"secret\n")
    assert r.stdout == b"eof\n"


def test_large_output_is_exact(site, workdir):
    r = site.run(HDR + "head -c 10485760 /dev/zero | tr '\\0' 'x'; echo; echo tail >&2\n", workdir, timeout=300)
    assert r.returncode == 0
    assert len(r.stdout) == 10 * 1024 * 1024 + 1
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(b"x" * (10 << 20) + b"\n").hexdigest()
    assert r.stderr == b"tail\n"


def test_non_ascii_bytes_pass_through(site, workdir):
    r = site.run(HDR + "printf 'h\\303\\251llo \\342\\234\\223 \\377\\000end\\n'\n", workdir)
    assert r.stdout == "héllo ✓ ".encode() + b"\xff\x00end\n"


def test_runs_as_job_user_in_work_dir_with_spaces(site, workdir, test_user):
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)  # a VM job's work dir is its user's
    r = site.run(HDR + 'id -u; id -g; pwd; echo data > "made by job.txt"; umask; hostname\n', workdir,
                 "--user", test_user.pw_name)
    uid, gid, pwd, _umask, host = r.stdout.decode().split("\n")[:5]
    assert r.returncode == 0, r.stderr
    assert (int(uid), int(gid), pwd) == (test_user.pw_uid, test_user.pw_gid, str(workdir))
    assert host == os.uname().nodename  # as a bare job on this node would say
    made = workdir / "made by job.txt"
    assert made.read_text() == "data\n"
    assert (made.stat().st_uid, made.stat().st_gid) == (test_user.pw_uid, test_user.pw_gid)


def test_job_cannot_see_host_paths_outside_work_dir(site, workdir, tmp_path):
    secret = tmp_path / "host-secret"
    secret.write_text("nope")
    script = HDR + f'test -e "{secret}" && echo visible; ls "$PWD/.."; cat /etc/hostname 2>/dev/null; ls /\n'
    r = site.run(script, workdir)
    assert r.returncode == 0
    assert b"visible" not in r.stdout and b"host-secret" not in r.stdout and b"nope" not in r.stdout


def test_environment_is_the_jobs(site, workdir):
    env = site.env(WEIRD='a b "c" $d\\e', EMPTY="")
    path = site.base / "env.sh"
    path.write_text(HDR + 'printf "%s|" "$WEIRD" "${EMPTY-unset}"\n')
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "run", str(path), "--workdir", str(workdir)],
                       capture_output=True, env=env, timeout=120)
    assert r.stdout == b'a b "c" $d\\e||'


def test_root_disk_is_a_private_overlay(site, workdir):
    r1 = site.run(HDR + "echo one > /etc/marker; cat /etc/marker\n", workdir)
    r2 = site.run(HDR + "cat /etc/marker 2>/dev/null || echo clean\n", workdir)
    assert (r1.stdout, r2.stdout) == (b"one\n", b"clean\n")


def test_output_is_streamed_while_the_job_runs(site, workdir):
    p = site.popen(HDR + "echo first; sleep 4; echo second\n", workdir, stdout=subprocess.PIPE)
    line = p.stdout.readline()
    seen_running = p.poll() is None
    rest = p.stdout.read()
    assert p.wait(60) == 0
    assert line == b"first\n" and seen_running and rest == b"second\n"


def _wait_for(p, text: bytes, timeout=60):
    buf = b""
    end = time.time() + timeout
    while text not in buf and time.time() < end:
        chunk = os.read(p.stdout.fileno(), 4096)
        if not chunk:
            break
        buf += chunk
    assert text in buf, buf
    return buf


def test_sigterm_is_graceful(site, workdir):
    p = site.popen(HDR + "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.1; done\n",
                   workdir, stdout=subprocess.PIPE)
    _wait_for(p, b"ready")
    p.send_signal(signal.SIGTERM)
    out = p.stdout.read()
    assert p.wait(30) == 7
    assert b"got-term" in out
    assert site.leftovers() == []


def test_sigterm_ignored_ends_after_grace(site, workdir):
    p = site.popen(HDR + "trap '' TERM; echo ready; while :; do sleep 0.1; done\n", workdir, stdout=subprocess.PIPE)
    _wait_for(p, b"ready")
    t0 = time.time()
    p.send_signal(signal.SIGTERM)
    rc = p.wait(60)
    took = time.time() - t0
    assert rc in (128 + 9, 128 + 15)
    assert 4.5 <= took < 20  # grace_seconds = 5 in the test site
    assert site.leftovers() == []


def _domstate(name):
    return subprocess.run(["virsh", "-c", "qemu:///system", "domstate", name], capture_output=True, text=True).stdout.strip()


def test_sigtstp_pauses_and_sigcont_resumes(site, workdir):
    job_id = f"tstp{os.getpid()}"
    p = site.popen(HDR + "i=0; while [ $i -lt 30 ]; do echo $i; i=$((i+1)); sleep 0.2; done\n",
                   workdir, "--job-id", job_id, stdout=subprocess.PIPE)
    _wait_for(p, b"3\n")
    p.send_signal(signal.SIGTSTP)
    time.sleep(0.5)
    assert _domstate(f"vmwrap-{job_id}") == "paused"
    size = len((site.state / "jobs" / job_id / "stdout").read_bytes())
    time.sleep(2)
    assert len((site.state / "jobs" / job_id / "stdout").read_bytes()) == size  # frozen
    p.send_signal(signal.SIGCONT)
    time.sleep(0.5)
    assert _domstate(f"vmwrap-{job_id}") == "running"
    rest = p.stdout.read()
    assert p.wait(60) == 0
    events = [e["event"] for e in _ledger(site, job_id)]
    assert "paused" in events and "resumed" in events
    nums = [int(x) for x in rest.split()]
    assert nums == list(range(nums[0], 30))


def test_an_agent_killed_after_pausing_but_before_answering_does_not_leave_the_vm_paused(site, workdir, test_user):
    """The payload of a job's user pauses its VM through the node agent. An agent killed after it paused
    the VM but before it answered made the payload fall back to stopping the job's processes inside,
    and the resume then only continued those: the VM stayed paused for good (seen in CI under Slurm).
    The resume must reach the agent too, retried until the agent is back."""
    import json
    import socket
    import threading

    from harness.polling import wait_for
    from vmwrap import agent, launcher, payload
    from vmwrap.job import Job

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    script = HDR + "i=0; while [ $i -lt 25 ]; do echo $i; i=$((i+1)); sleep 0.2; done\n"
    lx = launcher.Launcher(Job("lost1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid,
                               str(workdir), script), settings)
    path = agent.socket_path(settings)
    path.parent.mkdir(parents=True, exist_ok=True)
    dying = socket.socket(socket.AF_UNIX)
    dying.bind(str(path))
    dying.listen()
    asked = []

    def pause_and_die():
        c, _ = dying.accept()
        asked.append(json.loads(c.makefile("rb").readline())["op"])
        lx.conn.lookupByName("vmwrap-lost1").suspend()
        c.close()
        dying.close()
        path.unlink()

    out = open(site.base / "lost1.out", "w+b")
    try:
        lx.prepare()
        lx.boot()
        att = payload.Attachment(lx.run_dir, "lost1", out_fd=out.fileno(), err_fd=out.fileno(), settings=settings)
        att.start(script, {"PATH": "/bin:/usr/bin"}, [])
        rc = []
        streaming = threading.Thread(target=lambda: rc.append(att.stream()), daemon=True)
        streaming.start()
        wait_for(lambda: b"3\n" in (lx.run_dir / "stdout").read_bytes(), "the job to count to 3")
        threading.Thread(target=pause_and_die, daemon=True).start()
        att._signals.append(signal.SIGTSTP)     # what the scheduler's suspend sends first
        wait_for(lambda: not path.exists(), "the stand-in agent to pause the VM and die")
        assert asked == ["pause"] and _domstate("vmwrap-lost1") == "paused"
        att._signals.append(signal.SIGCONT)     # resumed while no agent runs: asked again until one does
        time.sleep(3)
        assert _domstate("vmwrap-lost1") == "paused" and streaming.is_alive()
        threading.Thread(target=agent.serve, args=(settings,), daemon=True).start()   # the agent is back
        streaming.join(90)
        out.seek(0)
        said = out.read().decode()
        assert rc == [0], said
        assert [int(x) for x in (lx.run_dir / "stdout").read_text().split()] == list(range(25))
        assert "gave no answer to pause" in said and "vmwrap: the VM resumed" in said, said
    finally:
        out.close()
        launcher.teardown("lost1", settings)


def _ledger(site, job_id):
    from vmwrap.ledger import Ledger

    return Ledger(site.settings().ledger_path).events(job_id)


def test_ledger_records_the_vm_life(site, workdir):
    r = site.run(HDR + "echo x\n", workdir, "--job-id", "led1")
    assert r.returncode == 0
    events = [e["event"] for e in _ledger(site, "led1")]
    for ev in ("created", "booted", "started", "exited", "destroyed"):
        assert ev in events
    assert events.index("created") < events.index("booted") < events.index("exited") < events.index("destroyed")


def test_teardown_after_launcher_is_killed(site, workdir):
    p = site.popen(HDR + "echo ready; sleep 600\n", workdir, "--job-id", "killed1", stdout=subprocess.PIPE)
    _wait_for(p, b"ready")
    p.kill()
    p.wait()
    assert "vmwrap-killed1" in site.leftovers()  # a SIGKILLed launcher cannot clean up: the epilog must
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "teardown", "killed1"], env=site.env(), capture_output=True)
    assert r.returncode == 0 and b"removed" in r.stdout
    assert site.leftovers() == []
    r = subprocess.run([sys.executable, "-m", "vmwrap.cli", "teardown", "killed1"], env=site.env(), capture_output=True)
    assert r.returncode == 0 and b"nothing to remove" in r.stdout  # idempotent


def test_initramfs_appliance_without_root_disk(site, workdir, test_user):
    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)  # a VM job's work dir is its user's
    from conftest import APPLIANCES
    from vmwrap import appliance as builder

    img = builder.build("vmwrap-test-initramfs", "initramfs", str(APPLIANCES), str(site.catalog))
    assert img.disk is None
    r = site.run("#!/bin/sh\n#VMWRAP --image=vmwrap-test-initramfs\nid -u; pwd; test -b /dev/vda || echo no-disk\n",
                 workdir, "--user", test_user.pw_name)
    assert r.returncode == 0, r.stderr
    assert r.stdout.decode().splitlines() == [str(test_user.pw_uid), str(workdir), "no-disk"]
    assert site.leftovers() == []


def test_a_save_that_would_run_past_its_deadline_is_stopped(site, workdir):
    """The gap planner's last line of defence: a reservation needs the node at the deadline."""
    from vmwrap import checkpoint, domain, launcher
    from vmwrap.errors import NodeError

    settings = site.settings()
    store = checkpoint.Store(site.base / "ckpt", checkpoint.keygen(site.base / "ckpt.key"))
    checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
    p = site.popen(HDR + "i=0; while :; do i=$((i+1)); echo n=$i; sleep 1; done\n", workdir,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert p.stdout.readline() == b"n=1\n"
        (run_dir,) = (site.state / "jobs").iterdir()
        job = run_dir.name
        conn = domain.connect(settings.libvirt_uri)
        t0 = time.time()
        with pytest.raises(NodeError, match="did not finish by .* reservation needs the node"):
            checkpoint.save(job, run_dir, store, conn, 1, deadline=t0 + 0.05)
        assert time.time() - t0 < 5            # aborted at the deadline, not after the whole save
        assert not store.exists(job) and not list(store.root.glob(f".{job}.*"))   # nothing half-written
        with pytest.raises(NodeError, match="no time left to save"):
            checkpoint.save(job, run_dir, store, conn, 1, deadline=time.time() - 1)
        conn.close()
    finally:
        p.kill()
        p.wait()
        for d in (site.state / "jobs").iterdir():
            launcher.teardown(d.name, settings)
    assert site.leftovers() == []


def _reseal(store, job_id):
    """Re-sign a checkpoint's manifest as vmwrap would: what only a holder of the site key can do."""
    import json

    from vmwrap import checkpoint

    d = store.dir(job_id)
    m = json.loads((d / "manifest.json").read_text())
    m.pop("mac")
    for name in m["files"]:
        n, digest = checkpoint._hash_file(d / name)
        m["files"][name] = {"bytes": n, "sha256": digest}
    (d / "manifest.json").write_text(json.dumps({**m, "mac": checkpoint._mac(store.key(), m)}))


def test_restore_trusts_only_what_the_site_key_signed(site, workdir, test_user):
    """Through real libvirt: a restored VM gets vmwrap's own domain XML even when the one inside
    memory.save asks for QEMU arguments, and a checkpoint changed without the site key is refused."""
    import json

    from vmwrap import checkpoint, domain, launcher, payload
    from vmwrap.errors import CheckpointError
    from vmwrap.job import Job

    os.chown(workdir, test_user.pw_uid, test_user.pw_gid)
    settings = site.settings()
    store = checkpoint.Store(site.base / "ckpt", checkpoint.keygen(site.base / "ckpt.key"))
    checkpoint.init_store(store.root, store.key_file)  # `vmwrap checkpoints init`
    script = HDR + "i=0; while :; do i=$((i+1)); echo n=$i; sleep 1; done\n"

    def job(restarts):
        return Job("ckpt1", "test", test_user.pw_name, test_user.pw_uid, test_user.pw_gid, str(workdir), script,
                   restart_count=restarts)

    def wait_out(run_dir, text, timeout=120):
        end = time.time() + timeout
        while text not in (run_dir / "stdout").read_bytes():
            assert time.time() < end, [(f, (run_dir / f).read_bytes()[-1500:]) for f in
                                       ("stdout", "stderr", "status", "console.log", "9p.log") if (run_dir / f).exists()]
            time.sleep(0.2)

    lx = launcher.Launcher(job(0), settings)
    try:
        lx.prepare()
        lx.boot()
        att = payload.Attachment(lx.run_dir, "ckpt1", conn=lx.conn)
        att.start(script, {"PATH": "/bin:/usr/bin"}, [])  # the guest reads GO while att holds the socket
        wait_out(lx.run_dir, b"n=3\n")
        att.control.close()
        checkpoint.save("ckpt1", lx.run_dir, store, lx.conn, 1)
        launcher.teardown("ckpt1", settings)
        mem = store.dir("ckpt1") / "memory.save"
        # A node holding the key wrote QEMU arguments into the saved XML (the worst case): not used.
        saved = lx.conn.saveImageGetXMLDesc(str(mem), 0)
        # (vmwrap's domain XML already declares libvirt's QEMU namespace: domain.xml.j2)
        evil = saved.replace("</domain>", "<qemu:commandline><qemu:arg value='-fw_cfg'/>"
                            "<qemu:arg value='name=opt/vmwrap-evil,string=1'/></qemu:commandline></domain>")
        lx.conn.saveImageDefineXML(str(mem), evil, 0)
        assert "vmwrap-evil" in lx.conn.saveImageGetXMLDesc(str(mem), 0)
        _reseal(store, "ckpt1")
        lx2 = launcher.Launcher(job(1), settings)
        lx2.prepare()
        lx2.restore(store)
        live = lx2.conn.lookupByName("vmwrap-ckpt1").XMLDesc(0)
        assert "vmwrap-evil" not in live and "commandline" not in live
        pid = subprocess.run(["pgrep", "-f", "guest=vmwrap-ckpt1,"], capture_output=True, text=True).stdout.split()
        with open(f"/proc/{pid[0]}/cmdline", "rb") as f:
            assert b"vmwrap-evil" not in f.read()
        wait_out(lx2.run_dir, b"n=5\n")  # the guest continues after its restore
        assert (lx2.run_dir / "stdout").read_bytes().startswith(b"n=1\nn=2\nn=3\n")
        launcher.teardown("ckpt1", settings)
        # job.json now says uid 0 and the manifest its new checksum, but nobody could re-sign it.
        d = store.dir("ckpt1")
        meta = json.loads((d / "job.json").read_text())
        (d / "job.json").write_text(json.dumps({**meta, "uid": 0, "gid": 0}))
        m = json.loads((d / "manifest.json").read_text())
        n, digest = checkpoint._hash_file(d / "job.json")
        m["files"]["job.json"] = {"bytes": n, "sha256": digest}
        (d / "manifest.json").write_text(json.dumps(m))
        lx3 = launcher.Launcher(job(1), settings)
        lx3.prepare()
        with pytest.raises(CheckpointError, match="not authenticated"):
            lx3.restore(store)
        assert domain.lookup(lx3.conn, "vmwrap-ckpt1") is None
    finally:
        launcher.teardown("ckpt1", settings)
    assert site.leftovers() == []
