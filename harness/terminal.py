"""Run a command with its stderr on a pseudo-terminal: how tests see what an admin's terminal shows."""

from __future__ import annotations

import os
import pty
import select
import subprocess


def run_on_pty(argv: list[str], env: dict[str, str] | None = None, timeout: float = 30.0) -> tuple[int, str, bytes]:
    """Run argv with stdout on a pipe and stderr on a pseudo-terminal: (exit code, stdout, stderr bytes).

    `timeout` bounds each silence on the terminal (and the final wait)."""
    master, slave = pty.openpty()
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL,
                         env={**(env if env is not None else os.environ), "COLUMNS": "100", "TERM": "xterm"})
    os.close(slave)
    err = b""
    while True:
        r, _, _ = select.select([master], [], [], timeout)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        err += chunk
    out = p.stdout.read().decode()
    os.close(master)
    return p.wait(timeout=timeout), out, err
