"""One task of a step started from inside a vmwrap job's VM, as srun runs it on each of the job's nodes.

On the node of the batch script the job's payload serves the step (vmwrap.steps.task_main); on a
multi-node job's other nodes this node's VM of the job runs the command (vmwrap.steps.peer_task).
argv: SOCKET TOKEN JOB NODE CONFIG -- COMMAND... (NODE: the batch script's; CONFIG: the payload's
--config, '' for the default; `%n` in it is this node's name, as everywhere).
"""

from __future__ import annotations

import os
import sys

from vmwrap.steps import peer_task, task_main


def main(argv: list[str]) -> int:
    if len(argv) < 6 or argv[5] != "--":
        print("usage: python -m vmwrap_plugins.slurm.task SOCKET TOKEN JOB NODE CONFIG -- COMMAND...", file=sys.stderr)
        return 2
    sock, token, job, node, config, _, *command = argv
    if os.environ.get("SLURMD_NODENAME", node) == node:
        return task_main([sock, token])
    from vmwrap import config as config_mod

    return peer_task(config_mod.load(config or None), job, command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
