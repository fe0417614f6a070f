"""Slurm's client commands as the head-node agents (prestage, plan) call them."""

from __future__ import annotations

import os
import subprocess
import time

# Slurm's client commands by absolute path (Debian's layout): root runs them from hooks and agents,
# and a PATH lookup would run whatever the caller's PATH names first.
SLURM_BIN = "/usr/bin"
SCONTROL = os.path.join(SLURM_BIN, "scontrol")
SQUEUE = os.path.join(SLURM_BIN, "squeue")


def run(*argv: str) -> str:
    """stdout of a Slurm command (a name in SLURM_BIN); RuntimeError with its message if it failed."""
    exe = os.path.join(SLURM_BIN, os.path.basename(argv[0]))
    # errors="replace": users write job names and comments, in any bytes
    r = subprocess.run([exe, *argv[1:]], capture_output=True, text=True, errors="replace", timeout=60)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout


def epoch(stamp: str) -> float | None:
    """Slurm's local-time stamp (2026-12-02T01:10:46) as epoch seconds; None for N/A, Unknown..."""
    try:
        return time.mktime(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None
