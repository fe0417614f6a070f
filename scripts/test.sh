#!/usr/bin/env bash
# The whole test suite against real daemons: installs what it needs first (idempotent).
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
bash "$here/scripts/install-host.sh"
cd "$here"
exec /opt/vmwrap/venv/bin/python -m pytest -v -p no:cacheprovider --durations=40 "$@"
