#!/usr/bin/env bash
# The test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the end-to-end tests need, then runs every test of the
# workspace: unit and property tests of each crate, and the end-to-end tests
# in tests/ (real namespaces, real TUN devices, the real daemon). Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v ping >/dev/null 2>&1 || need+=(iputils-ping)
command -v traceroute >/dev/null 2>&1 || need+=(traceroute)
if ((${#need[@]})); then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}"
  else
    echo "missing: ${need[*]} (install them, or run as root on Debian/Ubuntu)" >&2
    exit 1
  fi
fi
[ -e /dev/net/tun ] || { mkdir -p /dev/net && mknod /dev/net/tun c 10 200 2>/dev/null || true; }

log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --workspace --locked 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo's last line is the doc-tests').
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "all: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
