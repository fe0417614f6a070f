"""HTCondor configuration that enables vmwrap: the submit side (schedd: a job transform and submit
requirements reading `+VmwrapImage = "NAME"`) and the execute side (startd: USER_JOB_WRAPPER and
what it advertises). Printed by `vmwrap config render condor`. No inline comments: HTCondor takes a
`#` after a value as part of it.
"""

from __future__ import annotations

import grp
import re

from vmwrap.catalog import Catalog
from vmwrap.config import Settings
from vmwrap.directives import IMAGE_NAME

from .hooks import wrapper_path

SOCKET = "/run/vmwrap/condor.sock"


def _classad_str(s: str) -> str:
    """A ClassAd string literal of a catalog-checked name (letters, digits, '.', '_', '-')."""
    if not re.fullmatch(r"[A-Za-z0-9_.*-]{1,64}", s):
        raise ValueError(f"cannot render {s!r} into the HTCondor configuration")
    return f'"{s}"'


def _users_of(groups: list[str]) -> list[str]:
    out = []
    for g in groups:
        try:
            out += grp.getgrnam(g).gr_mem
        except KeyError:
            pass
    return out


CACHED_RANK = 1000
TRUSTED_ATTRS = ("RemoteHost", "RemoteHosts", "CpusProvisioned", "MemoryProvisioned")

# JobUniverse values other than vanilla (5) that condor_submit writes (condor_universe.h; seen with
# condor_submit -dump on 23.9). docker and container jobs are vanilla (5) with WantDocker / WantContainer.
UNIVERSES = {7: "scheduler", 9: "grid", 10: "java", 11: "parallel", 12: "local", 13: "vm"}
VANILLA_HINT = ("submit it in the vanilla universe (universe = vanilla; request_cpus = N for N CPUs on one node) "
                "or, for several nodes, the parallel universe (universe = parallel; machine_count = N)")


def _classad_text(s: str) -> str:
    """A ClassAd string literal of vmwrap's own text."""
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _strcat(template: str, **parts: str) -> str:
    """A ClassAd strcat() of `template` (vmwrap's text) with each {NAME} replaced by the expression parts[NAME]."""
    out, rest = [], template
    while "{" in rest:
        head, _, tail = rest.partition("{")
        name, _, rest = tail.partition("}")
        out += [_classad_text(head), parts[name]]
    out.append(_classad_text(rest))
    return "strcat(" + ", ".join(out) + ")"


def universe_requirements() -> list[str]:
    """A VM job runs in the vanilla universe (one VM) or the parallel universe (one VM per node, joined
    by the job's network); one in any other universe (vm, docker, container, grid, scheduler, local,
    java) is refused with the universe it named."""
    name = "strcat(\"#\", string(JobUniverse))"
    for number, uni in sorted(UNIVERSES.items(), reverse=True):
        name = f'ifThenElse(JobUniverse == {number}, "{uni}", {name})'
    name = f'ifThenElse(WantContainer =?= true, "container", {name})'
    name = f'ifThenElse(WantDocker =?= true, "docker", {name})'
    return [
        # condor_submit -interactive: the session (condor_ssh_to_job) would start beside the VM, not in it.
        "SUBMIT_REQUIREMENT_VmwrapInteractive = VmwrapImage is undefined || InteractiveJob =!= true",
        'SUBMIT_REQUIREMENT_VmwrapInteractive_REASON = "vmwrap: interactive jobs (condor_submit -interactive) '
        'cannot run in a VM under HTCondor yet: submit the work as a batch job; condor_ssh_to_job does not '
        'enter its VM, vmwrap shell JOBID on its execute node does"',
        "SUBMIT_REQUIREMENT_VmwrapUniverse = VmwrapImage is undefined || "
        "((JobUniverse == 5 || JobUniverse == 11) && WantDocker =!= true && WantContainer =!= true)",
        "SUBMIT_REQUIREMENT_VmwrapUniverse_REASON = " + _strcat(
            "vmwrap: +VmwrapImage needs the vanilla or parallel universe (this job: universe = {name}): the VM is the job's "
            "whole environment; " + VANILLA_HINT, name=name),
    ]


def rank_expr(weight: float = CACHED_RANK) -> str:
    """The VM job's Rank: the user's own (0 when it is not a number for this machine) plus `weight`
    on a machine whose VmwrapCachedImages names the job's image."""
    return ("ifThenElse(isReal(real(VmwrapUserRank)), real(VmwrapUserRank), 0.0) + "
            f"ifThenElse(stringListMember(VmwrapImage, TARGET.VmwrapCachedImages, \"+\") =?= true, {float(weight)!r}, 0.0)")


def submit_side(settings: Settings, cached_rank: float = CACHED_RANK) -> str:
    """Schedd lines: bad requests are refused at condor_submit with `vmwrap: <reason>`."""
    cat = Catalog.load(settings.catalog)
    names = sorted(cat.images)
    pattern = IMAGE_NAME.pattern.lstrip("^").rstrip("$")
    known = "{" + ", ".join(_classad_str(n) for n in names) + "}"
    lines = [
        # What the node's bridge believes of a running job's ad, set by the schedd and the shadow: its
        # owner may not condor_qedit or chirp them (only queue superusers, qmgmt.cpp SetAttribute).
        # JobUniverse, Owner, ClusterId and ProcId are immutable already (SYSTEM_IMMUTABLE_JOB_ATTRS).
        "PROTECTED_JOB_ATTRS = $(PROTECTED_JOB_ATTRS) " + " ".join(TRUSTED_ATTRS),
        "JOB_TRANSFORM_NAMES = $(JOB_TRANSFORM_NAMES) VmwrapHold Vmwrap",
        # Every vanilla job: one whose executable says `#VMWRAP --image=NAME` is known as a VM job only
        # on its node (the schedd never reads the executable), where a bad request must still hold it.
        # The wrapper reports through chirp: VmwrapHoldReason (the job's fault: hold it with that
        # reason) or VmwrapRequeue (the node's fault: back to idle). The user's own on_exit_hold,
        # on_exit_hold_reason and on_exit_remove still apply, kept under Vmwrap* names.
        "JOB_TRANSFORM_VmwrapHold @=end",
        "REQUIREMENTS JobUniverse == 5 || JobUniverse == 11",
        "SET WantIOProxy true",
        "COPY OnExitHold VmwrapUserOnExitHold",
        "COPY OnExitHoldReason VmwrapUserOnExitHoldReason",
        "COPY OnExitRemove VmwrapUserOnExitRemove",
        "SET OnExitHold (VmwrapHoldReason isnt undefined) || (VmwrapUserOnExitHold =?= true)",
        "SET OnExitHoldReason ifThenElse(VmwrapHoldReason isnt undefined, VmwrapHoldReason, VmwrapUserOnExitHoldReason)",
        "SET OnExitRemove (VmwrapRequeue is undefined) && (VmwrapUserOnExitRemove isnt false)",
        "@end",
        # +VmwrapImage jobs: only nodes that run vmwrap and have no fault; among them, nodes whose
        # cache holds the image first (their VmwrapCachedImages, from the prestager), on top of the
        # user's own rank.
        "JOB_TRANSFORM_Vmwrap @=end",
        "REQUIREMENTS VmwrapImage isnt undefined",
        "SET Requirements ($(MY.Requirements)) && (TARGET.HasVmwrap =?= true) && (TARGET.VmwrapFault is undefined)",
        "SET VmwrapRequested true",
        "COPY Rank VmwrapUserRank",
        f"SET Rank {rank_expr(cached_rank)}",
        "@end",
        "SUBMIT_REQUIREMENT_NAMES = $(SUBMIT_REQUIREMENT_NAMES) VmwrapType VmwrapName VmwrapKnown VmwrapAllowed "
        "VmwrapUniverse VmwrapInteractive",
        "SUBMIT_REQUIREMENT_VmwrapType = VmwrapImage is undefined || isString(VmwrapImage)",
        'SUBMIT_REQUIREMENT_VmwrapType_REASON = "vmwrap: +VmwrapImage must be a quoted image name, e.g. +VmwrapImage = \\"debian\\""',
        f'SUBMIT_REQUIREMENT_VmwrapName = VmwrapImage is undefined || regexp("^{pattern}$", VmwrapImage)',
        "SUBMIT_REQUIREMENT_VmwrapName_REASON = strcat(\"vmwrap: invalid image name \", unparse(VmwrapImage), "
        "\": use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit (no paths, quotes, spaces or markup)\")",
        f"SUBMIT_REQUIREMENT_VmwrapKnown = VmwrapImage is undefined || member(VmwrapImage, {known})",
        f"SUBMIT_REQUIREMENT_VmwrapKnown_REASON = strcat(\"vmwrap: unknown image \", unparse(VmwrapImage), "
        f"\" (this site offers: {', '.join(cat.offered()) or 'none'})\")",
    ]
    allowed = []
    for n in names:
        img = cat.images[n]
        if not img.users and not img.groups or "*" in img.users:
            allowed.append(f"VmwrapImage == {_classad_str(n)}")
        else:
            who = sorted(set(img.users) | set(_users_of(img.groups)))
            allowed.append(f"(VmwrapImage == {_classad_str(n)} && member(Owner, "
                           "{" + ", ".join(_classad_str(u) for u in who) + "}))")
    lines += [
        "SUBMIT_REQUIREMENT_VmwrapAllowed = VmwrapImage is undefined || " + (" || ".join(allowed) or "false"),
        "SUBMIT_REQUIREMENT_VmwrapAllowed_REASON = strcat(\"vmwrap: user \", Owner, \" may not use image \", "
        "VmwrapImage, \" (ask your admin to be added)\")",
        *universe_requirements(),
    ]
    return "\n".join(lines)


def execute_side(socket: str = SOCKET, wrapper: str | None = None, probe_period: int = 30) -> str:
    """Startd lines: every job goes through the wrapper (a job without VmwrapImage runs as usual);
    the node advertises vmwrap so that the transform's Requirements match it, and a node fault
    (VmwrapFault, published by the wrapper's STARTD_CRON probe) keeps VM jobs off it, START included
    (a claim the schedd reuses is not matched again). The same probe publishes VmwrapCachedImages
    (what `vmwrap condor prestage` found in the node's cache), which the transform's Rank reads."""
    w = wrapper or str(wrapper_path())
    return "\n".join([
        f"USER_JOB_WRAPPER = {w}",
        f"VMWRAP_BRIDGE_SOCKET = {socket}",
        "HasVmwrap = true",
        "STARTD_ATTRS = $(STARTD_ATTRS) HasVmwrap",
        "MOUNT_UNDER_SCRATCH =",
        "STARTD_CRON_JOBLIST = $(STARTD_CRON_JOBLIST) VMWRAP",
        f"STARTD_CRON_VMWRAP_EXECUTABLE = {w}",
        "STARTD_CRON_VMWRAP_ARGS = --fault-ad" + ("" if socket == SOCKET else f" --socket {socket}"),
        f"STARTD_CRON_VMWRAP_PERIOD = {int(probe_period)}s",
        "STARTD_CRON_VMWRAP_MODE = Periodic",
        "START = ($(START)) && ((TARGET.VmwrapImage is undefined) || (MY.VmwrapFault is undefined))",
    ])


def render_condor(settings: Settings, socket: str = SOCKET, wrapper: str | None = None) -> str:
    # A node fault stays until the admin removes the bridge's fault file (SOCKET.fault).
    return "\n".join([
        "# vmwrap for HTCondor (docs/condor.md). Submit side: the schedd's configuration.",
        submit_side(settings),
        "",
        "# Execute side: each startd's configuration. Run the bridge as root on the host:",
        f"#   vmwrap condor bridge --socket {socket}",
        "# and make the socket reachable at that path for the starter (bind it into a chroot).",
        "# For cache-aware placement run the prestager as root too; it writes the images the node's cache",
        f"# holds to {socket}.cached, which the probe below publishes as VmwrapCachedImages:",
        f"#   vmwrap condor prestage --socket {socket}",
        f"# A node fault is kept in {socket}.fault until you remove it (the startd then matches VM jobs again).",
        "# Parallel-universe VM jobs (one VM per node, joined by the job's network) need HTCondor's own",
        "# dedicated scheduling on these startds, e.g.:",
        '#   DedicatedScheduler = "DedicatedScheduler@<the schedd\'s Name>"',
        "#   STARTD_ATTRS = $(STARTD_ATTRS) DedicatedScheduler",
        execute_side(socket, wrapper),
    ]) + "\n"
