"""`vmwrap condor ...`: the node's bridge (root) and the payload side it starts (the job's user)."""

from __future__ import annotations

import shlex
import sys

import click


def _config_path() -> str | None:
    return click.get_current_context().find_root().params.get("config_path")


@click.group("condor")
def condor() -> None:
    """HTCondor: the execute node's bridge between the (chrooted) starter and root's VMs."""


@condor.command()
@click.option("--socket", "socket_path", default="/run/vmwrap/condor.sock", show_default=True,
              help="Unix socket the job wrappers connect to (bind it into the starter's chroot).")
@click.option("--condor-python", default=None,
              help="Command line of a Python with htcondor2 to query the schedd with, when vmwrap's own "
                   "Python lacks it (e.g. 'chroot ROOT /usr/bin/env -i CONDOR_CONFIG=F /usr/bin/python3').")
@click.option("--startd", "startds", multiple=True,
              help="Name of a startd on this node (NAME@HOST as in RemoteHost); default: this host's name.")
@click.pass_obj
def bridge(obj, socket_path, condor_python, startds):
    """Serve job wrappers (root): verify each job with the schedd, boot its VM, run it, tear it down."""
    from vmwrap.rootenv import clean_environment

    from .bridge import Bridge, serve
    from .facts import Schedd
    from .hooks import fault_path

    clean_environment(())
    settings = obj.settings(hook=True)
    schedd = Schedd(shlex.split(condor_python) if condor_python else None)
    serve(Bridge(settings, _config_path(), schedd, list(startds), fault_file=fault_path(socket_path)), socket_path)


@condor.command()
@click.argument("job_id")
@click.option("--payload-fd", type=int, required=True)
@click.option("--control-fd", type=int, default=None, help="Pipe on which the bridge says `vacate`.")
@click.pass_obj
def attach(obj, job_id, payload_fd, control_fd):
    """The payload side (the job's user; started by the bridge): run the job in its VM."""
    from .hooks import attach as run

    sys.exit(run(obj.settings(hook=True), job_id, payload_fd, control_fd))


@condor.command()
@click.option("--condor-python", default=None, help="As for `vmwrap condor bridge`.")
@click.option("--interval", default=600.0, show_default=True, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, then exit (1 if it failed).")
@click.pass_obj
def gc(obj, condor_python, interval, once):
    """Delete checkpoints of VM jobs the schedd no longer has (condor_rm of a job waiting saved)."""
    from vmwrap import daemons
    from vmwrap.rootenv import clean_environment

    from .facts import Schedd
    from .hooks import HTCondor

    clean_environment(("CONDOR_CONFIG",))  # root deletes checkpoints: nothing of the caller's shell but the pool
    schedd = Schedd(shlex.split(condor_python) if condor_python else None)
    sys.exit(daemons.gc(HTCondor(schedd=schedd), obj.settings(hook=True), interval, once))


@condor.command()
@click.option("--socket", "socket_path", default="/run/vmwrap/condor.sock", show_default=True,
              help="The bridge's socket: the images are written to SOCKET.cached, which the startd's probe reads.")
@click.option("--cached-ad", default=None, help="Write the images here instead of SOCKET.cached.")
@click.option("--node", default=None,
              help="This execute node as the schedd's ads name it: a startd's name (NAME@HOST, as in RemoteHost "
                   "without its slot) or its machine (default: this host's short name, i.e. all its startds).")
@click.option("--condor-python", default=None, help="As for `vmwrap condor bridge`.")
@click.option("--interval", default=60.0, show_default=True, help="Seconds between passes.")
@click.option("--once", is_flag=True, help="One pass, then exit (1 if it failed).")
@click.pass_obj
def prestage(obj, socket_path, cached_ad, node, condor_python, interval, once):
    """Fetch the images of idle VM jobs that could start on this node (root), most likely first, and
    advertise the images the node's cache holds: the startd publishes them as VmwrapCachedImages and
    the submit transform's Rank prefers such nodes for a job's image."""
    import os
    from pathlib import Path

    from vmwrap import daemons

    from vmwrap.rootenv import clean_environment

    from .facts import Schedd
    from .hooks import HTCondor, cached_path

    clean_environment(("CONDOR_CONFIG",))  # the in-process bindings find the pool by it
    out = Path(cached_ad) if cached_ad else cached_path(socket_path)
    schedd = Schedd(shlex.split(condor_python) if condor_python else None)
    sys.exit(daemons.prestage(HTCondor(cached_file=out, schedd=schedd), obj.settings(hook=True),
                              node or os.uname().nodename.split(".")[0], interval, once))
