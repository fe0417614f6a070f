#!/bin/busybox sh
# vmwrap guest agent (PID 1 of the appliance's initramfs).
# Mounts the job's root disk and shares, runs the job as its user, reports the exit status
# on the virtio port org.vmwrap.status, then powers the guest off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
while read -r m; do insmod "/lib/modules/$m" || echo "vmwrap: insmod $m failed"; done < /etc/vmwrap-modules

port() {
  for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = "$1" ] && { echo "/dev/${p##*/}"; return; }
  done
}
i=0; while [ -z "$(port org.vmwrap.status)" ] && [ $i -lt 200 ]; do sleep 0.02; i=$((i+1)); done
STATUS=$(port org.vmwrap.status); OUT=$(port org.vmwrap.stdout); ERR=$(port org.vmwrap.stderr)
CTL=$(port org.vmwrap.control)
say() { echo "$*" > "$STATUS"; }
fail() { say "error $*"; echo "vmwrap guest: $*" > "$ERR"; sync; poweroff -f; }
say "booted $(cut -d' ' -f1 /proc/uptime)"

if grep -q 'vmwrap.probe' /proc/cmdline; then say "exit 0"; poweroff -f; fi

mkdir -p /ctl && mount -t 9p -o trans=virtio,version=9p2000.L,ro vmwrap_ctl /ctl || fail "cannot mount control share"
ROOT=/
if [ -b /dev/vda ]; then
  mkdir -p /newroot && mount -t ext4 /dev/vda /newroot || fail "cannot mount the appliance disk"
  ROOT=/newroot
  for d in proc sys dev tmp; do mkdir -p "$ROOT/$d"; done
  mount -t proc proc "$ROOT/proc"; mount -t sysfs sys "$ROOT/sys"; mount -t devtmpfs dev "$ROOT/dev"
  chmod 1777 "$ROOT/tmp"
fi
mkdir -p "$ROOT/.vmwrap" && mount -o bind,ro /ctl "$ROOT/.vmwrap"
WORKDIR=$(cat /ctl/workdir)
mkdir -p "$ROOT$WORKDIR"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144,cache=none vmwrap_work "$ROOT$WORKDIR" \
  || fail "cannot mount the work dir"
read -r UID_ GID_ GROUPS_ UMASK_ < /ctl/ids
[ -n "$(cat /ctl/hostname 2>/dev/null)" ] && hostname "$(cat /ctl/hostname)"

say "ready $(cut -d' ' -f1 /proc/uptime)"
# Wait for the host's GO: the job's script, environment and arguments are written by whoever attaches
# (the launcher, or the user-side payload under a scheduler) into /ctl/user before it says GO.
while :; do
  while read -r cmd; do
    case "$cmd" in GO) break 2 ;; TERM|KILL) say "exit 143"; poweroff -f ;; esac
  done < "$CTL"
  sleep 0.05
done
/bin/vmwrap-exec "$ROOT" "$UID_" "$GID_" "$GROUPS_" "$UMASK_" "$WORKDIR" /ctl/user/env /ctl/user/args \
  /.vmwrap/user/script < /dev/null > "$OUT" 2> "$ERR" &
JOB=$!
say "started $(cut -d' ' -f1 /proc/uptime)"
# The host may disconnect and reconnect (EOF then): keep reading.
( while :; do
    while read -r cmd; do
      case "$cmd" in
        TERM) kill -TERM -- "-$JOB" 2>/dev/null || kill -TERM "$JOB" ;;
        KILL) kill -KILL -- "-$JOB" 2>/dev/null || kill -KILL "$JOB" ;;
        STOP) kill -STOP -- "-$JOB" 2>/dev/null ;;
        CONT) kill -CONT -- "-$JOB" 2>/dev/null ;;
      esac
    done < "$CTL"
    sleep 0.2
  done ) &
wait "$JOB"; rc=$?
sync
say "exit $rc"
poweroff -f
