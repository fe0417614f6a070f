"""One VM sizing rule (vmwrap/sizing.py): the node that boots a job's VM and the gap planner that must
fit its save into a gap size it alike, whichever of request, image and site decides."""

from __future__ import annotations

import pytest

from vmwrap import request, sizing, wire
from vmwrap.catalog import Artifact, Catalog, Image
from vmwrap.config import Settings
from vmwrap.job import Job
from vmwrap_plugins.slurm import hooks, planner

ART = Artifact("/x", "a" * 64, 1)
CATALOG = Catalog({"busybox": Image("busybox", "kernel", ART, ART),
                   "big": Image("big", "kernel", ART, ART, memory_mib=300, cpus=1)})
SETTINGS = Settings(default_memory_mib=128, default_cpus=1)


@pytest.mark.parametrize("accepted, mib, source", [
    (wire.Accepted("busybox", memory_mib=200), 200, "--memory=200M"),
    (wire.Accepted("big", memory_mib=150), 150, "--memory=150M"),
    (wire.Accepted("big"), 300, "image big's default memory of 300M"),
    (wire.Accepted("busybox"), 128, "the site's default VM memory of 128M"),
])
def test_the_launcher_and_the_planner_size_a_vm_alike(accepted, mib, source):
    assert sizing.memory_mib(accepted.memory_mib, CATALOG.images[accepted.image], SETTINGS) == (mib, source)
    job = Job("7", "slurm", "root", 0, 0, "/tmp", hooks._directives(accepted), image=accepted.image)
    assert request.resolve(job, SETTINGS, CATALOG).memory_mib == mib
    squeue = {"job_state": "PENDING", "comment": wire.encode(accepted), "partition": "p", "priority": 1}
    *_, queued = planner._queued(SETTINGS, CATALOG.images, {}, 0.0, squeue, 7)
    assert queued.mem_mb == mib


def test_a_plain_job_is_sized_by_the_site():
    squeue = {"job_state": "PENDING", "comment": "a note", "partition": "p", "priority": 1}
    assert planner._queued(SETTINGS, CATALOG.images, {}, 0.0, squeue, 8)[2].mem_mb == 128


def test_cpus_request_then_allocation_then_image_then_site():
    img = CATALOG.images["big"]
    assert sizing.cpus(3, 2, img, SETTINGS) == 3
    assert sizing.cpus(None, 2, img, SETTINGS) == 2
    assert sizing.cpus(None, None, img, SETTINGS) == 1
    assert sizing.cpus(None, None, None, Settings(default_cpus=2)) == 2
