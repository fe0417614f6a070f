#!/usr/bin/env bash
# Start virtlogd + libvirtd without systemd (idempotent). Facts behind each step: docs/host-notes.md.
set -euo pipefail
getent group kvm >/dev/null || groupadd -r kvm
getent group libvirt-qemu >/dev/null || groupadd -r libvirt-qemu
getent passwd libvirt-qemu >/dev/null || useradd -r -g libvirt-qemu -G kvm -d /var/lib/libvirt -s /usr/sbin/nologin libvirt-qemu
if [ -e /dev/kvm ]; then chgrp kvm /dev/kvm && chmod 0660 /dev/kvm || true; fi
mkdir -p /var/log/libvirt /var/run/libvirt /var/lib/libvirt/qemu
conf=/etc/libvirt/qemu.conf
# QEMU never runs as root: each job's VM runs as the job's own uid (a per-domain static DAC label
# rendered by vmwrap); anything else (the KVM probe) as libvirt-qemu. dynamic_ownership = 0: libvirt
# never chowns a file a domain uses (with relabelling it hands the shared cached kernel and base
# images to the job's user and does not give them back). The DAC driver stays on (no security_driver
# line: "none" would turn it off and run every QEMU as the global user).
# stdio_handler=file: QEMU writes the job's output channels itself; virtlogd would roll them over at 2 MB.
if ! grep -q '^# vmwrap v3' "$conf" 2>/dev/null; then
  sed -i '/^# vmwrap/,$d' "$conf" 2>/dev/null || true
  printf '# vmwrap v3\nuser = "libvirt-qemu"\ngroup = "libvirt-qemu"\ndynamic_ownership = 0\nremember_owner = 0\nstdio_handler = "file"\n' >> "$conf"
  restart=1
fi
if [ "${restart:-0}" = 1 ] && pgrep -x libvirtd >/dev/null; then
  pkill -x libvirtd; for _ in $(seq 1 50); do pgrep -x libvirtd >/dev/null || break; sleep 0.1; done
fi
# Daemons must not inherit our open files (a caller's lock fd would then be held forever).
for fd in /proc/$$/fd/*; do n=${fd##*/}; [ "$n" -gt 2 ] 2>/dev/null && eval "exec $n>&-" 2>/dev/null; done
pgrep -x virtlogd >/dev/null || virtlogd -d
if ! pgrep -x libvirtd >/dev/null; then
  # tini -s reaps QEMU promptly; PID 1 in some sandboxes reaps only every ~2 s.
  if command -v tini >/dev/null; then
    setsid tini -s -- libvirtd </dev/null >>/var/log/libvirt/libvirtd.out 2>&1 &
  else
    libvirtd -d
  fi
fi
for _ in $(seq 1 100); do virsh -c qemu:///system version >/dev/null 2>&1 && exit 0; sleep 0.1; done
echo "start-libvirtd.sh: libvirtd did not answer on qemu:///system" >&2; exit 1
