#!/usr/bin/env bash
# Starts a throw-away PostgreSQL cluster on a loopback port, runs the given
# command with EHRX_TEST_DATABASE_URL pointing at it, and removes the cluster.
#   scripts/test-postgres.sh cargo test
set -euo pipefail
# A free loopback port unless EHRX_PG_PORT names one: several runs may
# share a machine.
port="${EHRX_PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
pgbin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
if [ -z "$pgbin" ]; then
  echo "PostgreSQL server binaries not found (apt-get install postgresql)" >&2
  exit 1
fi
data=$(mktemp -d /tmp/ehrx-pg.XXXXXX)
run_pg() {
  if [ "$(id -u)" = 0 ]; then su postgres -s /bin/sh -c "$*"; else sh -c "$*"; fi
}
[ "$(id -u)" = 0 ] && chown postgres: "$data"
cleanup() {
  run_pg "'$pgbin/pg_ctl' -D '$data' -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$data"
}
trap cleanup EXIT
run_pg "'$pgbin/initdb' -D '$data' -A trust -U ehrx --no-sync" >/dev/null
run_pg "'$pgbin/pg_ctl' -D '$data' -l '$data/log' -w -o \"-p $port -k '$data' -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=300\" start" >/dev/null
export EHRX_TEST_DATABASE_URL="postgres://ehrx@127.0.0.1:$port/postgres"
"$@"
