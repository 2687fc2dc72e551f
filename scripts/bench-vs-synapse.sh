#!/usr/bin/env bash
# Side by side: installs Synapse (PyPI matrix-synapse, PostgreSQL from Debian as its recommended
# production database, rate limits raised) and builds Hafen in release mode, starts both on
# loopback, runs the same hafen-bench scenarios against each alternately ROUNDS times, and writes
# docs/benchmarks.md with medians and ratios. Both run with durable writes: Hafen with
# database_sync_writes = true (fsync per write), PostgreSQL with synchronous_commit = on.
#
# Usage: scripts/bench-vs-synapse.sh            (ROUNDS=3 by default)
#        ROUNDS=1 SCENARIOS=send_one_room,http_ceiling scripts/bench-vs-synapse.sh
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ROUNDS=${ROUNDS:-3}
SCENARIOS=${SCENARIOS:-all}
BENCH_ARGS=${BENCH_ARGS:-}
WORK=${BENCH_WORK:-$HOME/.cache/hafen-bench}
OUT=${BENCH_OUT:-$WORK/results}
HAFEN_PORT=18108
SYNAPSE_PORT=18118
mkdir -p "$WORK" "$OUT"
source scripts/setup-debian.sh
source scripts/bench-common.sh
export PATH="$HOME/.cargo/bin:$PATH"

# --- Install ---------------------------------------------------------------------------------
if ! dpkg -s postgresql >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
if [ ! -x "$WORK/synapse-venv/bin/python" ] || ! "$WORK/synapse-venv/bin/python" -c 'import synapse' 2>/dev/null; then
  python3 -m venv "$WORK/synapse-venv"
  "$WORK/synapse-venv/bin/pip" install -q "matrix-synapse[postgres]"
fi
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/hafen-release}
cargo build --release -p hafen --bin hafen -p hafen-bench
HAFEN="$CARGO_TARGET_DIR/release/hafen"
BENCH="$CARGO_TARGET_DIR/release/hafen-bench"

# --- PostgreSQL -------------------------------------------------------------------------------
PGVER=$(ls /usr/lib/postgresql | sort -n | tail -1)
PGDATA=${BENCH_PGDATA:-/var/tmp/hafen-bench/pgdata}
install -d -o postgres "$(dirname "$PGDATA")"
PGBIN="/usr/lib/postgresql/$PGVER/bin"
PGPORT=18132
if [ ! -d "$PGDATA" ]; then
  install -d -o postgres "$PGDATA"
  su postgres -c "$PGBIN/initdb -D $PGDATA -A trust -E UTF8 --locale=C" >/dev/null
fi
chown -R postgres "$PGDATA"
su postgres -c "$PGBIN/pg_ctl -D $PGDATA -o '-p $PGPORT -k /tmp -c listen_addresses=127.0.0.1' -l $(dirname $PGDATA)/pg.log -w start" >/dev/null
cleanup() {
  [ -n "${HAFEN_PID:-}" ] && kill "$HAFEN_PID" 2>/dev/null || true
  [ -n "${SYNAPSE_PID:-}" ] && kill "$SYNAPSE_PID" 2>/dev/null || true
  su postgres -c "$PGBIN/pg_ctl -D $PGDATA -m fast stop" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql() { su postgres -c "$PGBIN/psql -h 127.0.0.1 -p $PGPORT -v ON_ERROR_STOP=1 -q $*"; }

start_synapse() {
  local dir="$WORK/synapse"
  rm -rf "$dir"; mkdir -p "$dir"
  psql "-c 'DROP DATABASE IF EXISTS synapse'" >/dev/null
  psql "-c \"CREATE DATABASE synapse ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C' TEMPLATE template0\"" >/dev/null
  "$WORK/synapse-venv/bin/python" -m synapse.app.homeserver --server-name localhost \
    --config-path "$dir/homeserver.yaml" --data-directory "$dir" --generate-config --report-stats=no >/dev/null
  python3 - "$dir" "$SYNAPSE_PORT" "$PGPORT" <<'PY'
import sys
d, port, pgport = sys.argv[1], sys.argv[2], sys.argv[3]
path = f"{d}/homeserver.yaml"
text = open(path).read()
# Replace the generated listeners and database with ours; append the benchmark settings.
lines, skip = [], False
for line in text.splitlines():
    if line.startswith(("listeners:", "database:")):
        skip = True
        continue
    if skip and (line.startswith(" ") or line.startswith("-")):
        continue
    skip = False
    lines.append(line)
rc = "{per_second: 100000, burst_count: 100000}"
lines += [
    "listeners:",
    f"  - port: {port}",
    "    bind_addresses: ['127.0.0.1']",
    "    type: http",
    "    tls: false",
    "    x_forwarded: false",
    "    resources: [{names: [client], compress: false}]",
    "database:",
    "  name: psycopg2",
    "  args:",
    "    user: postgres",
    "    database: synapse",
    "    host: 127.0.0.1",
    f"    port: {pgport}",
    "    cp_min: 5",
    "    cp_max: 10",
    "enable_registration: true",
    "enable_registration_without_verification: true",
    "trusted_key_servers: []",
    "presence: {enabled: false}",
    f"rc_message: {rc}", f"rc_registration: {rc}", f"rc_login: {{address: {rc}, account: {rc}, failed_attempts: {rc}}}",
    f"rc_joins: {{local: {rc}, remote: {rc}}}", f"rc_joins_per_room: {rc}", f"rc_invites: {{per_room: {rc}, per_user: {rc}, per_issuer: {rc}}}",
    f"rc_admin_redaction: {rc}", f"rc_3pid_validation: {rc}", f"rc_presence: {{per_user: {rc}}}",
    f"rc_room_creation: {rc}", f"rc_delayed_event_mgmt: {rc}", f"rc_reports: {rc}",
    "room_list_publication_rules: [{action: allow}]",
    "alias_creation_rules: [{action: allow}]",
]
open(path, "w").write("\n".join(lines) + "\n")
log = f"{d}/localhost.log.config"
open(log, "w").write("version: 1\nroot: {level: WARNING, handlers: [console]}\nhandlers: {console: {class: logging.StreamHandler}}\ndisable_existing_loggers: false\n")
PY
  "$WORK/synapse-venv/bin/python" -m synapse.app.homeserver -c "$dir/homeserver.yaml" >"$WORK/synapse.log" 2>&1 &
  SYNAPSE_PID=$!
  wait_http "http://127.0.0.1:$SYNAPSE_PORT"
}

command -v curl >/dev/null || apt-get install -y -qq curl >/dev/null

for round in $(seq 1 "$ROUNDS"); do
  for server in hafen synapse; do
    echo "== round $round: $server"
    if [ $server = hafen ]; then
      start_hafen
      "$BENCH" --base-url "http://127.0.0.1:$HAFEN_PORT" --label hafen --registration-token bench \
        --pid "$HAFEN_PID" --scenarios "$SCENARIOS" --out "$OUT/hafen-$round.json" $BENCH_ARGS
      kill "$HAFEN_PID"; wait "$HAFEN_PID" 2>/dev/null || true; HAFEN_PID=
    else
      start_synapse
      "$BENCH" --base-url "http://127.0.0.1:$SYNAPSE_PORT" --label synapse \
        --pid "$SYNAPSE_PID" --scenarios "$SCENARIOS" --out "$OUT/synapse-$round.json" $BENCH_ARGS
      kill "$SYNAPSE_PID"; wait "$SYNAPSE_PID" 2>/dev/null || true; SYNAPSE_PID=
    fi
  done
done

SYNAPSE_VERSION=$("$WORK/synapse-venv/bin/python" -c 'import synapse; print(synapse.__version__)')
python3 scripts/bench-report.py "$OUT" "$ROUNDS" "$SYNAPSE_VERSION" "$("$HAFEN" --version)" \
  "ROUNDS=$ROUNDS SCENARIOS=$SCENARIOS BENCH_ARGS='$BENCH_ARGS' scripts/bench-vs-synapse.sh" > docs/benchmarks.md
echo "wrote docs/benchmarks.md"
