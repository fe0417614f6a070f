"""`vmwrap config render pbs`: the qmgr commands that install vmwrap's PBS hooks (run on the server
host as a PBS manager; the server sends mom hooks to every mom). Hook attributes from
pbs_hook_attributes(7B) (OpenPBS doc/man1): event, order (site hooks 1..1000, lower runs first),
alarm (seconds), user (pbsadmin: root on the mom), fail_action (offline_vnodes only for
execjob_begin/execjob_prologue/exechost_startup hooks, hence a hook of its own for execjob_begin)."""

from __future__ import annotations

import json
import shlex

from vmwrap.config import Settings
from vmwrap.resources import HOOKS

BEGIN_EVENTS = "execjob_begin"
MOM_EVENTS = "execjob_launch,execjob_preterm,execjob_end,execjob_abort,execjob_postsuspend,execjob_preresume"
ORDER = 900           # after site hooks that set up the job's node (e.g. the cgroups hook, order 100)
BEGIN_ALARM = 900     # s: fetching an image into the node cache, then booting the VM
MOM_ALARM = 300       # s: destroying a VM, pausing it
ACTION_TIMEOUT = 900  # s: pbs_mom kills a checkpoint action after this (saving a VM's memory)


def render_pbs(settings: Settings, node_config: str | None = None) -> str:
    def q(cmd: str) -> str:
        return f"qmgr -c {shlex.quote(cmd)}"

    body = HOOKS / "pbs-mom.py"
    lines = ["# vmwrap for PBS Professional / OpenPBS (rendered by `vmwrap config render pbs`; docs/pbs.md",
             "# says which source each setting comes from). Run on the server host as a PBS manager.",
             "# Server: check VM requests at qsub (qsub -v VMWRAP_IMAGE=NAME or -l vmwrap_image=NAME).",
             q("create resource vmwrap_image type=string"),
             q("create hook vmwrap_queuejob event=queuejob"),
             q(f"import hook vmwrap_queuejob application/x-python default {HOOKS / 'pbs-queuejob.py'}"),
             "# Moms: boot the job's VM (execjob_begin; a hook error offlines the vnode), run the job in it",
             "# (execjob_launch), pause/resume it with qsig, destroy it (execjob_end, execjob_abort).",
             q(f"create hook vmwrap_begin event={BEGIN_EVENTS}"),
             q(f"set hook vmwrap_begin order={ORDER}"),
             q(f"set hook vmwrap_begin alarm={BEGIN_ALARM}"),
             q("set hook vmwrap_begin user=pbsadmin"),
             q("set hook vmwrap_begin fail_action=offline_vnodes"),
             q(f"import hook vmwrap_begin application/x-python default {body}"),
             q(f'create hook vmwrap_mom event="{MOM_EVENTS}"'),
             q(f"set hook vmwrap_mom order={ORDER}"),
             q(f"set hook vmwrap_mom alarm={MOM_ALARM}"),
             q("set hook vmwrap_mom user=pbsadmin"),
             q(f"import hook vmwrap_mom application/x-python default {body}")]
    if node_config:
        cfg = "/etc/vmwrap/pbs-hook.json"
        content = shlex.quote(json.dumps({"config": node_config}))
        lines += ["# The moms' vmwrap settings file, named in each mom hook's configuration file:",
                  f"mkdir -p /etc/vmwrap && printf '%s\\n' {content} > {cfg}",
                  q(f"import hook vmwrap_begin application/x-config default {cfg}"),
                  q(f"import hook vmwrap_mom application/x-config default {cfg}")]
    action = f"!{HOOKS / 'pbs-action'}" + (f" --config {node_config}" if node_config else "")
    args = "%jobid %uid %gid %path"
    lines += ["# Every mom: PBS_HOME/mom_priv/config lines (then kill -HUP pbs_mom). qhold of a running VM job",
              "# saves its VM into vmwrap's checkpoint store (checkpoint_abort); qrls restores it (restart,",
              "# which becomes the job: restart_transmogrify). A periodic checkpoint is refused (it would stop",
              "# the VM). Restarting on another mom needs the checkpoint store and checkpoint_path shared.",
              f"$action checkpoint_abort {ACTION_TIMEOUT} {action} checkpoint_abort {args}",
              f"$action checkpoint {ACTION_TIMEOUT} {action} checkpoint {args}",
              f"$action restart {ACTION_TIMEOUT} {action} restart {args}",
              "$restart_transmogrify true",
              "# $checkpoint_path /shared/pbs/checkpoint   # shared by every mom: restart elsewhere"]
    lines += ["# One host that sees the checkpoint store and can reach the server (root, a service): deletes",
              "# the checkpoints of rerun jobs deleted while queued (no mom hook runs for them).",
              f"#   vmwrap{' --config ' + shlex.quote(node_config) if node_config else ''} pbs gc --qstat /opt/pbs/bin/qstat"]
    lines += [q("set hook vmwrap_begin enabled=true"), q("set hook vmwrap_mom enabled=true"),
              q("set hook vmwrap_queuejob enabled=true"),
              "# Check: qmgr -c 'list hook vmwrap_begin'; mom hooks reach the moms a moment after import."]
    return "\n".join(lines) + "\n"
