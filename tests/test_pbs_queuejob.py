"""The PBS queuejob hook against a `pbs` stand-in (harness/pbs_standin.py) that implements only the
documented API (PBS Hooks Guide: pbs.event(), e.job, e.requestor, e.accept(), e.reject(),
Variable_List, Resource_List); the rejection is what qsub shows (`qsub: <message>`, exit 32)."""

from __future__ import annotations

import functools

import pytest

from harness.pbs_standin import QUEUEJOB, QSUB_REJECT_STATUS, Event, Job, qsub
from vmwrap.catalog import Artifact, Image, register
from vmwrap.config import Settings
from vmwrap.resources import HOOKS
from vmwrap_plugins.pbs import queuejob

ART = Artifact("/x", "a" * 64, 1)


@pytest.fixture
def settings(tmp_path):
    for img in (Image("busybox", "kernel", ART, ART), Image("private", "kernel", ART, ART, users=["alice"])):
        register(str(tmp_path / "images.toml"), img)
    return Settings(catalog=str(tmp_path / "images.toml"), state_dir=str(tmp_path / "state"))


@pytest.mark.parametrize("variables, resources, message", [
    ({"VMWRAP_IMAGE": "nope"}, {}, "qsub: vmwrap: unknown image 'nope'"),
    ({}, {"vmwrap_image": "../../etc"}, "qsub: vmwrap: invalid image name '../../etc'"),
    ({"VMWRAP_IMAGE": "a'b"}, {}, "qsub: vmwrap: invalid image name"),
    ({"VMWRAP_IMAGE": "busybox"}, {"vmwrap_image": "other"},
     "qsub: vmwrap: -v VMWRAP_IMAGE=busybox but -l vmwrap_image=other"),
    ({"VMWRAP_IMAGE": "private"}, {}, "qsub: vmwrap: user 'vmwrapuser' may not use image 'private'"),
    ({"VMWRAP_IMAGE": "9" * 5000}, {}, "qsub: vmwrap: invalid image name"),
])
def test_queuejob_rejects_bad_native_requests(settings, variables, resources, message):
    rc, err = qsub(functools.partial(queuejob.check, settings), Event(QUEUEJOB, Job(variables, resources), "vmwrapuser"))
    assert rc == QSUB_REJECT_STATUS and err.startswith(message), err


def test_queuejob_rejects_an_interactive_vm_job_and_leaves_other_interactive_jobs_alone(settings):
    """qsub -I: the session would start on the node beside the VM."""
    check = functools.partial(queuejob.check, settings)
    rc, err = qsub(check, Event(QUEUEJOB, Job({}, {"vmwrap_image": "busybox"}, interactive=40123), "vmwrapuser"))
    assert rc == QSUB_REJECT_STATUS and err.startswith(
        "qsub: vmwrap: interactive jobs (qsub -I) cannot run in a VM under PBS yet: submit the work as a batch job"), err
    assert qsub(check, Event(QUEUEJOB, Job({}, {}, interactive=40123), "vmwrapuser")) == (0, "")
    assert qsub(check, Event(QUEUEJOB, Job({}, {"vmwrap_image": "busybox"}, interactive=0), "vmwrapuser")) == (0, "")


@pytest.mark.parametrize("resources", [{"select": "2:ncpus=1"}, {"select": "1:ncpus=2+1:ncpus=2"},
                                       {"select": "3:ncpus=1:mem=1gb", "place": "scatter"}, {"nodes": "2:ppn=1"},
                                       {"nodes": "host1+host2"}])
def test_queuejob_accepts_a_vm_job_over_several_chunks(settings, resources):
    """Several chunks are a multi-node VM job (a VM on each host they land on, mom.py): queued as asked."""
    job = Job({"VMWRAP_IMAGE": "busybox"}, resources)
    assert qsub(functools.partial(queuejob.check, settings), Event(QUEUEJOB, job, "vmwrapuser")) == (0, "")


@pytest.mark.parametrize("variables, resources", [({}, {}), ({"VMWRAP_IMAGE": "busybox"}, {}),
                                                  ({"A": "1"}, {"vmwrap_image": "busybox", "ncpus": "2"}),
                                                  ({}, {"vmwrap_image": "busybox", "select": "1:ncpus=4"}),
                                                  ({}, {"vmwrap_image": "busybox", "select": "ncpus=4:mem=2gb",
                                                        "place": "scatter"}),
                                                  ({"VMWRAP_IMAGE": "busybox"}, {"nodes": "1:ppn=4"}),
                                                  ({"VMWRAP_IMAGE": "busybox"}, {"nodes": "node01:ppn=2"})])
def test_queuejob_accepts_good_requests(settings, variables, resources):
    assert qsub(functools.partial(queuejob.check, settings),
                Event(QUEUEJOB, Job(variables, resources), "vmwrapuser")) == (0, "")


def test_the_hook_file_runs_in_a_server_python(settings, tmp_path, monkeypatch):
    """vmwrap/hooks/pbs-queuejob.py as `qmgr import hook` installs it: imports vmwrap itself."""
    from vmwrap import config

    monkeypatch.setattr(config, "load", lambda path=None, from_env=True: settings)
    rc, err = qsub(HOOKS / "pbs-queuejob.py", Event(QUEUEJOB, Job({"VMWRAP_IMAGE": "nope"}), "vmwrapuser"))
    assert rc == QSUB_REJECT_STATUS and err.startswith("qsub: vmwrap: unknown image 'nope'"), err
