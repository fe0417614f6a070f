#!/usr/bin/env bash
# Install everything vmwrap needs on a fresh Debian 12 host (as root, no systemd required):
# apt packages, libvirtd + virtlogd started directly, the Python package, the test appliance.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
[ "$(id -u)" = 0 ] || { echo "install-host.sh: run as root" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
pkgs=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients
      libvirt-dev pkg-config busybox-static e2fsprogs gcc libc6-dev tini cpio sqlite3 iproute2 libopenmpi-dev openmpi-bin
      python3-venv python3-dev debootstrap kmod squashfs-tools squashfs-tools-ng zstd
      slurmctld slurmd slurm-client munge slurm-wlm-basic-plugins lua5.1 slurmdbd mariadb-server
      gridengine-master gridengine-exec gridengine-client gridengine-common
      systemd)  # systemd-analyze verify checks vmwrap's units (tests/test_services.py); not run as init
# Grid Engine's postinst asks for the cell and master host: answer it (a one-host cell named default).
for pkg in gridengine-common gridengine-master gridengine-client gridengine-exec; do
  printf '%s shared/gridengineconfig boolean true\n%s shared/gridenginecell string default\n%s shared/gridenginemaster string %s\n' \
    "$pkg" "$pkg" "$pkg" "$(hostname)"
done | debconf-set-selections
missing=()
for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

bash "$here/scripts/start-libvirtd.sh"

# The Python package, in a venv outside the repository (PEP 668-safe on Debian).
venv=${VMWRAP_VENV:-/opt/vmwrap/venv}
# Debian's own interpreter: job users run `vmwrap` too, so it must not live under a private home.
py=/usr/bin/python3
if [ -x "$venv/bin/python" ] && [ "$(readlink -f "$venv/bin/python")" != "$(readlink -f "$py")" ]; then
  rm -rf "$venv"
fi
if [ ! -x "$venv/bin/python" ]; then "$py" -m venv "$venv"; fi
"$venv/bin/pip" install -q --upgrade pip >/dev/null
"$venv/bin/pip" install -q -e "$here[test]"
ln -sf "$venv/bin/vmwrap" /usr/local/bin/vmwrap
# The simulator's engine compiled (vmwrap/sim/native.py; ~30 s of CPU, redone only when engine.py
# changed), beside the image builds below.
(cd / && "$venv/bin/python" -I -m vmwrap.sim build) & native=$!

# Site configuration and the test appliance (built from Debian packages, cached outside the repo).
mkdir -p /etc/vmwrap
[ -f /etc/vmwrap/vmwrap.toml ] || cp "$here/docs/vmwrap.toml.example" /etc/vmwrap/vmwrap.toml
# The checkpoint key (root 0600): a multi-node site copies this one file to every node instead.
[ -f /etc/vmwrap/checkpoint.key ] || vmwrap checkpoints keygen
# The shared checkpoint store, stamped once per site (says so and changes nothing when it is already).
vmwrap checkpoints init
vmwrap image build --name busybox --kind busybox
# HTCondor 23.9 is trixie-only: a cached trixie root its test pool runs in (skipped when present).
bash "$here/scripts/build-condor-root.sh"
# The node agent (root): lets a job's own user pause/resume its VM (scheduler suspend). Idempotent;
# started as on any node without systemd (docs/admin-guide.md), its log in /var/log/vmwrap/agent.log.
if ! pgrep -f "vmwrap agent|vmwrap.cli daemons run agent" >/dev/null; then
  vmwrap daemons start agent
fi
wait "$native" || echo "install-host: the simulator runs as Python (no compiled engine)" >&2
vmwrap doctor
