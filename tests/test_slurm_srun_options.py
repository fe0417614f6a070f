"""The guest's srun argv as a host srun command (vmwrap_plugins/slurm/steps.py): what passes, what is
refused. The guest is hostile; srun itself keeps a step inside its job's allocation."""

import pytest

from vmwrap.errors import UserError
from vmwrap_plugins.slurm.steps import SRUN, srun_command

TASK = ["python", "-m", "task"]


def test_a_multi_node_step_and_openmpis_daemon_launch_pass():
    argv = ["--ntasks-per-node=1", "--kill-on-bad-exit", "--cpu_bind=none", "--nodes=1", "--nodelist=c2",
            "--ntasks=1", "orted", "-mca", "ess", "slurm"]
    index, host = srun_command(argv, TASK)
    assert argv[index:] == ["orted", "-mca", "ess", "slurm"]
    assert host == [SRUN, "--ntasks-per-node=1", "--kill-on-bad-exit", "--cpu-bind=none", "--nodes=1",
                    "--nodelist=c2", "--ntasks=1", "--job-name=orted", "--", *TASK]
    assert srun_command(["-N", "2", "-w", "c[1-2]", "--mpi=none", "hostname"], TASK)[1][1:4] == \
        ["--nodes=2", "--nodelist=c[1-2]", "--mpi=none"]


@pytest.mark.parametrize("argv, why", [
    (["-w", "/etc/hosts", "x"], "invalid value '/etc/hosts' for --nodelist"),
    (["--nodelist=-x", "x"], "invalid value '-x' for --nodelist"),
    (["--mpi=pmix", "x"], "invalid value 'pmix' for --mpi"),
    (["--cpu-bind=map_cpu:0;reboot", "x"], "for --cpu-bind"),
    (["-N", "0", "x"], "invalid value '0' for --nodes"),
    (["--nodefile=/etc/passwd", "x"], "srun option '--nodefile=/etc/passwd' is not supported"),
])
def test_what_names_files_or_bad_values_is_refused(argv, why):
    with pytest.raises(UserError, match=why.replace("[", r"\[")):
        srun_command(argv, TASK)
