#!/bin/busybox sh
# vmwrap guest agent (PID 1 of the appliance's initramfs).
# Mounts the job's root disk and shares, runs the job as its user, reports the exit status
# on the virtio port org.vmwrap.status, then powers the guest off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
load() { while read -r m; do insmod "/lib/modules/$m" || echo "vmwrap: insmod $m failed"; done < "$1"; }
load /etc/vmwrap-modules
# The disk drivers only when the VM has a virtio disk (PCI ids 1af4:1001 legacy, 1af4:1042 modern), the
# network cards' only when it has one (1af4:1000, 1af4:1041: an image whose catalog entry says network = "nat",
# or a multi-node job's private network, vmwrap/jobnet.py).
DISK=; NET=
for d in /sys/bus/pci/devices/*; do
  read -r ven < "$d/vendor"; [ "$ven" = 0x1af4 ] || continue
  read -r dev < "$d/device"
  case "$dev" in 0x1001|0x1042) DISK=1 ;; 0x1000|0x1041) NET=1 ;; esac
done
[ -n "$DISK" ] && load /etc/vmwrap-disk-modules
# QEMU's user-mode NAT (vmwrap/domain.py) always answers as gateway 10.0.2.2 and DNS 10.0.2.3: a fixed
# address is as good as DHCP here and costs no round trips. Its card's MAC starts 52:54:00 (the job
# network's 52:54:01, set up below once the control files are there).
card() { for i in /sys/class/net/eth*; do read -r a < "$i/address"; case "$a" in $1) echo "${i##*/}"; return ;; esac; done; }
NAT=
if [ -n "$NET" ]; then
  load /etc/vmwrap-net-modules
  ip link set lo up
  NATIF=$(card '52:54:00:*')
  if [ -n "$NATIF" ]; then
    NAT=1
    { ip link set "$NATIF" up && ip addr add 10.0.2.15/24 dev "$NATIF" && ip route add default via 10.0.2.2; } \
      || echo "vmwrap guest: cannot configure the network: $(ip addr 2>&1 | tail -4)" > /dev/console
  fi
fi

# Find the vmwrap virtio ports by name (the shell builtin read: no fork per port under TCG).
find_ports() {
  SHELLMORE= STEPSMORE=
  for p in /sys/class/virtio-ports/*; do
    [ -e "$p/name" ] || continue
    read -r n < "$p/name"
    case "$n" in
      org.vmwrap.status) STATUS=/dev/${p##*/} ;; org.vmwrap.stdout) OUT=/dev/${p##*/} ;;
      org.vmwrap.stderr) ERR=/dev/${p##*/} ;; org.vmwrap.control) CTL=/dev/${p##*/} ;;
      org.vmwrap.9p) NINEP=/dev/${p##*/} ;;
      org.vmwrap.steps) STEPS=/dev/${p##*/} ;; org.vmwrap.shell) SHELLPORT=/dev/${p##*/} ;;
      org.vmwrap.shell.[1-9]*) SHELLMORE="$SHELLMORE /dev/${p##*/}" ;;
      org.vmwrap.steps.[1-9]*) STEPSMORE="$STEPSMORE /dev/${p##*/}" ;;
    esac
  done
}
# Ports appear as the virtio-serial driver probes them: on a saturated host that takes seconds.
# Wait as long as it takes up to 120 s of guest time, then say on the console what is missing.
i=0; find_ports
while { [ -z "$STATUS" ] || [ -z "$CTL" ] || [ ! -e "$STATUS" ] || [ ! -e "$CTL" ]; } && [ $i -lt 6000 ]; do
  sleep 0.02; i=$((i+1)); find_ports
done
if [ -z "$STATUS" ] || [ ! -e "$STATUS" ] || [ -z "$CTL" ] || [ ! -e "$CTL" ]; then
  echo "vmwrap guest: virtio ports not found after 120 s (status='$STATUS' control='$CTL'): $(ls /sys/class/virtio-ports 2>&1)" > /dev/console
  poweroff -f
fi
say() { echo "$*" > "$STATUS"; }
fail() { say "error $*"; echo "vmwrap guest: $*" > "$ERR"; sync; poweroff -f; }
read -r up _ < /proc/uptime; say "booted $up"

if grep -q 'vmwrap.probe' /proc/cmdline; then say "exit 0"; poweroff -f; fi

# Fast start (vmwrap/snapshot.py): a template guest stops here, before anything job-specific, and is
# saved; each job's VM is restored from it and the host sends "RESUME <random hex> <epoch seconds>".
# The seed is written before anything forks: the template idled past the kernel's reseed interval, so
# the first random use after it reseeds from the host's bytes (clones must not share a random stream).
RESTORED=
read -r CMDLINE < /proc/cmdline
case " $CMDLINE " in *" vmwrap.template "*)
  # Zero the memory the boot used and freed (the initrd's image, the kernel's init sections): the save
  # then stores those pages as zero-page flags, and every job's restore reads that much less.
  while read -r k v _; do [ "$k" = MemFree: ] && break; done < /proc/meminfo
  dd if=/dev/zero of=/dev/null bs=$((v * 9 / 10))k count=1 2>/dev/null
  read -r up _ < /proc/uptime
  say "template $up"
  while :; do
    while read -r cmd seed now; do
      case "$cmd" in RESUME) break 2 ;; TERM|KILL) say "exit 143"; poweroff -f ;; esac
    done < "$CTL"
    sleep 0.05
  done
  echo "$seed" > /dev/urandom
  date -u -s "@$now" > /dev/null || echo "vmwrap guest: cannot set the clock to $now" > /dev/console
  RESTORED=1
  read -r up _ < /proc/uptime; say "resumed $up" ;;
esac

# /run, /ctl, /ctl.copy and /newroot are in the initramfs (vmwrap/appliance.py): after a restore every command
# here is on the job's start path, and a fork and exec of busybox costs milliseconds under TCG.
CTLD=/ctl   # the job's control files (a copy in RAM once handed over, with vmwrap's 9P)
# The control share's mount waits on QEMU, the disk's mostly runs here: one overlaps the other.
mount -t 9p -o trans=virtio,version=9p2000.L,ro vmwrap_ctl /ctl & CTL_MOUNT=$!
ROOT=/
if [ -b /dev/vda ]; then
  mount -t ext4 /dev/vda /newroot || fail "cannot mount the appliance disk"
  ROOT=/newroot
  [ -d "$ROOT/proc" ] && [ -d "$ROOT/sys" ] && [ -d "$ROOT/dev" ] && [ -d "$ROOT/tmp" ] \
    || mkdir -p "$ROOT/proc" "$ROOT/sys" "$ROOT/dev" "$ROOT/tmp"
  mount -t proc proc "$ROOT/proc"; mount -t sysfs sys "$ROOT/sys"; mount -t devtmpfs dev "$ROOT/dev"
  chmod 1777 "$ROOT/tmp"
fi
wait "$CTL_MOUNT" || fail "cannot mount control share"
# A restored VM is a clone of the template: it gets its own machine id (a cold boot keeps the image's).
if [ -n "$RESTORED" ] && [ -d "$ROOT/etc" ]; then
  read -r id < /proc/sys/kernel/random/uuid && echo "${id//-/}" > "$ROOT/etc/machine-id"
fi
if [ -n "$NAT" ] && [ -d "$ROOT/etc" ]; then
  rm -f "$ROOT/etc/resolv.conf"; echo "nameserver 10.0.2.3" > "$ROOT/etc/resolv.conf"
fi
# A multi-node job's private network: this VM's card and address, then its nodes' names (jobnet.Plan).
if [ -e /ctl/jobnet ]; then
  { read -r JMAC JADDR; JIF=$(card "$JMAC")
    { [ -n "$JIF" ] && ip link set "$JIF" up && ip addr add "$JADDR" dev "$JIF"; } \
      || echo "vmwrap guest: cannot configure the job network ($JMAC $JADDR): $(ip addr 2>&1 | tail -4)" > /dev/console
    if [ -d "$ROOT/etc" ]; then [ -e "$ROOT/etc/hosts" ] || echo "127.0.0.1 localhost" > "$ROOT/etc/hosts"; cat >> "$ROOT/etc/hosts"; fi
  } < /ctl/jobnet
fi
# The job's files as it sees them (/.vmwrap). With vmwrap's 9P the share is copied to RAM once the job is
# handed over (below), and bound from there.
mkdir -p "$ROOT/.vmwrap" && { [ -n "$NINEP" ] || mount -o bind,ro /ctl "$ROOT/.vmwrap"; }
IFS= read -r WORKDIR < /ctl/workdir  # (no newline in the file: read fails, WORKDIR is set)
mkdir -p "$ROOT$WORKDIR"
if [ -n "$NINEP" ]; then
  # vmwrap's 9P server over a virtio-serial port: unlike virtio-9p it lets the VM be saved.
  /bin/vmwrap-relay "$NINEP" /bin/mount -t 9p -o trans=fd,rfdno=3,wfdno=3,version=9p2000.L,msize=1048576,cache=none \
    vmwrap_work "$ROOT$WORKDIR" || fail "cannot mount the work dir: $(dmesg | tail -6)"
else
  mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none vmwrap_work "$ROOT$WORKDIR" \
    || fail "cannot mount the work dir"
fi
read -r UID_ GID_ GROUPS_ UMASK_ < /ctl/ids
read -r h < /ctl/hostname; [ -n "$h" ] && hostname "$h"  # (no newline in the file: read fails, h is set)

read -r up _ < /proc/uptime; say "ready $up"
# `vmwrap shell JOBID` (vmwrap/shell.py): shells on new terminals in the job's root as its user. The root gets the
# same terminals (tty, ttyname). A server per shell port: as many sessions at once as the VM has ports.
serve_shells() {
  find_ports
  [ -n "$SHELLPORT" ] || return 0
  ( mkdir -p /dev/pts && mount -t devpts -o gid=5,mode=620,ptmxmode=666 devpts /dev/pts \
      && { [ "$ROOT" = / ] || { mkdir -p "$ROOT/dev/pts" && mount -o bind /dev/pts "$ROOT/dev/pts"; }; } \
      && for port in $SHELLMORE; do
           /bin/vmwrap-shell "$port" "$ROOT" "$UID_" "$GID_" "$GROUPS_" "$UMASK_" "$WORKDIR" "$CTLD/user/env" &
         done \
      && exec /bin/vmwrap-shell "$SHELLPORT" "$ROOT" "$UID_" "$GID_" "$GROUPS_" "$UMASK_" "$WORKDIR" "$CTLD/user/env" \
    ) < /dev/null > /dev/console 2>&1 &
}
# A multi-node job's VM on its other nodes runs no script: the job's steps reach it through shell
# sessions (vmwrap/steps.py), until the epilog destroys it.
if [ -e /ctl/peer ]; then
  # Sessions are all this VM serves: wait for its port as for the others (the driver may still be
  # probing it this early; the batch script's VM gets here only after its job started).
  i=0
  while { [ -z "$SHELLPORT" ] || [ ! -e "$SHELLPORT" ]; } && [ $i -lt 6000 ]; do sleep 0.02; i=$((i+1)); find_ports; done
  [ -n "$SHELLPORT" ] && [ -e "$SHELLPORT" ] || echo "vmwrap guest: shell port not found after 120 s: $(ls /sys/class/virtio-ports 2>&1)" > /dev/console
  serve_shells
  # No host attaches here as a rule (its epilog destroys the VM): while none is, each open reads EOF at
  # once, and each open and close is two control messages through QEMU to libvirtd: look seldom.
  while :; do
    while read -r cmd; do case "$cmd" in TERM|KILL) say "exit 143"; poweroff -f ;; esac; done < "$CTL"
    sleep 2
  done
fi
# Wait for the host's GO: the job's script, environment and arguments are written by whoever attaches
# (the launcher, or the user-side payload under a scheduler) into /ctl/user before it says GO.
while :; do
  while read -r cmd; do
    case "$cmd" in GO) break 2 ;; TERM|KILL) say "exit 143"; poweroff -f ;; esac
  done < "$CTL"
  sleep 0.05
done
if [ -n "$NINEP" ]; then
  # A mounted virtio-9p share blocks saving the VM: keep a copy of the control files in RAM instead.
  cp -a /ctl/. /ctl.copy/ || fail "cannot copy the job's control files"   # (/ctl.copy: in the initramfs)
  umount /ctl && mount -o bind,ro /ctl.copy "$ROOT/.vmwrap" || fail "cannot release the control share"
  CTLD=/ctl.copy
fi
# Steps (vmwrap/steps.py): when the host serves them, `srun` in the job's PATH is vmwrap's shim and the
# step port is the job's user's (who is root in this VM anyway: nothing to protect from them here).
# The marker names the shim (the scheduler's launcher: Grid Engine's is `qrsh -inherit`, PBS's
# pbs_tmrsh); empty: srun.
if [ -e "$CTLD/user/steps" ]; then
  find_ports
  SHIM=$(head -c 16 "$CTLD/user/steps")
  case "$SHIM" in ""|srun) SHIM=srun ;; qrsh|pbs_tmrsh) ;; *) SHIM= ;; esac
  { [ -n "$STEPS" ] && [ -n "$SHIM" ] && mkdir -p "$ROOT/usr/local/bin" && cp /bin/vmwrap-srun "$ROOT/usr/local/bin/$SHIM" \
    && chown "$UID_:$GID_" "$STEPS" $STEPSMORE; } || echo "vmwrap guest: cannot offer steps" > /dev/console
  # and where the job's tools look for it besides PATH (Open MPI: $SGE_ROOT/bin/$ARC/qrsh)
  [ -n "$SHIM" ] && [ -e "$CTLD/user/steps.dirs" ] && head -c 4096 "$CTLD/user/steps.dirs" | head -n 16 | while IFS= read -r d; do
    case "$d" in /*) ;; *) continue ;; esac
    case "$d" in */.*|*//*) continue ;; esac
    { mkdir -p "$ROOT$d" && cp /bin/vmwrap-srun "$ROOT$d/$SHIM"; } || echo "vmwrap guest: cannot put $SHIM in $d" > /dev/console
  done
fi
job() { exec /bin/vmwrap-exec "$ROOT" "$UID_" "$GID_" "$GROUPS_" "$UMASK_" "$WORKDIR" "$CTLD/user/env" "$CTLD/user/args" \
  /.vmwrap/user/script "$CTLD/user/limits"; }
# One output file on the host for both streams: send both over the one port (a port opens only once),
# in the order they were written.
if [ -e "$CTLD/user/merged" ]; then job < /dev/null > "$OUT" 2>&1 & else job < /dev/null > "$OUT" 2> "$ERR" & fi
JOB=$!
read -r up _ < /proc/uptime; say "started $up"
# Shells are served once the job runs (off its start's critical path).
serve_shells
# The host may disconnect and reconnect (EOF then): keep reading.
( while :; do
    while read -r cmd; do
      case "$cmd" in
        TERM|KILL|STOP|CONT)  # the job's own process group (vmwrap-exec's child); until it is known, vmwrap-exec
          read -r PG < /run/vmwrap-job.pgid 2>/dev/null || PG=
          kill -"$cmd" -- "-$PG" 2>/dev/null || kill -"$cmd" "$JOB" 2>/dev/null ;;
      esac
    done < "$CTL"
    sleep 0.2
  done ) &
wait "$JOB"; rc=$?
sync
# A signal killed the job: say which before its 128+N (the host then ends the same way).
[ -s /run/vmwrap-job.signal ] && read -r sig < /run/vmwrap-job.signal && say "signal $sig"
say "exit $rc"
poweroff -f
