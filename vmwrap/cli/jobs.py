"""`vmwrap run` (the job payload a scheduler starts) and `vmwrap teardown` (epilogs and admins)."""

from __future__ import annotations

import os
import pwd
import sys

import click

from ..errors import VmwrapError
from .context import friendly_oserrors
from .context import settings as site_settings


@click.command(context_settings={"ignore_unknown_options": False})
@click.argument("script", type=click.Path(dir_okay=False))
@click.option("--job-id", default=lambda: f"local-{os.getpid()}", help="Scheduler's job id (names the VM).")
@click.option("--user", "user", default=None, help="Run the job as this user (default: the caller).")
@click.option("--workdir", default=None, help="Job work dir shared into the VM (default: current dir).")
@click.option("--image", default=None, help="Image when the script has no #VMWRAP --image directive.")
@click.option("--cpus", type=int, default=None, help="CPUs allocated by the scheduler (ceiling).")
@click.option("--memory", "memory_mib", type=int, default=None, help="MiB allocated by the scheduler (ceiling).")
@click.option("--scheduler", default="none", help="Scheduler name for the ledger.")
def run(script, job_id, user, workdir, image, cpus, memory_mib, scheduler):
    """Run SCRIPT inside its own VM; exit with its exit code."""
    from ..job import Job
    from ..launcher import EXIT_FOR
    from ..launcher import run as run_job

    # The job's own mistakes exit with the job's exit codes (launcher.EXIT_FOR), not the CLI's 1.
    try:
        with open(script, encoding="utf-8", errors="surrogateescape") as f:
            text = f.read()
    except OSError as e:
        click.echo(f"vmwrap: error: cannot read job script {script}: {e.strerror}", err=True)
        sys.exit(EXIT_FOR["user"])
    try:
        pw = pwd.getpwnam(user) if user else pwd.getpwuid(os.getuid())
    except KeyError:
        click.echo(f"vmwrap: error: unknown user {user!r}", err=True)
        sys.exit(EXIT_FOR["user"])
    settings = site_settings()
    try:
        job = Job(
            job_id=job_id, scheduler=scheduler, user=pw.pw_name, uid=pw.pw_uid, gid=pw.pw_gid,
            work_dir=os.path.abspath(workdir or os.getcwd()), script=text,
            environment=dict(os.environ), cpus=cpus, memory_mib=memory_mib, image=image,
            groups=[g for g in os.getgrouplist(pw.pw_name, pw.pw_gid) if g != pw.pw_gid],
        )
    except VmwrapError as e:
        click.echo(f"vmwrap: error: {e}", err=True)
        sys.exit(EXIT_FOR[e.kind])
    sys.exit(run_job(job, settings))


@click.command()
@click.argument("job_id")
@friendly_oserrors
def teardown(job_id: str) -> None:
    """Destroy JOB_ID's VM and remove its files (idempotent; for epilogs and admins).

    Libvirt unreachable (the VM may still run) is a node problem: one error line and exit 69, as
    `vmwrap run` exits for a node fault, so an epilog can tell it from a job's failure."""
    from ..errors import NodeError
    from ..job import Job
    from ..launcher import teardown as do_teardown
    from ..payload import EXIT_NODE

    Job(job_id=job_id, scheduler="none", user="root", uid=0, gid=0, work_dir="/", script="")  # validates id
    try:
        did = do_teardown(job_id, site_settings(), raise_unreachable=True)
    except NodeError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EXIT_NODE)
    click.echo(f"{job_id}: {'removed' if did else 'nothing to remove'}")


@click.command()
@click.argument("job_id")
@click.argument("command", required=False)
@friendly_oserrors
def shell(job_id: str, command: str | None) -> None:
    """A shell inside JOB_ID's running VM on this node, as the job's user (or run COMMAND there).

    Only the job's own user (or root) gets one: the node agent checks. Exits with the shell's status;
    255 when there was no session (refused, no such VM) or the VM went away first, as ssh does."""
    from .. import shell as sh
    from ..job import Job

    try:
        Job(job_id=job_id, scheduler="none", user="root", uid=0, gid=0, work_dir="/", script="")  # validates id
        code = sh.run(site_settings(), job_id, command)
    except VmwrapError as e:
        click.echo(f"Error: {e}", err=True)
        code = sh.LOST
    sys.exit(code)
