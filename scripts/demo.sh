#!/usr/bin/env bash
# Demo: a batch script with one #VMWRAP line runs in its own VM via `vmwrap run`.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/install-host.sh"
demo=$(mktemp -d /tmp/vmwrap-demo.XXXXXX); chmod 755 "$demo"
cat > "$demo/job.sh" <<'JOB'
#!/bin/sh
#VMWRAP --image=busybox --memory=256M --cpus=1
echo "guest kernel: $(uname -r)"
echo "running as uid $(id -u) in $(pwd)"
echo "hello from inside the VM" > result.txt
echo "done"
JOB
echo "== vmwrap run $demo/job.sh"
cd "$demo"

rc=0; vmwrap run job.sh || rc=$?
echo "== exit code $rc; file the job wrote on the host:"
cat "$demo/result.txt"
