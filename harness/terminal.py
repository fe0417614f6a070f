"""Run a command with its stderr on a pseudo-terminal: how tests see what an admin's terminal shows."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import time


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


def read_until_exit(fd: int, p: subprocess.Popen, send: list[tuple[bytes, bytes]], timeout: float = 120.0) -> bytes:
    """Everything the terminal `fd` shows until p exits; each (wait_for, then_type) pair types once seen."""
    out, end = b"", time.time() + timeout
    while time.time() < end:
        while send and send[0][0] in out:
            os.write(fd, send.pop(0)[1])
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                chunk = b""
            out += chunk
            if chunk:
                continue
        if p.poll() is not None:
            return out
    raise AssertionError(f"{p.args!r} did not end: {out[-2000:]!r}")


def _controlling_terminal() -> None:
    os.setsid()
    import fcntl
    import termios

    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def start_on_terminal(argv: list[str], rows: int = 24, cols: int = 80, **kw) -> tuple[int, subprocess.Popen]:
    """argv in a new session whose controlling terminal is a new pseudo-terminal of rows x cols, as a
    user's login shell starts it (salloc wants one); returns (the terminal's master end, the process)."""
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        p = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, preexec_fn=_controlling_terminal, **kw)
    finally:
        os.close(slave)
    return master, p
