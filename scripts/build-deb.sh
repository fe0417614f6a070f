#!/usr/bin/env bash
# Build the Debian package (dpkg-buildpackage, debian/) from this checkout's tracked and new files,
# once per content: the .deb goes to OUT (default /var/cache/vmwrap/deb/<hash of the files>/), and
# its path is printed. Missing build dependencies are installed with apt-get. Usage: build-deb.sh [OUT]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
export PATH=/usr/sbin:/usr/bin:/sbin:/bin   # Debian's python3, whatever else is first on PATH
cd "$here"
files=$(git ls-files -co --exclude-standard | grep -v -e '^tests/' -e '^benchmarks/' | sort)
hash=$(while IFS= read -r f; do [ -f "$f" ] && printf '%s\0' "$f"; done <<<"$files" \
       | xargs -0 sha256sum | sha256sum | cut -c1-16)
cache=/var/cache/vmwrap/deb
out=${1:-$cache/$hash}
mkdir -p "$cache"
exec 9>"$cache/.lock"
flock 9   # one build at a time (test runs and helpers share the cache)
if ls "$out"/vmwrap_*_all.deb >/dev/null 2>&1; then ls "$out"/vmwrap_*_all.deb; exit 0; fi
# packages of other checkouts, untouched for a week
find "$cache" -mindepth 1 -maxdepth 1 -type d -mtime +7 -exec rm -rf {} +

export DEBIAN_FRONTEND=noninteractive
if ! command -v dpkg-checkbuilddeps >/dev/null; then
  apt-get update -qq && apt-get install -y -qq --no-install-recommends dpkg-dev >/dev/null
fi
missing=$(dpkg-checkbuilddeps 2>&1 | sed -n 's/.*Unmet build dependencies: //p' | sed 's/([^)]*)//g') || true
if [ -n "$missing" ]; then
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
work=$(mktemp -d /tmp/vmwrap-deb.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir "$work/vmwrap"
while IFS= read -r f; do [ -f "$f" ] && cp --parents -p "$f" "$work/vmwrap/"; done <<<"$files"
(cd "$work/vmwrap" && dpkg-buildpackage -b -us -uc >"$work/build.log" 2>&1) \
  || { tail -40 "$work/build.log" >&2; echo "build-deb.sh: dpkg-buildpackage failed" >&2; exit 1; }
mkdir -p "$out.tmp.$$"
cp "$work"/vmwrap_*_all.deb "$out.tmp.$$/"
rm -rf "$out"; mv "$out.tmp.$$" "$out"
ls "$out"/vmwrap_*_all.deb
