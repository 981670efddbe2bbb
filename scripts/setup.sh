#!/usr/bin/env bash
# Install what siterecovery needs on a Debian machine, then make .venv.
#   scripts/setup.sh          runtime: QEMU, the demo guest's kernel and busybox, Python deps
#   scripts/setup.sh test     + what the test suite uses
# Idempotent: installs only what is missing. Run as root (or with sudo available).
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:-runtime}

need=()
have_cmd() { command -v "$1" >/dev/null 2>&1; }
have_cmd qemu-system-x86_64 || need+=(qemu-system-x86)
have_cmd qemu-img || need+=(qemu-utils)
have_cmd qemu-storage-daemon || need+=(qemu-system-x86)
[ -x /bin/busybox ] && file_is_static=$(ldd /bin/busybox 2>&1 | grep -c 'not a dynamic' || true) || file_is_static=0
[ "${file_is_static:-0}" = 1 ] || need+=(busybox-static)
ls /boot/vmlinuz-* >/dev/null 2>&1 || need+=(linux-image-amd64)
if [ "$mode" = test ]; then
  have_cmd rsync || need+=(rsync)
  [ -x /usr/bin/time ] || need+=(time)
  [ -x /usr/sbin/qemu-ga ] || need+=(qemu-guest-agent)   # copied into the agent test guest
  have_cmd mkfs.ext4 || need+=(e2fsprogs)                # the guest's frozen filesystem
fi
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)

if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup: installing Debian packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.installed-$mode
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages ($mode)"
  .venv/bin/pip install -q --upgrade pip >/dev/null
  if [ "$mode" = test ]; then
    .venv/bin/pip install -q -e '.[dev]'
  else
    .venv/bin/pip install -q -e .
  fi
  touch "$stamp"
fi

if [ "$mode" = test ]; then
  bash scripts/setup-servers.sh   # Azurite and SeaweedFS for the replica store tests
fi
