#!/usr/bin/env bash
# Start a private PostgreSQL cluster for the vault tests and print its URL.
#   scripts/setup-postgres.sh            -> prints postgresql+psycopg://postgres@127.0.0.1:PORT/DB
#   SITERECOVERY_TEST_DATABASE_URL=$(scripts/setup-postgres.sh) .venv/bin/pytest tests/vault tests/api
# Idempotent: installs Debian's postgresql if missing, makes the cluster once (in $PGTEST_DIR,
# default /tmp/siterecovery-pg, owned by the postgres user, trust auth on 127.0.0.1 only),
# starts it if it is not running, creates the database if missing. Run as root.
set -euo pipefail
dir=${PGTEST_DIR:-/tmp/siterecovery-pg}
port=${PGTEST_PORT:-55432}
db=${PGTEST_DB:-siterecovery_test}

bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
if [ -z "$bin" ] || [ ! -x "$bin/initdb" ]; then
  echo "setup-postgres: installing postgresql" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends postgresql >&2
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
as_pg() { runuser -u postgres -- "$@"; }

if [ ! -f "$dir/PG_VERSION" ]; then
  mkdir -p "$dir"
  chown postgres:postgres "$dir"
  chmod 700 "$dir"
  as_pg "$bin/initdb" -D "$dir" -U postgres --auth=trust -E UTF8 >/dev/null
fi
if ! as_pg "$bin/pg_ctl" -D "$dir" status >/dev/null 2>&1; then
  as_pg "$bin/pg_ctl" -D "$dir" -l "$dir/server.log" -w \
    -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off" start >/dev/null
fi
if ! as_pg "$bin/psql" -h 127.0.0.1 -p "$port" -U postgres -tAc \
    "SELECT 1 FROM pg_database WHERE datname='$db'" | grep -q 1; then
  as_pg "$bin/createdb" -h 127.0.0.1 -p "$port" -U postgres "$db"
fi
echo "postgresql+psycopg://postgres@127.0.0.1:$port/$db"
