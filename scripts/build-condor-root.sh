#!/usr/bin/env bash
# Build (once) a Debian trixie root holding HTCondor 23.9, cached outside the repository.
# HTCondor is not in bookworm and trixie's needs trixie's libc, so the pool runs in a chroot of this
# root (harness/condor_pool.py). Idempotent: a finished root (stamp file) is left alone; a half-built
# one is thrown away and built again. Usage: build-condor-root.sh [DIR]
set -euo pipefail
[ "$(id -u)" = 0 ] || { echo "build-condor-root.sh: run as root" >&2; exit 1; }
root=${1:-${VMWRAP_CONDOR_ROOT:-/var/cache/vmwrap/condor-root}}
stamp=$root/.vmwrap-condor-root
if [ -f "$stamp" ] && [ -x "$root/usr/sbin/condor_master" ]; then
  echo "condor root: $root (cached, $(cat "$stamp"))"
  exit 0
fi

# The Debian mirror this host already uses (first .../debian URI of its apt sources), unless given.
mirror=${VMWRAP_DEBIAN_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(grep -rhoE '(https?://[^ ]+/debian)/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d 2>/dev/null \
           | head -n1 | tr -d ' ' | sed 's:/$::' || true)
fi
mirror=${mirror:-http://deb.debian.org/debian}

start=$(date +%s)
work=$root.tmp
# A previous attempt may have left mounts under the half-built root: undo them before deleting it.
for d in "$work" "$root"; do
  if [ -d "$d" ] && [ ! -f "$d/.vmwrap-condor-root" ]; then
    grep -F " $d/" /proc/mounts | awk '{print $2}' | sort -r | xargs -r -n1 umount -l
    rm -rf --one-file-system "$d"
  fi
done
mkdir -p "$(dirname "$root")"
debootstrap --variant=minbase trixie "$work" "$mirror" >"$work.log" 2>&1 \
  || { tail -n 20 "$work.log" >&2; exit 1; }

# No daemon may start while packages install (there is no init in the chroot anyway).
printf '#!/bin/sh\nexit 101\n' >"$work/usr/sbin/policy-rc.d"
chmod 755 "$work/usr/sbin/policy-rc.d"
mount -t proc proc "$work/proc"
trap 'umount -l "$work/proc" 2>/dev/null || true' EXIT
chroot "$work" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive \
  sh -c 'apt-get update -qq && apt-get install -y -qq --no-install-recommends htcondor' >>"$work.log" 2>&1 \
  || { tail -n 20 "$work.log" >&2; exit 1; }
chroot "$work" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin apt-get clean
umount "$work/proc"
trap - EXIT

version=$(chroot "$work" /usr/sbin/condor_master -version | head -n1)
echo "$version; built $(date -u +%FT%TZ) in $(( $(date +%s) - start )) s from $mirror" >"$work/.vmwrap-condor-root"
mv "$work" "$root"
rm -f "$work.log"
echo "condor root: $root ($(cat "$stamp"))"
