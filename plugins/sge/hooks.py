"""Grid Engine glue: the queue's prolog/epilog (root), starter_method and suspend/resume/terminate
methods (job owner) translated into core calls. Exit codes follow GE's meaning: a prolog exit 0 runs
the job, anything else but 99/100 puts the queue instance in error (node fault only)."""

from __future__ import annotations

import os
import pwd
import re
import signal
import subprocess
import sys

from vmwrap import agent, directives, launcher
from vmwrap.config import Settings
from vmwrap.errors import CacheFullError, NodeError, UserError, VmwrapError
from vmwrap.job import Job

CONTEXT = re.compile(r"^context:\s+(.*)$", re.M)


def job_id(env: dict[str, str]) -> str:
    """GE's JOB_ID, with the task of an array job ('123.4'); ids are plain names for the core."""
    jid = env["JOB_ID"]
    task = env.get("SGE_TASK_ID", "undefined")
    return f"{jid}.{task}" if task not in ("", "undefined") else jid


def context_image(jid: str) -> str | None:
    """The native way: `qsub -ac vmwrap_image=NAME` (a job context variable, validated by the JSV)."""
    try:
        r = subprocess.run(["qstat", "-j", jid.split(".")[0]], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = CONTEXT.search(r.stdout)
    if not m:
        return None
    for kv in m.group(1).split(","):
        k, _, v = kv.partition("=")
        if k.strip() == "vmwrap_image":
            return v.strip()
    return None


def job_from_env(env: dict[str, str], owner: str) -> Job | None:
    try:
        with open(env["JOB_SCRIPT"], "rb") as f:  # a binary job's "script" is its command: read a little
            script = f.read(1 << 20).decode("utf-8", "surrogateescape")
    except OSError:
        script = ""
    req = directives.parse(script)
    jid = job_id(env)
    image = req.image or context_image(jid)
    if not image:
        return None
    pw = pwd.getpwnam(owner)
    return Job(job_id=jid, scheduler="sge", user=owner, uid=pw.pw_uid, gid=pw.pw_gid, work_dir=os.getcwd(),
               script=script, cpus=int(env.get("NSLOTS") or 1), image=image,
               groups=[g for g in os.getgrouplist(owner, pw.pw_gid) if g != pw.pw_gid])


def prolog(settings: Settings, env: dict[str, str], owner: str) -> int:
    jid = job_id(env)
    lx = None
    try:
        job = job_from_env(env, owner)
        if job is None:
            return 0
        launcher.teardown(jid, settings)
        lx = launcher.Launcher(job, settings)
        lx.prepare()
        lx.boot()
        return 0
    except CacheFullError as e:
        launcher.record_error(settings.jobs_dir / jid, e)
        launcher.teardown(jid, settings, keep_error=True)
        return 0
    except NodeError as e:
        launcher.teardown(jid, settings)
        print(f"vmwrap prolog: node fault: {e}", file=sys.stderr)
        return 1  # GE puts this queue instance in error state: an admin must look
    except VmwrapError as e:  # the user's mistake: the job runs, prints the reason and fails
        launcher.record_error(settings.jobs_dir / jid, e)
        return 0


def epilog(settings: Settings, env: dict[str, str]) -> int:
    try:
        launcher.teardown(job_id(env), settings)
    except NodeError as e:
        print(f"vmwrap epilog: {e}", file=sys.stderr)
        return 1
    return 0


def starter(settings: Settings, argv: list[str]) -> int:
    """starter_method (job owner): a job with a VM attaches to it; any other job runs as usual."""
    jid = job_id(os.environ)
    run_dir = settings.jobs_dir / jid
    if not argv:
        print("vmwrap sge starter: no job command", file=sys.stderr)
        return 2
    if not run_dir.exists():
        os.execvp(argv[0], argv)
    script, args = _payload(argv)
    env = {k: v for k, v in os.environ.items() if k != "VMWRAP_CONFIG"}
    return launcher.attach(run_dir, jid, script, env, args, grace=settings.grace_seconds, settings=settings)


def _payload(argv: list[str]) -> tuple[str, list[str]]:
    """A spooled job script runs as itself; a binary job (`qsub -b y cmd args`) runs its command line."""
    head = b""
    try:
        with open(argv[0], "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        pass
    if not head or head.startswith(b"\x7fELF") or b"\0" in head[:4096]:
        return '#!/bin/sh\nexec "$@"\n', list(argv)
    return head.decode("utf-8", "surrogateescape"), argv[1:]


def method(settings: Settings, action: str, jid: str, pid: int) -> int:
    """suspend/resume/terminate_method (job owner). GE does not signal the job when a method is set."""
    env_jid = job_id(os.environ) if "JOB_ID" in os.environ else jid
    has_vm = (settings.jobs_dir / env_jid).exists()
    try:
        if action in ("suspend", "resume") and has_vm:
            agent.request(settings, "pause" if action == "suspend" else "resume", env_jid)
            return 0
        if action == "terminate":
            os.kill(pid, signal.SIGTERM)  # the attachment stops the job in its VM: TERM, grace, KILL
            return 0
        sig = signal.SIGSTOP if action == "suspend" else signal.SIGCONT
        os.killpg(os.getpgid(pid), sig)
        return 0
    except ProcessLookupError:
        return 0
    except (NodeError, UserError, OSError) as e:
        print(f"vmwrap sge {action}: job {env_jid}: {e}", file=sys.stderr)
        return 1


_CATALOG: dict[str, tuple[float, object]] = {}


def _catalog(path: str):
    """The catalog, re-read only when the file changed (a server JSV checks many jobs in one process)."""
    from vmwrap.catalog import Catalog

    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        mtime = -1
    hit = _CATALOG.get(path)
    if hit is None or hit[0] != mtime:
        hit = _CATALOG[path] = (mtime, Catalog.load(path))
    return hit[1]


def check_request(settings: Settings, params: dict[str, str], user: str, gid: int,
                  script_optional: bool = False) -> tuple[str | None, str | None]:
    """(image, None) for an acceptable request, (None, reason) to reject it. Reads the script body
    (the client JSV runs as the submitter, in qsub's directory) and the `-ac vmwrap_image=` context."""
    ctx = dict(kv.partition("=")[::2] for kv in params.get("ac", "").split(",") if kv)
    native = ctx.get("vmwrap_image") or None
    text = ""
    cmd = params.get("CMDNAME", "")
    if cmd and params.get("b", "n") != "y" and os.path.isfile(cmd):
        try:
            with open(cmd, encoding="utf-8", errors="surrogateescape") as f:
                text = f.read(1 << 20)
        except OSError as e:
            if not script_optional:  # a server JSV may not read users' files: the prolog checks it then
                return None, f"cannot read the job script {cmd}: {e.strerror}"
    try:
        req = directives.parse(text)
        if native is not None:
            directives.check_image_name(native)
        if req.image and native and req.image != native:
            return None, f"the script asks for image {req.image!r} but -ac vmwrap_image={native}"
        image = req.image or native
        if image is None:
            return None, None
        _catalog(settings.catalog).resolve(image, user, gid)
    except VmwrapError as e:
        return None, str(e)
    return image, None


def jsv(settings: Settings, inp, out) -> int:
    """Grid Engine's JSV line protocol (client JSV, run by qsub as the submitter)."""
    me = pwd.getpwuid(os.getuid())

    def say(line: str) -> None:
        out.write(line + "\n")
        out.flush()

    params: dict[str, str] = {}
    for raw in inp:
        parts = raw.rstrip("\n").split(" ", 2)
        cmd = parts[0]
        if cmd == "START":
            say("STARTED")
        elif cmd == "PARAM" and len(parts) >= 2:
            params[parts[1]] = parts[2] if len(parts) > 2 else ""
        elif cmd == "BEGIN":
            # A client JSV runs as the submitter; a server JSV (jsv_url, one long-lived process in
            # sge_qmaster) as the admin user, for everybody: then the job's USER param names them.
            user = params.get("USER") or me.pw_name
            try:
                pw = pwd.getpwnam(user)
            except KeyError:
                pw = me
            server = pw.pw_uid != me.pw_uid
            image, reason = check_request(settings, params, pw.pw_name, pw.pw_gid, script_optional=server)
            if reason:
                say(f"RESULT STATE REJECT vmwrap: {reason}")
            elif image and "vmwrap_image=" not in params.get("ac", ""):
                ac = ",".join(x for x in (params.get("ac", ""), f"vmwrap_image={image}") if x)
                say(f"PARAM ac {ac}")
                say("RESULT STATE CORRECT")
            else:
                say("RESULT STATE ACCEPT")
            params = {}
        elif cmd == "QUIT":
            return 0
    return 0
