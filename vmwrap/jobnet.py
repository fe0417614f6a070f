"""A multi-node job's private network: one layer-2 segment per job, joining its VMs and nothing else.

Why this shape: the job's VMs must reach each other under the names the job expects (its nodes'),
across real hosts, and no other job, the hosts themselves or the outside may see that traffic.
Each node holding one of the job's VMs has a Linux bridge for the job (`bridge_name`) with no address
of the host's on it (IPv6 off too, so not even a link-local one): the host neither talks nor routes
there. QEMU joins it through libvirt (`<interface type='bridge'>`: libvirtd makes the tap as root,
QEMU runs as the job's user). Across hosts the bridges are joined by a VXLAN device (`vxlan_name`,
VNI from the job id, UDP 4789) with forwarding entries for the job's other hosts only; nodes that
share a host (Slurm's multiple-slurmd mode, the tests) share the bridge and need no tunnel.
Addresses are the same for every job (each has its own segment): node k of the job is
10.77.k/16 (`address`); the guest sets it on the card whose MAC is `mac(k)`.

VXLAN carries no authentication: the cluster network it runs on must not take UDP 4789 from users
(docs/multinode.md says how). Nothing here reads anything a user wrote: names come from the job id
(already validated) and addresses from the scheduler's node table, both checked again here.
"""

from __future__ import annotations

import fcntl
import hashlib
import ipaddress
import os
import re
import subprocess
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import NodeError, UserError, VmwrapError

IP = "/usr/sbin/ip"
BRIDGE = "/usr/sbin/bridge"
LOCK = Path("/run/vmwrap-jobnet.lock")  # host-wide: nodes sharing a host share a job's bridge
HOLDERS = Path("/run/vmwrap-jobnet")      # per bridge, the job's node indices whose VM is on this host
PORT = 4789
SUBNET = ipaddress.ip_network("10.77.0.0/16")
MAX_NODES = 254 * 256
_NODE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


def _digest(job_id: str) -> str:
    return hashlib.sha256(job_id.encode()).hexdigest()


def bridge_name(job_id: str) -> str:
    """The job's bridge on every host (15 characters at most, as the kernel allows)."""
    return "vmwj" + _digest(job_id)[:10]


def vxlan_name(job_id: str) -> str:
    return "vmwx" + _digest(job_id)[:10]


def vni(job_id: str) -> int:
    """The job's VXLAN network id: a numeric job id modulo 2^24 (two running jobs collide only if their
    ids are 16,777,215 apart), else from its digest."""
    n = int(job_id) if job_id.isdigit() else int(_digest(job_id)[:6], 16)
    return n % 0xFFFFFF + 1


def address(index: int) -> str:
    """Node `index`'s address on the job's network, with its prefix."""
    if not 0 <= index < MAX_NODES:
        raise UserError(f"a VM job spans at most {MAX_NODES} nodes")
    return f"10.77.{index // 254}.{index % 254 + 1}/16"


def check_nodes(job_id: str, nodes) -> None:
    """A job's node names as its guests get them. One vmwrap cannot use fails the job, never the node:
    a user may pick the hosts (PBS's `-l select=...:host=X`) of a cluster whose names a guest does not take."""
    if len(nodes) > MAX_NODES:
        raise UserError(f"a VM job spans at most {MAX_NODES} nodes")
    for n in nodes:
        if not _NODE.match(n):
            raise VmwrapError(f"job {job_id}: node name {n[:70]!r} is not a plain host name "
                              "(letters, digits, '.', '_', '-'; at most 63)")


def resolve(hosts: list[str], what: str) -> list[str]:
    """Each host's IPv4 address as this host resolves it (as the scheduler itself does), for the job
    network's tunnels; a host that does not resolve fails the job (`what`: whose host it is), not this host."""
    import socket

    out = []
    for h in hosts:
        try:
            out.append(socket.getaddrinfo(h, None, socket.AF_INET, socket.SOCK_STREAM)[0][4][0])
        except (OSError, IndexError, UnicodeError, ValueError):   # a label over 63 bytes: UnicodeError
            raise VmwrapError(f"cannot resolve host {h[:80]!r} of {what}") from None
    return out


def mac(index: int) -> str:
    """The job network card's MAC on node `index`: unique within the job, locally administered, apart
    from the NAT card's (52:54:00:..., domain.Spec.mac)."""
    return "52:54:01:" + ":".join(f"{b:02x}" for b in index.to_bytes(3, "big"))


@dataclass(frozen=True)
class Plan:
    """Where a job's VMs are: its nodes in order, their hosts' addresses, and this node's place.
    `peers_run_script`: every node runs the job's script (HTCondor's parallel universe), not only the
    first, whose steps reach the others (Slurm, Grid Engine, PBS)."""
    job_id: str
    nodes: tuple[str, ...]
    addrs: tuple[str, ...]   # each node's host address (the scheduler's NodeAddr)
    index: int
    peers_run_script: bool = False

    def __post_init__(self) -> None:
        if len(self.nodes) != len(self.addrs) or not 0 <= self.index < len(self.nodes):
            raise NodeError(f"job {self.job_id}: inconsistent node list for its network")
        check_nodes(self.job_id, self.nodes)
        for a in self.addrs:
            try:
                ipaddress.ip_address(a)
            except ValueError:
                raise VmwrapError(f"job {self.job_id}: node address {a[:70]!r} is not an IP address") from None

    @property
    def remote(self) -> list[str]:
        """The other hosts holding a VM of the job (unique, never this host's own address)."""
        me = self.addrs[self.index]
        return sorted({a for a in self.addrs if a != me})

    def guest_config(self) -> str:
        """What the guest reads (ctl/jobnet): its card's MAC and address, then one `ADDRESS NAME` per node."""
        lines = [f"{mac(self.index)} {address(self.index)}"]
        lines += [f"{address(i).split('/')[0]} {n}" for i, n in enumerate(self.nodes)]
        return "\n".join(lines) + "\n"


def _run(tool: str, *args: str) -> None:
    r = subprocess.run([tool, *args], capture_output=True, text=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"})
    if r.returncode != 0:
        raise NodeError(f"{os.path.basename(tool)} {' '.join(args)}: {r.stderr.strip()[-300:]}")


def _ip(*args: str) -> None:
    _run(IP, *args)


def _exists(name: str) -> bool:
    return os.path.lexists(f"/sys/class/net/{name}")


@contextmanager
def _locked():
    fd = os.open(LOCK, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _write(path: str, value: str) -> None:
    try:
        with open(path, "w") as f:
            f.write(value)
    except OSError:
        pass  # an option this kernel lacks (no br_netfilter, no IPv6): nothing to turn off


def _record(br: str) -> tuple[set[int], str]:
    """The bridge's holders (node indices) and its owner line ("JOB SITE": whose it is, for reconcile)."""
    try:
        first, _, rest = (HOLDERS / br).read_text().partition("\n")
    except OSError:
        return set(), ""
    return {int(w) for w in first.split() if w.isdigit() and len(w) <= 7}, rest.strip()


def _set_holders(br: str, held: set[int], owner: str = "") -> None:
    HOLDERS.mkdir(mode=0o700, exist_ok=True)
    f = HOLDERS / br
    if held:
        tmp = HOLDERS / f".{br}.tmp"
        tmp.write_text(" ".join(map(str, sorted(held))) + "\n" + (owner + "\n" if owner else ""))
        os.replace(tmp, f)
    else:
        f.unlink(missing_ok=True)


def join(plan: Plan, site: str = "") -> str:
    """Make the job's segment reach this host (idempotent); returns the bridge the VM joins. The node
    is recorded as a holder first: another node of the job on this host leaving (or a prolog clearing
    its own leftovers) never removes a bridge a VM is about to join. `site` (the site's jobs dir) is
    recorded with the job's id: reconcile finds the networks of its own ended jobs (`networks`)."""
    br, vx = bridge_name(plan.job_id), vxlan_name(plan.job_id)
    with _locked():
        held, owner = _record(br)
        _set_holders(br, held | {plan.index}, f"{plan.job_id} {site}" if site else owner)
        if not _exists(br):
            _ip("link", "add", br, "type", "bridge")
            # The host has no business on the segment: no IPv6 address, no bridged traffic to its firewall
            _write(f"/proc/sys/net/ipv6/conf/{br}/disable_ipv6", "1")
            for opt in ("nf_call_iptables", "nf_call_ip6tables", "nf_call_arptables"):
                _write(f"/sys/class/net/{br}/bridge/{opt}", "0")
            _ip("link", "set", br, "up")
        remote = plan.remote
        if remote and not _exists(vx):
            _ip("link", "add", vx, "type", "vxlan", "id", str(vni(plan.job_id)), "dstport", str(PORT),
                "local", plan.addrs[plan.index], "nolearning")
            _write(f"/proc/sys/net/ipv6/conf/{vx}/disable_ipv6", "1")
            for a in remote:  # flood and learn toward the job's hosts only
                _run(BRIDGE, "fdb", "append", "00:00:00:00:00:00", "dev", vx, "dst", a)
            _ip("link", "set", vx, "master", br)
            _ip("link", "set", vx, "up")
    return br


def leave(job_id: str, index: int) -> bool:
    """Node `index` of the job no longer has its VM on this host (its tap left with it): the segment
    goes once no node of the job here holds it and no VM's card is on it (idempotent)."""
    br = bridge_name(job_id)
    with _locked():
        held, owner = _record(br)
        held.discard(index)
        _set_holders(br, held, owner)
        if held:
            return False   # another node of this host still has (or is about to have) a VM on it
        return _remove(job_id)


def owners() -> list[tuple[str, str]]:
    """(job id, site) of every job network on this host whose record names them (none for a caller
    that may not read the records: they are root's)."""
    out = []
    try:
        with _locked():
            for br in sorted(p.name for p in HOLDERS.iterdir() if p.name.startswith("vmwj")):
                job_id, _, site = _record(br)[1].partition(" ")
                if job_id and site and bridge_name(job_id) == br:
                    out.append((job_id, site))
    except OSError:
        return []
    return out


def networks(site: str) -> list[str]:
    """The ids of the jobs whose network site `site` made on this host and which is still here, as
    their records say (reconcile asks the scheduler which of them ended)."""
    return [job_id for job_id, where in owners() if where == site]


def clear(job_id: str) -> bool:
    """The job ended everywhere (reconcile): no node of it here holds its segment any more, which goes
    unless a VM's card is still on it (idempotent)."""
    with _locked():
        _set_holders(bridge_name(job_id), set())
        return _remove(job_id)


def _remove(job_id: str) -> bool:
    """The bridge and tunnel, unless a VM's card is on the bridge (under the lock)."""
    br, vx = bridge_name(job_id), vxlan_name(job_id)
    if not _exists(br):
        return False
    try:
        ports = set(os.listdir(f"/sys/class/net/{br}/brif"))
    except OSError:
        ports = set()
    if ports - {vx}:
        return False
    if _exists(vx):
        _ip("link", "del", vx)
    _ip("link", "del", br)
    return True
