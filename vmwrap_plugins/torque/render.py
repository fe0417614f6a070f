"""`vmwrap config render torque`: every file and command an admin needs to run Torque jobs in VMs."""

from __future__ import annotations

import shlex
import socket

from vmwrap.config import Settings
from vmwrap.resources import HOOKS


def _wrapper(hook: str, node_config: str | None) -> str:
    """A hook as pbs_mom/qsub call it: the script itself, or a wrapper naming the settings file."""
    if not node_config:
        return ""
    return f'#!/bin/sh\nexec {shlex.quote(str(HOOKS / hook))} --config {shlex.quote(node_config)} "$@"\n'


def render_torque(settings: Settings, node_config: str | None = None, pbs_home: str = "/var/spool/torque",
                  vmwrap_path: str = "/usr/local/bin/vmwrap") -> str:
    mom = f"{pbs_home}/mom_priv"
    lines = ["# vmwrap for Torque (rendered by `vmwrap config render torque`; docs/torque.md says which",
             "# manual section each setting comes from)."]

    def install(hook: str, dest: str, mode: str) -> list[str]:
        w = _wrapper(hook, node_config)
        if w:
            return [f"cat > {dest} <<'EOF'", *w.rstrip("\n").splitlines(), "EOF",
                    f"chown root:root {dest} && chmod {mode} {dest}"]
        return [f"install -o root -g root -m {mode} {HOOKS / hook} {dest}"]

    lines += ["", "# 1. Every submit host: torque.cfg (qsub runs the filter as the submitter).",
              *install("torque-submitfilter", "/usr/local/sbin/vmwrap-submitfilter", "0755"),
              f"echo 'SUBMITFILTER /usr/local/sbin/vmwrap-submitfilter' >> {pbs_home}/torque.cfg",
              "", "# 2. Every mom: prologue and epilogue (root-owned, writable by no one else, or pbs_mom",
              "#    refuses them: Admin Guide appendix G).",
              *install("torque-prologue", f"{mom}/prologue", "0500"),
              *install("torque-epilogue", f"{mom}/epilogue", "0500"),
              *install("torque-checkpoint", "/usr/local/sbin/vmwrap-checkpoint", "0500"),
              *install("torque-restart", "/usr/local/sbin/vmwrap-restart", "0500"),
              *install("torque-health", "/usr/local/sbin/vmwrap-health", "0555"),
              "", f"# 3. Every mom: {mom}/config lines (then restart pbs_mom).",
              "$prologalarm 600                      # the prologue boots (or fetches) the VM image",
              "$checkpoint_script /usr/local/sbin/vmwrap-checkpoint   # qhold saves the job's VM",
              "$restart_script /usr/local/sbin/vmwrap-restart         # qrls restores it, on any mom",
              "$checkpoint_run_exe /usr/bin/env      # pbs_mom runs checkpointable jobs through it",
              f"$remote_checkpoint_dirs {pbs_home}/checkpoint   # shared between moms: restart elsewhere",
              "$node_check_script /usr/local/sbin/vmwrap-health  # ERROR <reason> after a node fault",
              "$node_check_interval 1,jobstart",
              f"#    vmwrap's checkpoint store ({settings.checkpoint_dir}) must be shared by every mom too.",
              "", "# 4. Every mom: the node agent (root), which pauses/resumes a job's VM on qsig -s suspend/resume:",
              f"   {vmwrap_path}{' --config ' + shlex.quote(node_config) if node_config else ''} agent",
              "", "# 5. One host that mounts the checkpoint store and can reach pbs_server (root, a service):",
              "#    deletes the checkpoints of jobs deleted while held (no epilogue runs for them).",
              f"   {vmwrap_path}{' --config ' + shlex.quote(node_config) if node_config else ''} torque gc "
              "--qstat /usr/local/bin/qstat",
              "", "# 6. The server: checkpointable VM jobs, and who may suspend them.",
              "qmgr -c 'set queue batch checkpoint_defaults = enabled'",
              "", "# 7. Users: `#VMWRAP --image=NAME` in the script, or `qsub -v VMWRAP_IMAGE=NAME`.",
              f"# (rendered on {socket.gethostname()})", ""]
    return "\n".join(lines)
