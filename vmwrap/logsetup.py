"""Daemon logging where admins look: journald with syslog levels under systemd, else a file or stderr.

systemd sets JOURNAL_STREAM when stderr is the journal; a line starting `<N>` then gets priority N
(SyslogLevelPrefix=, on by default), so `journalctl -p warning -u vmwrap-agent` works.
"""

from __future__ import annotations

import logging
import os
import sys

from .config import Settings

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


class _Journal(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = _PRIORITY.get(record.levelno, 6)
        return "\n".join(f"<{prio}>{line}" for line in super().format(record).splitlines())


def configure(settings: Settings) -> None:
    """Root logger per `log_level` and `log_file` (appended; else stderr, journald-aware)."""
    if settings.log_file:
        handler: logging.Handler = logging.FileHandler(settings.log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    elif os.environ.get("JOURNAL_STREAM"):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_Journal("%(levelname)s %(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(settings.log_level.upper())
