"""Speed work on the engine must not change a schedule: per-job start and end times of one busy
workload, as digests taken before (adced28; the @haizea ones when they were added)."""

import hashlib

import pytest

from vmwrap.sim import CONFIGS, Cluster, simulate
from vmwrap.sim.workload import SKEWED, assign_images, synthetic

DIGESTS = {
    "novm": "a44f8c09da72881f",
    "novm+suspend": "4f404bc0e1094cdf",
    "novm+suspend@haizea": "62ee2c76eca47f92",
    "novm@haizea": "2e5d42067045d3b1",
    "novm-conservative": "31519e7e90cf7a22",
    "vm+noreuse": "8fa44e27c976f5a4",
    "vm+noreuse@haizea": "f3007a5d47bc9370",
    "vm+predeployed": "6a4a2cab2d6b34eb",
    "vm+predeployed-noplan": "c5abb8aaf00aeea1",
    "vm+predeployed@haizea": "b926f543e707a339",
    "vm+reuse-skewed": "71f6b383ba07094a",
    "vm+reuse-skewed@haizea": "0bb8953b12af559d",
    "vm+reuse-uniform": "71f6b383ba07094a",
    "vm+reuse-uniform@haizea": "0bb8953b12af559d",
    "vmwrap-skewed": "7c5c202287d4f906",
    "vmwrap-uniform": "7c5c202287d4f906",
    "vmwrap-slurm-skewed": "9930e75d9a607a01",
    "vmwrap-slurm-uniform": "9930e75d9a607a01",
}


@pytest.fixture(scope="module")
def workload():
    jobs, ars = synthetic(jobs=200, nodes=24, load=1.1, ar_share=0.2, ar_nodes=(3, 12), ar_hours=2,
                          mean_run_s=3600, seed=7)
    return assign_images(jobs, ars, SKEWED, 7)


@pytest.mark.parametrize("name", sorted(DIGESTS))
def test_schedule_is_unchanged(workload, name):
    jobs, ars = workload
    r = simulate(jobs, ars, CONFIGS[name], Cluster(nodes=24, cache_mb=8192, bandwidth_mb_s=20))
    assert hashlib.sha256(repr(sorted(r.records.items())).encode()).hexdigest()[:16] == DIGESTS[name]


def test_every_configuration_is_pinned():
    assert set(DIGESTS) == set(CONFIGS)
