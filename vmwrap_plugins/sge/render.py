"""`vmwrap config render sge`: the qconf settings that enable vmwrap on a Grid Engine cell."""

from __future__ import annotations

import socket
from pathlib import Path

from vmwrap.resources import HOOKS

from .facts import CACHED, CACHED_COMPLEX


def queue_config(name: str, host: str, slots: int, hooks: Path = HOOKS, extra: dict | None = None) -> str:
    """The queue's settings wiring vmwrap in (also printed by `vmwrap config render sge`)."""
    q = {
        "qname": name, "hostlist": host, "seq_no": "0", "load_thresholds": "NONE", "suspend_thresholds": "NONE",
        "nsuspend": "1", "suspend_interval": "00:05:00", "priority": "0", "min_cpu_interval": "00:05:00",
        "processors": "UNDEFINED", "qtype": "BATCH INTERACTIVE", "ckpt_list": "NONE", "pe_list": "NONE",
        "rerun": "FALSE", "slots": str(slots), "tmpdir": "/tmp", "shell": "/bin/sh",
        "prolog": f"root@{hooks / 'sge-prolog'} $job_owner", "epilog": f"root@{hooks / 'sge-epilog'}",
        "shell_start_mode": "unix_behavior", "starter_method": str(hooks / "sge-starter"),
        "suspend_method": f"{hooks / 'sge-method'} suspend $job_id $job_pid",
        "resume_method": f"{hooks / 'sge-method'} resume $job_id $job_pid",
        "terminate_method": f"{hooks / 'sge-method'} terminate $job_id $job_pid",
        "notify": "00:00:60", "owner_list": "NONE", "user_lists": "NONE", "xuser_lists": "NONE",
        "subordinate_list": "NONE", "complex_values": "NONE", "projects": "NONE", "xprojects": "NONE",
        "calendar": "NONE", "initial_state": "default", "s_rt": "INFINITY", "h_rt": "INFINITY",
        "s_cpu": "INFINITY", "h_cpu": "INFINITY", "s_fsize": "INFINITY", "h_fsize": "INFINITY",
        "s_data": "INFINITY", "h_data": "INFINITY", "s_stack": "INFINITY", "h_stack": "INFINITY",
        "s_core": "INFINITY", "h_core": "INFINITY", "s_rss": "INFINITY", "h_rss": "INFINITY",
        "s_vmem": "INFINITY", "h_vmem": "INFINITY",
    }
    q.update(extra or {})
    return "".join(f"{k:<20} {v}\n" for k, v in q.items())


def ckpt_config(name: str = "vmwrap", hooks: Path = HOOKS) -> str:
    """The checkpointing environment (sge_checkpoint(5), `qconf -Ackpt FILE`) that saves a job's VM.

    interface application-level: GE runs `migr_command` (as the job owner, like the methods) when it
    migrates the job and restarts the job script itself (restart_command is not used), which attaches
    to the VM the prolog restored. when: x = migrate when the job is suspended (qmod -sj, a
    subordinate queue, suspend_thresholds), s = when its execd shuts down, r = rescheduled when its
    host stays unknown longer than `reschedule_unknown` (sge_conf(5); what a job with the rerun flag
    gets without `-ckpt`); `qmod -rj` may reschedule it too. Nothing can be saved from a dead host: a
    job with periodic checkpoints (`#VMWRAP --checkpoint-every`, taken by vmwrap's node agent while
    the job runs) is restored from its last one, at most an interval of work done again; a job
    without one follows its --on-lost-checkpoint. GE's own periodic checkpoints (m: ckpt_command
    every min_cpu_interval) are not used: the job's payload keeps vmwrap's interval. The VM goes to
    vmwrap's checkpoint_dir, not ckpt_dir."""
    c = {
        "ckpt_name": name, "interface": "application-level", "ckpt_command": "none",
        "migr_command": f"{hooks / 'sge-method'} migrate $job_id $job_pid",
        "restart_command": "none", "clean_command": "none", "ckpt_dir": "/tmp", "signal": "none", "when": "xsr",
    }
    return "".join(f"{k:<20} {v}\n" for k, v in c.items())


def render_sge(queue: str = "vmwrap.q", hostlist: str = "@allhosts", slots: int = 0, ckpt: str = "vmwrap",
               hooks: Path = HOOKS) -> str:
    q = queue_config(queue, hostlist, slots or 1, hooks, extra={"ckpt_list": ckpt})
    keep = ("qname", "hostlist", "prolog", "epilog", "starter_method", "suspend_method", "resume_method",
            "terminate_method", "shell_start_mode", "ckpt_list")
    lines = [ln for ln in q.splitlines() if ln.split()[0] in keep]
    return "\n".join([
        "# vmwrap for Grid Engine (rendered by `vmwrap config render sge`)",
        f"# 1. Queue: `qconf -mq {queue}` (or -aq for a new one) and set:",
        *("   " + ln for ln in lines),
        "#    prolog/epilog run as root (root@); the methods run as the job owner and reach VMs through",
        "#    the node agent (`vmwrap agent`, root, one per node) - start it with the execd.",
        "# 2. Submit check: add this line to $SGE_ROOT/$SGE_CELL/common/sge_request (every qsub runs it",
        "#    as the submitter; it reads #VMWRAP lines in the script and `-ac vmwrap_image=NAME`):",
        f"   -jsv {hooks / 'sge-jsv'}",
        "# 3. Users: `#VMWRAP --image=NAME` in the script, or `qsub -ac vmwrap_image=NAME` (binary jobs).",
        f"# 4. Save/restore: this checkpointing environment (`qconf -Ackpt FILE`; `ckpt_list {ckpt}` above):",
        *("   " + ln for ln in ckpt_config(ckpt, hooks).splitlines()),
        "#    A VM job rescheduled by `qmod -rj` (needs `qsub -r y` or `rerun TRUE` on the queue) or migrated",
        f"#    (`qsub -ckpt {ckpt}`: suspending it moves it instead) is saved by the epilog into vmwrap's",
        "#    checkpoint_dir (shared by all hosts, with one checkpoint_key_file) and restored by the prolog",
        "#    wherever GE starts it next; a job that ends for good has its checkpoint deleted.",
        "#    Host crashes: jobs with `#VMWRAP --checkpoint-every=DURATION` are saved while they run; set",
        "#    reschedule_unknown (and a max_unheard you can wait for) with `qconf -mconf` and GE restarts a",
        "#    rerunnable job of a dead host elsewhere, restored from its last checkpoint.",
        "# 5. Cache-aware placement (optional): add this line to the complex list (`qconf -mc`):",
        f"   {CACHED_COMPLEX}",
        "#    and make every execution host an admin host (`qconf -ah HOST`). Each host's prestager",
        "#    (`vmwrap sge prestage --node HOST`) then sets its exechost complex_values",
        f"#    {CACHED}=+IMAGE+IMAGE+ to the images its cache holds, and the JSV gives every VM job",
        f"#    `-soft -l {CACHED}=*+IMAGE+*`: GE prefers a host that holds the job's image.",
        f"# (rendered on {socket.gethostname()})",
        "",
    ])
