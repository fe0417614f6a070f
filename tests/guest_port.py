"""A stand-in for a guest's end of the VM control port, for unit tests of what the host sends on it."""

import socket
from pathlib import Path

from vmwrap import rundir


def listen(run_dir: Path) -> socket.socket:
    """The run dir's control socket, listening as QEMU's chardev server does."""
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(Path(run_dir) / rundir.CONTROL_SOCKET))
    srv.listen(1)
    return srv
