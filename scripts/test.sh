#!/usr/bin/env bash
# The whole test suite against real daemons: installs what it needs first (idempotent).
# With arguments, they go to one pytest run as given (e.g. a module path).
# Without arguments: three xdist workers (a module's tests stay together; modules sharing a host
# singleton such as Grid Engine's cell run on one worker: see tests/conftest.py), then the `exclusive`
# tests alone (they restart libvirtd, load every core, or hold a deadline another worker's load would
# move). Three on two cores: the tests mostly wait for daemons and guests (with two workers the host's
# CPUs were idle 62% of the time). VMWRAP_TEST_WORKERS=1 runs everything in one process, one module
# after another.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/install-host.sh"
cd "$here"
pytest=(/opt/vmwrap/venv/bin/python -m pytest -v -p no:cacheprovider --durations=40)
if [ $# -gt 0 ]; then exec "${pytest[@]}" "$@"; fi
workers=${VMWRAP_TEST_WORKERS:-3}
if [ "$workers" -le 1 ]; then exec "${pytest[@]}"; fi
# A short base for tmp_path: a VM's control socket lives under it, and AF_UNIX paths end at 107 bytes
# (xdist adds popen-gwN/ to pytest's own /tmp/pytest-of-root/pytest-N/).
base=/tmp/vmt
rc=0
"${pytest[@]}" -n "$workers" --basetemp="$base" -m "not exclusive" tests || rc=$?
"${pytest[@]}" --basetemp="$base" -m exclusive tests || { r=$?; [ "$rc" -ne 0 ] || rc=$r; }
exit "$rc"
