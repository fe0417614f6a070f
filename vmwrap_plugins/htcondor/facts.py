"""What root asks the schedd, through the `htcondor2` bindings.

In process when vmwrap's Python has them (PyPI `htcondor` 25.x talks to 23.9 daemons); otherwise the
node's own HTCondor Python runs the same query (`python` below, e.g. the chrooted pool's
`chroot ROOT env -i CONDOR_CONFIG=... /usr/bin/python3`) and answers as JSON. Never the CLI's text.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Sequence

from vmwrap.errors import NodeError, UserError

# Attributes root reads from the schedd for a starting job.
JOB_ATTRS = ["ClusterId", "ProcId", "Owner", "JobStatus", "VmwrapImage", "RequestCpus", "RequestMemory",
             "NumJobStarts", "JobRunCount", "Iwd", "RemoteHost", "RemoteHosts", "JobUniverse", "CpusProvisioned",
             "MemoryProvisioned"]
ANSWER_MAX = 1 << 20
_QUERY = r"""
import json, sys, htcondor2 as h
constraint, proj = sys.argv[1], json.loads(sys.argv[2])
ads = h.Schedd().query(constraint=constraint, projection=proj)
def val(ad, k):
    v = ad.get(k)
    if v is not None and not isinstance(v, (str, int, float, bool)):
        try:
            v = ad.eval(k)  # e.g. request_memory's default is an expression
        except Exception:
            pass
    if type(v).__name__ == "Value":  # classad2's Undefined / Error
        v = None
    return v if isinstance(v, (str, int, float, bool)) or v is None else {"expr": str(v)}
print(json.dumps([{k: val(ad, k) for k in proj} for ad in ads]))
"""
JOB_ID = re.compile(r"^(\d{1,10})\.(\d{1,10})$")
NODE_ID = re.compile(r"^(\d{1,10}\.\d{1,10})(?:\.([1-9]\d{0,5}))?$")

# Idle VM jobs and the startds each could run (its Requirements and the machine's, both ways, against
# the machine's whole slot: a busy node is still where the job is likely to start next), in the order
# the negotiator serves them: submitters by user priority (lower first), then each one's JobPrio
# (higher first), then submission. `h` is htcondor2, in process or in the node's HTCondor Python.
IDLE_MAX = 2000         # idle VM jobs asked of the schedd per pass
_IDLE = r"""
def idle_vm_jobs(h, limit, budget):
    jobs = h.Schedd().query(constraint="JobStatus == 1 && VmwrapImage isnt undefined", limit=limit)
    try:
        prio = {str(a.get("Name")): a.get("Priority") for a in h.Negotiator().getPriorities()}
    except Exception:
        prio = {}
    machines, names = [], []
    for m in h.Collector().query(h.AdTypes.Startd, constraint="DynamicSlot =!= true"):
        if m.get("PartitionableSlot") is True:
            for r in str(m.get("MachineResources", "Cpus Memory Disk")).split():
                if ("TotalSlot" + r) in m:
                    m[r] = m["TotalSlot" + r]  # the slot as a whole, not what is left of it now
        name, machine = str(m.get("Name", "")), str(m.get("Machine", ""))
        ids = {name.split("@", i)[-1] for i in range(1, name.count("@") + 1)} or {name}
        ids |= {machine, machine.split(".")[0]}
        machines.append(m)
        names.append(sorted(ids - {""}))
    def num(ad, k):
        try:
            v = ad.eval(k)
        except Exception:
            return 0
        return v if isinstance(v, (int, float)) and not isinstance(v, bool) else 0
    rows = []
    for j in jobs:
        on = [i for i, m in enumerate(machines) if j.symmetricMatch(m)]
        if on:
            img = j.get("VmwrapImage")
            p = prio.get(str(j.get("User")))
            rows.append({"ClusterId": num(j, "ClusterId"), "ProcId": num(j, "ProcId"),
                         "VmwrapImage": img if isinstance(img, str) else None,
                         "order": [p if isinstance(p, (int, float)) else 0.5, -num(j, "JobPrio"),
                                   num(j, "QDate"), num(j, "ClusterId"), num(j, "ProcId")], "on": on})
    rows.sort(key=lambda r: r["order"])
    out, size = [], 0
    for r in rows:
        size += len(json.dumps(r)) + 2
        if size > budget:
            break
        del r["order"]
        out.append(r)
    used = sorted({i for r in out for i in r["on"]})
    return {"startds": {str(i): names[i] for i in used}, "jobs": out}
"""


def split_id(job: str) -> tuple[int, int]:
    """'CLUSTER.PROC' (vmwrap's job id for a condor job) as two numbers; UserError for anything else."""
    m = JOB_ID.fullmatch(job if isinstance(job, str) else "")
    if not m:
        raise UserError(f"not an HTCondor job id (CLUSTER.PROC): {str(job)[:40]!r}")
    return int(m.group(1)), int(m.group(2))


def split_node_id(job: str) -> tuple[str, int]:
    """vmwrap's id of one node's VM of a condor job: 'CLUSTER.PROC' for a vanilla job and a parallel
    job's node 0, 'CLUSTER.PROC.K' for its node K (each node has a run dir and a VM of its own, and two
    may share a host); ('CLUSTER.PROC', K). UserError for anything else."""
    m = NODE_ID.fullmatch(job if isinstance(job, str) else "")
    if not m:
        raise UserError(f"not an HTCondor job id (CLUSTER.PROC[.NODE]): {str(job)[:40]!r}")
    return m.group(1), int(m.group(2) or 0)


def node_job_id(job: str, node: int) -> str:
    return job if node == 0 else f"{job}.{node}"


class Schedd:
    def __init__(self, python: Sequence[str] | None = None, timeout: float = 30.0):
        self.python = list(python) if python else None
        self.timeout = timeout

    def query(self, constraint: str, projection: list[str]) -> list[dict]:
        if self.python is None:
            htcondor2 = _bindings()
            try:
                ads = htcondor2.Schedd().query(constraint=constraint, projection=projection)
            except Exception as e:  # noqa: BLE001 (the bindings raise their own kinds)
                raise NodeError(f"cannot query the schedd: {e}") from None
            return [{k: _plain(ad, k) for k in projection} for ad in ads]
        ads = self._run(_QUERY, constraint, json.dumps(projection))
        return ads if isinstance(ads, list) else []

    def job(self, cluster: int, proc: int) -> dict | None:
        found = self.query(f"ClusterId == {int(cluster)} && ProcId == {int(proc)}", JOB_ATTRS)
        return found[0] if found and isinstance(found[0], dict) else None

    def idle_vm_jobs(self) -> list[dict]:
        """Idle VM jobs, most likely to start first (see _IDLE), each with the names of the startds it
        could run on (`startds`: every suffix of a slot's Name after an '@', its Machine and Machine's
        short name). Values are as the schedd holds them, users' included: the caller checks them."""
        if self.python is None:
            htcondor2 = _bindings()
            ns: dict = {"json": json}
            exec(_IDLE, ns)  # noqa: S102 (our own constant source, shared with the subprocess path)
            try:
                answer = ns["idle_vm_jobs"](htcondor2, IDLE_MAX, ANSWER_MAX // 2)
            except Exception as e:  # noqa: BLE001 (the bindings raise their own kinds)
                raise NodeError(f"cannot query the schedd: {e}") from None
        else:
            code = ("import json, sys, htcondor2\n" + _IDLE +
                    "print(json.dumps(idle_vm_jobs(htcondor2, int(sys.argv[1]), int(sys.argv[2]))))\n")
            answer = self._run(code, str(IDLE_MAX), str(ANSWER_MAX // 2))
        if not isinstance(answer, dict) or not isinstance(answer.get("jobs"), list) \
                or not isinstance(answer.get("startds"), dict):
            raise NodeError("the schedd query answered no job list")
        names = answer["startds"]
        out = []
        for r in answer["jobs"]:
            if not isinstance(r, dict) or not isinstance(r.get("on"), list):
                continue
            on: set[str] = set()
            for i in r["on"]:
                v = names.get(str(i))
                on |= {n for n in v if isinstance(n, str)} if isinstance(v, list) else set()
            out.append({"ClusterId": r.get("ClusterId"), "ProcId": r.get("ProcId"),
                        "VmwrapImage": r.get("VmwrapImage"), "startds": sorted(on)})
        return out

    def _run(self, code: str, *args: str):
        """`code` in the node's HTCondor Python; its JSON answer (at most ANSWER_MAX bytes)."""
        try:
            r = subprocess.run([*self.python, "-I", "-c", code, *args],
                               capture_output=True, timeout=self.timeout, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NodeError(f"cannot query the schedd: {e}") from None
        if r.returncode != 0 or len(r.stdout) > ANSWER_MAX:
            raise NodeError(f"cannot query the schedd: {r.stderr[-500:].decode(errors='replace')}")
        try:
            return json.loads(r.stdout)
        except ValueError:
            raise NodeError("the schedd query answered no JSON") from None

    def job_ids(self) -> set[str]:
        """CLUSTER.PROC of every job the schedd may still run (not removed, not completed)."""
        found = self.query("JobStatus =!= 3 && JobStatus =!= 4", ["ClusterId", "ProcId"])
        return {f"{a['ClusterId']}.{a['ProcId']}" for a in found
                if isinstance(a, dict) and isinstance(a.get("ClusterId"), int) and isinstance(a.get("ProcId"), int)}


def _bindings():
    try:
        import htcondor2
    except ImportError:
        raise NodeError("the htcondor2 bindings are not installed for vmwrap "
                        "(pip install htcondor, or give the node's HTCondor python)") from None
    return htcondor2


def _plain(ad, k: str):
    """An attribute's value; an expression evaluated in its ad; {"expr": text} if still not plain."""
    v = ad.get(k)
    if v is not None and not isinstance(v, (str, int, float, bool)):
        try:
            v = ad.eval(k)
        except Exception:  # noqa: BLE001 (the bindings' own error kinds)
            pass
    if type(v).__name__ == "Value":  # classad2's Undefined / Error
        v = None
    return v if isinstance(v, (str, int, float, bool)) or v is None else {"expr": str(v)}
