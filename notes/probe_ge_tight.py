"""Probe (not for the repo): what a slave host sees of a tight-integration pe task on GE 8.1.9 here."""
import os
import subprocess
import time

from harness.polling import jobdir, wait_for
from harness.sge_cell import EXECD_SPOOL, HOST2, qconf
from harness.sge_jobs import module_cell

PE = ("pe_name rr\nslots 8\nuser_lists NONE\nxuser_lists NONE\nstart_proc_args NONE\nstop_proc_args NONE\n"
      "allocation_rule $round_robin\ncontrol_slaves TRUE\njob_is_first_task TRUE\nurgency_slots min\n"
      "accounting_summary FALSE\nqsort_args NONE\n")

SCRIPT = r"""#!/bin/sh
echo "master: $(hostname) JOB_ID=$JOB_ID SGE_TASK_ID=$SGE_TASK_ID PE_HOSTFILE=$PE_HOSTFILE NSLOTS=$NSLOTS"
cat "$PE_HOSTFILE"
grep Groups /proc/self/status
other=$(awk -v h="$(hostname)" '$1!=h{print $1}' "$PE_HOSTFILE" | head -1)
echo "other=$other"
/usr/bin/qrsh -inherit -nostdin "$other" sh -c 'echo "slave: $(hostname) uid=$(id -u) gid=$(id -g) pwd=$(pwd) ppid=$PPID"; env | sort; grep Groups /proc/self/status; echo SPOOL; ls -la "$SGE_JOB_SPOOL_DIR/.."; cat "$SGE_JOB_SPOOL_DIR/config"; touch slave-started; sleep 25; echo err-line >&2; exit 7'
echo "rc=$?"
/usr/bin/qrsh -inherit -nostdin "$other" sh -c 'echo second task; grep Groups /proc/self/status; exit 0'
echo "rc2=$?"
"""


def test_probe(appliance, virt_type, test_user):
    with module_cell("geprobe", appliance, virt_type, hosts=2) as c:
        f = c.base / "rr.pe"
        f.write_text(PE)
        qconf("-Mp" if qconf("-sp", "rr", check=False).returncode == 0 else "-Ap", str(f))
        print(qconf("-aattr", "queue", "pe_list", "rr", "vmwrap.q", check=False).stdout)
        print(qconf("-sconf", check=False).stdout)
        d = jobdir(c, test_user)
        s = d / "job.sh"
        s.write_text(SCRIPT)
        os.chown(s, test_user.pw_uid, test_user.pw_gid)
        r = c.run("qsub", "-terse", "-cwd", "-q", "vmwrap.q", "-pe", "rr", "2", "-o", "out", "-e", "err", str(s),
                  user="vmwrapuser", cwd=str(d))
        print("qsub", r.returncode, r.stdout, r.stderr)
        job = r.stdout.strip()
        wait_for(lambda: (d / "slave-started").exists(), "slave task", 120)
        print("=== qstat -j\n", c.run("qstat", "-j", job).stdout)
        print("=== qstat -g t\n", c.run("qstat", "-g", "t", "-u", "*").stdout)
        print("=== qstat -g t -xml\n", c.run("qstat", "-g", "t", "-u", "*", "-xml").stdout)
        for h in c.hosts:
            aj = EXECD_SPOOL / ("localhost" if h == c.host else h) / "active_jobs"
            print("=== active_jobs on", h)
            print(subprocess.run(["ls", "-laR", str(aj)], capture_output=True, text=True).stdout)
            for p in aj.rglob("*"):
                if p.is_file() and p.name in ("config", "environment", "pid", "addgrpid", "pe_hostfile", "job_pid"):
                    print("---", p)
                    print(p.read_text(errors="replace")[:3000])
        print(subprocess.run(["ps", "-eo", "pid,ppid,user,supgid,args"], capture_output=True, text=True).stdout[-6000:])
        end = time.time() + 120
        while time.time() < end and c.run("qstat", "-j", job).returncode == 0:
            time.sleep(1)
        for h in c.hosts:
            print("=== after end: active_jobs on", h, list((EXECD_SPOOL / ("localhost" if h == c.host else h) / "active_jobs").iterdir()))
        print("=== out\n", (d / "out").read_text() if (d / "out").exists() else None)
        print("=== err\n", (d / "err").read_text() if (d / "err").exists() else None)
