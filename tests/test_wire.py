"""The accepted request's wire format (vmwrap/wire.py): what job_submit.lua writes into a Slurm comment
and Grid Engine's JSV into a job context, read back by root hooks, the planner and the prestager."""

from __future__ import annotations

import pytest

from vmwrap import wire
from vmwrap.directives import MAX_CPUS, MAX_MEMORY_MIB
from vmwrap.errors import UserError

HUGE = "9" * 5000


@pytest.mark.parametrize("accepted", [
    wire.Accepted("busybox"),
    wire.Accepted("a.b_c-1", memory_mib=300, cpus=2, on_lost_checkpoint="restart"),
    wire.Accepted("x" * 64, memory_mib=MAX_MEMORY_MIB, cpus=MAX_CPUS, on_lost_checkpoint="fail"),
    wire.Accepted("9", memory_mib=1, cpus=1),
])
def test_round_trip(accepted):
    text = wire.encode(accepted)
    assert text.startswith(wire.PREFIX)
    assert wire.decode(text) == accepted
    assert wire.decode(text + wire.USER_SEPARATOR + "the user's own | note\nwith vmwrap:image=evil") == accepted


def test_the_lua_format_writes_what_encode_writes():
    a = wire.Accepted("busybox", memory_mib=300, cpus=None, on_lost_checkpoint="fail")
    values = {"image": a.image, "memory": a.memory_mib, "cpus": a.cpus, "lost": a.on_lost_checkpoint}
    assert wire.lua_format() % tuple(values[f] or "" for f in wire.FIELDS) == wire.encode(a)


def test_what_is_not_a_request_is_a_plain_job():
    for comment in (None, "", "a note", " vmwrap:image=busybox,memory=,cpus=,lost=", "VMWRAP:image=x"):
        assert wire.decode(comment) is None


@pytest.mark.parametrize("comment, reason", [
    ("vmwrap:", "1 comma-separated fields where 4 belong"),
    ("vmwrap:image=busybox,memory=,cpus=", "3 comma-separated fields where 4 belong"),
    ("vmwrap:image=busybox,memory=,cpus=,lost=,extra=1", "5 comma-separated fields where 4 belong"),
    ("vmwrap:image=busybox,cpus=,memory=,lost=", "'cpus=' where memory=... belongs"),
    ("vmwrap:image=busybox,memory,cpus=,lost=", "'memory' where memory=... belongs"),
    ("vmwrap:image=../../etc,memory=,cpus=,lost=", "image='../../etc' is not an image name"),
    ("vmwrap:image=busybox\n,memory=,cpus=,lost=", "image='busybox\\n' is not an image name"),
    ("vmwrap:image=,memory=,cpus=,lost=", "image='' is not an image name"),
    ("vmwrap:image=" + "x" * 65 + ",memory=,cpus=,lost=", "is not an image name"),
    ("vmwrap:image=busybox,memory=0,cpus=,lost=", f"memory='0' is not a whole number from 1 to {MAX_MEMORY_MIB}"),
    ("vmwrap:image=busybox,memory=-1,cpus=,lost=", "memory='-1' is not a whole number"),
    ("vmwrap:image=busybox,memory=1e3,cpus=,lost=", "memory='1e3' is not a whole number"),
    ("vmwrap:image=busybox,memory=\u0663,cpus=,lost=", "is not a whole number"),     # an Arabic-Indic 3
    ("vmwrap:image=busybox,memory=99999999,cpus=,lost=", f"from 1 to {MAX_MEMORY_MIB}"),
    (f"vmwrap:image=busybox,memory={HUGE},cpus=,lost=", "... (5000 characters) is not a whole number"),
    ("vmwrap:image=busybox,memory=,cpus=0,lost=", f"cpus='0' is not a whole number from 1 to {MAX_CPUS}"),
    ("vmwrap:image=busybox,memory=,cpus=40960,lost=", "cpus='40960' is not a whole number"),
    (f"vmwrap:image=busybox,memory=,cpus={HUGE},lost=", "cpus='999"),
    ("vmwrap:image=busybox,memory=,cpus=,lost=maybe", "lost='maybe' is not restart or fail"),
    ("vmwrap:image=busybox,memory=,cpus=,lost=restart|x", "lost='restart|x' is not restart or fail"),
])
def test_hostile_values_are_refused_naming_what_is_wrong(comment, reason):
    with pytest.raises(wire.WireError) as e:
        wire.decode(comment)
    msg = str(e.value)
    assert "not a VM request vmwrap wrote" in msg and reason in msg, msg
    assert len(msg) < 400  # a huge comment is clipped, not echoed
    assert isinstance(e.value, UserError)  # the job fails; the node is not at fault


@pytest.mark.parametrize("accepted, reason", [
    (wire.Accepted("a,b"), "is not an image name"),
    (wire.Accepted("busybox", memory_mib=0), f"memory=0 is not a whole number from 1 to {MAX_MEMORY_MIB}"),
    (wire.Accepted("busybox", memory_mib="300"), "memory='300' is not a whole number"),
    (wire.Accepted("busybox", cpus=MAX_CPUS + 1), f"cpus={MAX_CPUS + 1} is not a whole number"),
    (wire.Accepted("busybox", on_lost_checkpoint="later"), "lost='later' is not restart or fail"),
    (wire.Accepted("busybox | x"), "is not an image name"),
])
def test_encode_refuses_what_decode_would_refuse(accepted, reason):
    with pytest.raises(wire.WireError, match="cannot carry") as e:
        wire.encode(accepted)
    assert reason in str(e.value)


def test_grid_engine_context():
    assert wire.encode_context("busybox") == "vmwrap_image=busybox"
    assert wire.decode_context(["A=b", " vmwrap_image = busybox ", "vmwrap_image=busybox"]) == "busybox"
    assert wire.decode_context(["A=b"]) is None
    with pytest.raises(UserError, match="more than one vmwrap_image"):
        wire.decode_context(["vmwrap_image=a", "vmwrap_image=b"])
    with pytest.raises(UserError, match="invalid image name"):
        wire.decode_context(["vmwrap_image=../x"])
    with pytest.raises(UserError, match="invalid image name"):
        wire.encode_context("a,b")
