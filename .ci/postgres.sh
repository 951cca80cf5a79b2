#!/usr/bin/env bash
# Start a throw-away PostgreSQL server for the records tests and print `export DERMLENS_TEST_PG_URL=...`.
# Usage: eval "$(bash .ci/postgres.sh)". Installs Debian's postgresql package only if it is missing.
set -euo pipefail
PGBIN="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)"
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/initdb" ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null) >&2
  PGBIN="$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)"
fi
PGPORT="${DERMLENS_PG_PORT:-55432}"
PGROOT="${DERMLENS_PG_DIR:-${TMPDIR:-/tmp}/dermlens-pg-$PGPORT}"
RUN=()
if [ "$(id -u)" = 0 ]; then RUN=(runuser -u postgres --); fi
mkdir -p "$PGROOT"
[ "$(id -u)" = 0 ] && chown postgres "$PGROOT"
if [ ! -f "$PGROOT/data/PG_VERSION" ]; then
  "${RUN[@]}" "$PGBIN/initdb" -D "$PGROOT/data" -U dermlens --auth=trust -E UTF8 >&2
fi
if ! "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGROOT/data" status >/dev/null 2>&1; then
  "${RUN[@]}" "$PGBIN/pg_ctl" -D "$PGROOT/data" -l "$PGROOT/server.log" -w start \
    -o "-p $PGPORT -k $PGROOT -c listen_addresses=127.0.0.1 -c fsync=on" >&2
fi
"$PGBIN/psql" -h 127.0.0.1 -p "$PGPORT" -U dermlens -d postgres -tAc \
  "SELECT 1 FROM pg_database WHERE datname='dermlens_test'" | grep -q 1 \
  || "$PGBIN/createdb" -h 127.0.0.1 -p "$PGPORT" -U dermlens dermlens_test >&2
echo "export DERMLENS_TEST_PG_URL=postgresql+psycopg://dermlens@127.0.0.1:$PGPORT/dermlens_test"
