"""`vmwrap slurm interactive` (salloc's interactive step) where the job has no VM on the node: the user's
shell as Slurm's default step, unless the job asked for an image (then an error, never a host shell).
With a VM: tests/test_slurm.py drives salloc through a terminal."""

from __future__ import annotations

import os
import subprocess
import sys

from vmwrap.config import render
from vmwrap.payload import EXIT_NODE


def _step(tmp_path, **env):
    cfg = tmp_path / "vmwrap.toml"
    (tmp_path / "images.toml").write_text("")
    cfg.write_text(render({"catalog": str(tmp_path / "images.toml"), "state_dir": str(tmp_path / "state")}))
    shell = tmp_path / "myshell"
    shell.write_text("#!/bin/sh\necho \"bare shell $0 $SLURM_JOB_ID\"\n")
    shell.chmod(0o755)
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM", "VMWRAP"))}
    return subprocess.run([sys.executable, "-m", "vmwrap.cli", "--config", str(cfg), "slurm", "interactive"],
                          env={**base, "SLURM_JOB_ID": "4242", "SHELL": str(shell), **env},
                          capture_output=True, text=True, timeout=60)


def test_a_job_without_an_image_gets_the_users_shell(tmp_path):
    r = _step(tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, f"bare shell {tmp_path / 'myshell'} 4242\n", "")


def test_a_job_that_asked_for_an_image_but_has_no_vm_here_gets_no_host_shell(tmp_path):
    r = _step(tmp_path, SLURM_CONTAINER="busybox")
    assert r.returncode == EXIT_NODE and "bare shell" not in r.stdout
    assert r.stderr == ("vmwrap: error: job 4242 asked for image 'busybox' but has no VM on this node (is vmwrap's "
                        "prolog in slurm.conf?)\n")
