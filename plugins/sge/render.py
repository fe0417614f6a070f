"""`vmwrap config render sge`: the qconf settings that enable vmwrap on a Grid Engine cell."""

from __future__ import annotations

import socket

from .localcell import HOOKS, queue_config


def render_sge(queue: str = "vmwrap.q", hostlist: str = "@allhosts", slots: int = 0) -> str:
    q = queue_config(queue, hostlist, slots or 1, HOOKS)
    keep = ("qname", "hostlist", "prolog", "epilog", "starter_method", "suspend_method", "resume_method",
            "terminate_method", "shell_start_mode")
    lines = [ln for ln in q.splitlines() if ln.split()[0] in keep]
    return "\n".join([
        "# vmwrap for Grid Engine (rendered by `vmwrap config render sge`)",
        f"# 1. Queue: `qconf -mq {queue}` (or -aq for a new one) and set:",
        *("   " + ln for ln in lines),
        "#    prolog/epilog run as root (root@); the methods run as the job owner and reach VMs through",
        "#    the node agent (`vmwrap agent`, root, one per node) - start it with the execd.",
        "# 2. Submit check: add this line to $SGE_ROOT/$SGE_CELL/common/sge_request (every qsub runs it",
        "#    as the submitter; it reads #VMWRAP lines in the script and `-ac vmwrap_image=NAME`):",
        f"   -jsv {HOOKS / 'sge-jsv'}",
        "# 3. Users: `#VMWRAP --image=NAME` in the script, or `qsub -ac vmwrap_image=NAME` (binary jobs).",
        f"# (rendered on {socket.gethostname()})",
        "",
    ])
