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
             "NumJobStarts", "JobRunCount", "Iwd", "RemoteHost", "JobUniverse", "CpusProvisioned",
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


def split_id(job: str) -> tuple[int, int]:
    """'CLUSTER.PROC' (vmwrap's job id for a condor job) as two numbers; UserError for anything else."""
    m = JOB_ID.fullmatch(job if isinstance(job, str) else "")
    if not m:
        raise UserError(f"not an HTCondor job id (CLUSTER.PROC): {str(job)[:40]!r}")
    return int(m.group(1)), int(m.group(2))


class Schedd:
    def __init__(self, python: Sequence[str] | None = None, timeout: float = 30.0):
        self.python = list(python) if python else None
        self.timeout = timeout

    def query(self, constraint: str, projection: list[str]) -> list[dict]:
        if self.python is None:
            try:
                import htcondor2
            except ImportError:
                raise NodeError("the htcondor2 bindings are not installed for vmwrap "
                                "(pip install htcondor, or give the node's HTCondor python)") from None
            try:
                ads = htcondor2.Schedd().query(constraint=constraint, projection=projection)
            except Exception as e:  # noqa: BLE001 (the bindings raise their own kinds)
                raise NodeError(f"cannot query the schedd: {e}") from None
            return [{k: _plain(ad, k) for k in projection} for ad in ads]
        try:
            r = subprocess.run([*self.python, "-I", "-c", _QUERY, constraint, json.dumps(projection)],
                               capture_output=True, timeout=self.timeout, cwd="/")
        except (OSError, subprocess.TimeoutExpired) as e:
            raise NodeError(f"cannot query the schedd: {e}") from None
        if r.returncode != 0 or len(r.stdout) > ANSWER_MAX:
            raise NodeError(f"cannot query the schedd: {r.stderr[-500:].decode(errors='replace')}")
        try:
            ads = json.loads(r.stdout)
        except ValueError:
            raise NodeError("the schedd query answered no JSON") from None
        return ads if isinstance(ads, list) else []

    def job(self, cluster: int, proc: int) -> dict | None:
        found = self.query(f"ClusterId == {int(cluster)} && ProcId == {int(proc)}", JOB_ATTRS)
        return found[0] if found and isinstance(found[0], dict) else None

    def job_ids(self) -> set[str]:
        """CLUSTER.PROC of every job the schedd may still run (not removed, not completed)."""
        found = self.query("JobStatus =!= 3 && JobStatus =!= 4", ["ClusterId", "ProcId"])
        return {f"{a['ClusterId']}.{a['ProcId']}" for a in found
                if isinstance(a, dict) and isinstance(a.get("ClusterId"), int) and isinstance(a.get("ProcId"), int)}


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
