"""The host end of `vmwrap shell`'s framing (vmwrap/shell.py): what the guest sends is hostile."""

import pytest

from vmwrap import shell
from vmwrap.errors import UserError


def test_frames_are_split_and_joined_as_they_arrive():
    buf = bytearray(shell.frame(b"D", b"abc") + shell.frame(b"X", b"3")[:4])
    assert list(shell.frames(buf)) == [(b"D", b"abc")]
    buf += shell.frame(b"X", b"3")[4:]
    assert list(shell.frames(buf)) == [(b"X", b"3")] and buf == b""


def test_an_oversized_length_drops_the_buffer_instead_of_waiting_for_it():
    buf = bytearray(b"D" + (shell.FRAME_MAX + 1).to_bytes(4, "big") + b"x" * 10)
    assert list(shell.frames(buf)) == [] and buf == b""


def test_the_open_request_carries_size_term_and_command_and_refuses_what_cannot_pass():
    assert shell.open_request(33, 101, "xterm-256color", None) == shell.frame(b"O", b"33 101 xterm-256color tty")
    assert shell.open_request(24, 80, "bad term;rm", "id", tty=False) == shell.frame(b"O", b"24 80 dumb pipe\0id")
    assert shell.open_request(24, 80, "xterm", "id", tty=False, split=True) == shell.frame(b"O", b"24 80 xterm pipe split\0id")
    assert shell.open_request(24, 80, "xterm", None, split=True) == shell.frame(b"O", b"24 80 xterm tty")  # a terminal: one
    with pytest.raises(UserError, match="NUL"):
        shell.open_request(24, 80, "xterm", "a\0b")
    with pytest.raises(UserError, match="longer than"):
        shell.open_request(24, 80, "xterm", "x" * shell.FRAME_MAX)


def test_a_task_waiting_for_a_free_port_asks_less_and_less_often(monkeypatch):
    """A step's tasks beyond a VM's ports wait for one; each ask costs the node agent a thread and a
    libvirt call: the asks thin out (0.1 s, then x1.5) up to every BUSY_POLL_MAX_S, and the wait ends
    with the port once one is free."""
    from vmwrap.errors import BusyError

    asked, slept = [], []

    def request_port(settings, job_id):
        asked.append(job_id)
        if len(asked) < 12:
            raise BusyError("4 sessions of job 5 are open")
        return "the port"

    monkeypatch.setattr(shell, "request_port", request_port)
    monkeypatch.setattr(shell.time, "sleep", slept.append)
    assert shell.ready_port(None, "5", waiting_note_s=5.0, wait_busy=True) == "the port"
    assert len(slept) == 11 and slept[0] == 0.1
    assert all(b >= a for a, b in zip(slept, slept[1:])) and slept[-1] == shell.BUSY_POLL_MAX_S > slept[3]
    with pytest.raises(BusyError):   # `vmwrap shell` itself does not wait
        asked.clear()
        shell.ready_port(None, "5", waiting_note_s=5.0)
