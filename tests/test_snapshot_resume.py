"""snapshot.resume: a restored guest gets RESUME again until it answers (a CI run's guest never saw the
first one, and the job cold-booted after 15 s). The guest here is a thread on the control socket."""

import threading
from pathlib import Path

import guest_port
from vmwrap import domain, rundir, snapshot


def fake_guest(run_dir: Path, answer_after: int | None) -> tuple[threading.Thread, list[str]]:
    """Accept the host on the control socket; after `answer_after` RESUME lines say "resumed"."""
    lines: list[str] = []
    srv = guest_port.listen(run_dir)

    def serve():
        c, _ = srv.accept()
        with c, c.makefile("r") as f:
            for line in f:
                lines.append(line.rstrip("\n"))
                if answer_after is not None and len(lines) == answer_after:
                    (run_dir / rundir.STATUS).write_text("resumed 1.00\n")
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t, lines


def test_a_lost_resume_is_sent_again(tmp_path):
    (tmp_path / rundir.STATUS).write_text("")
    t, lines = fake_guest(tmp_path, answer_after=2)  # the first line is lost
    ctl = domain.Control(tmp_path)
    assert snapshot.resume(ctl, tmp_path, timeout=5.0, every=0.2)
    ctl.close()
    t.join(5)
    assert len(lines) == 2 and all(ln.startswith("RESUME ") for ln in lines), lines
    assert lines[0].split()[1] != lines[1].split()[1]  # each carries its own seed


def test_a_guest_that_never_answers_times_out(tmp_path):
    (tmp_path / rundir.STATUS).write_text("")
    t, lines = fake_guest(tmp_path, answer_after=None)
    ctl = domain.Control(tmp_path)
    assert not snapshot.resume(ctl, tmp_path, timeout=1.0, every=0.3)
    ctl.close()
    t.join(5)
    assert 3 <= len(lines) <= 5, lines
