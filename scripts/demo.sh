#!/usr/bin/env bash
# Demo: a batch job in its own VM: `vmwrap run`, then sbatch on a local Slurm cluster, then
# condor_submit on a local HTCondor pool.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/install-host.sh"
echo "== 1. vmwrap run: a script in its own VM, no scheduler"
demo=$(mktemp -d /tmp/vmwrap-demo.XXXXXX); chmod 755 "$demo"
cat > "$demo/job.sh" <<'JOB'
#!/bin/sh
#VMWRAP --image=busybox --memory=256M --cpus=1
echo "guest kernel: $(uname -r), uid $(id -u), in $(pwd)"
exit 7
JOB
rc=0; (cd "$demo" && vmwrap run job.sh) || rc=$?
echo "== exit code $rc (the script's own)"
echo
echo "== 2. Slurm: sbatch on a local 3-node cluster, each job runs in its own VM (busybox, and python3"
echo "      in a Debian appliance built once with --packages python3-minimal: ~50 s, then cached)"
vmwrap image list --json | grep -q '"name": "python3"' ||
  vmwrap image build --name python3 --kind debootstrap --packages python3-minimal
cd "$here" && /opt/vmwrap/venv/bin/python -m harness.slurm_cluster
echo
echo "== 3. HTCondor: condor_submit on a local pool (two startds), the job runs in its own VM"
cd "$here" && /opt/vmwrap/venv/bin/python -m harness.condor_pool
