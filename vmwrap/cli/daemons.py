"""`vmwrap daemons`: the site's daemons without systemd (start|stop|status), and the one command a
systemd unit runs (`run NAME`). Which daemons and their command lines: vmwrap.services."""

from __future__ import annotations

import logging
import os
import sys
import threading

import click

from ..errors import VmwrapError
from .context import Site, echo_json, echo_table, friendly_oserrors, json_option, settings

NOT_RUNNING = 3  # LSB init-script status code: a configured daemon is not running
EX_CONFIG = 78   # sysexits: the units do not restart a daemon this site has not got (RestartPreventExitStatus)


def _config_path() -> str | None:
    """The config this command read, passed on explicitly: the daemons get a clean environment."""
    site = click.get_current_context().find_object(Site)
    return site.config_path or os.environ.get("VMWRAP_CONFIG") or None


def _names(given: tuple[str, ...]) -> list[str]:
    from .. import services

    names = list(given) or services.configured(settings())
    if not names:
        raise click.ClickException("no daemons named and the setting `daemons` is empty "
                                   "(e.g. daemons = \"agent,prestage\" in vmwrap.toml)")
    return names


@click.group()
def daemons() -> None:
    """vmwrap's daemons on this node without systemd (docs/admin-guide.md); units run `daemons run`."""


@daemons.command()
@click.argument("name")
def run(name: str) -> None:
    """Run daemon NAME in the foreground (what the vmwrap-NAME systemd unit runs), logging per
    log_level / log_file."""
    from .. import logsetup, services
    from ..rootenv import clean_environment
    from . import main

    clean_environment(("JOURNAL_STREAM", "NOTIFY_SOCKET", "INVOCATION_ID"))
    try:
        s = settings()
        args = services.argv(name, s)
    except VmwrapError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(EX_CONFIG)
    logsetup.configure(s)
    logging.getLogger("vmwrap.daemons").info("starting %s: vmwrap %s", name, " ".join(args))
    if name == "agent":  # the node's report for `vmwrap status`, from the process that answers pings
        from .. import nodestatus

        threading.Thread(target=nodestatus.publisher, args=(s,), name="status", daemon=True).start()
    cfg = _config_path()
    main.main(args=(["--config", cfg] if cfg else []) + args, prog_name="vmwrap")


@daemons.command()
@click.argument("names", nargs=-1)
@friendly_oserrors
def start(names: tuple[str, ...]) -> None:
    """Start NAMES (default: the setting `daemons`) detached, unless running."""
    from .. import services

    s = settings()
    for name in _names(names):
        pid, new = services.start(name, s, _config_path())
        click.echo(f"{name}: {'started' if new else 'already running'}, pid {pid}")


@daemons.command()
@click.argument("names", nargs=-1)
def stop(names: tuple[str, ...]) -> None:
    """Stop NAMES (default: every daemon with a pid file)."""
    from .. import services

    s = settings()
    for name in names or [n for n in services.DAEMONS if services.pid_file(s, n).exists()]:
        pid = services.stop(s, name)
        click.echo(f"{name}: {'stopped, pid ' + str(pid) if pid else 'not running'}")


@daemons.command()
@json_option
def status(as_json: bool) -> None:
    """Every daemon: configured here, running (pid), command. Exit 3 when a configured one is not running."""
    from .. import services

    s = settings()
    mine = services.configured(s)
    rows = []
    for name, d in services.DAEMONS.items():
        try:
            cmd = "vmwrap " + " ".join(services.argv(name, s))
        except Exception:
            cmd = None
        row = {"name": name, "where": d.where, "configured": name in mine, "pid": services.running(s, name),
               "command": cmd}
        if name == "agent":  # also one started some other way: it answers on its socket
            row["answers"] = _agent_answers(s)
        rows.append(row)
    if as_json:
        echo_json(rows)
    else:
        echo_table(["DAEMON", "WHERE", "HERE", "STATE", "COMMAND"],
                   [[r["name"], r["where"], "yes" if r["configured"] else "-",
                     _state(r), r["command"] or "(not for this scheduler)"] for r in rows])
    sys.exit(NOT_RUNNING if any(r["configured"] and not (r["pid"] or r.get("answers")) for r in rows) else 0)


def _state(row: dict) -> str:
    if row["pid"]:
        return f"running {row['pid']}"
    return "answers (no pid file)" if row.get("answers") else "stopped"


def _agent_answers(s) -> bool:
    from ..agent import ping
    from ..errors import NodeError

    try:
        ping(s, timeout=1.0)
        return True
    except NodeError:
        return False
