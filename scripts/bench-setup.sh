#!/usr/bin/env bash
# Install what the benchmark harness (bench/) needs on a Debian machine: the anchors it measures
# siterecovery against (rsync, restic, borg, qemu-img, cp) and GNU time; then, through
# `scripts/setup.sh test`, the .venv with pytest (the object-store rows start their servers with
# tests/servers.py), Azurite and SeaweedFS (scripts/setup-servers.sh) and the demo guest's parts
# (the failover RTO row). Idempotent: installs only what is missing. Run as root (or with sudo
# available).
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd rsync || need+=(rsync)
have_cmd restic || need+=(restic)
have_cmd borg || need+=(borgbackup)
have_cmd qemu-img || need+=(qemu-utils)
have_cmd qemu-io || need+=(qemu-utils)
have_cmd qemu-storage-daemon || need+=(qemu-system-x86)
[ -x /usr/bin/time ] || need+=(time)

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "bench-setup: installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

bash scripts/setup.sh test
