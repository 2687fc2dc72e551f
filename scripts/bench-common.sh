# Shared by the benchmark scripts (sourced): start a release Hafen with durable writes on
# loopback, and wait for a server to answer. Needs HAFEN, WORK and HAFEN_PORT set.

start_hafen() {
  local dir="$WORK/hafen"
  rm -rf "$dir"; mkdir -p "$dir"
  cat > "$dir/conduit-config.toml" <<TOML
[global]
server_name = "localhost"
port = $HAFEN_PORT
database_path = "$dir/db"
database_sync_writes = true
registration_token = "bench"
log = "warn"
[global.rate_limits]
enabled = false
TOML
  "$HAFEN" --config "$dir/conduit-config.toml" serve >"$WORK/hafen.log" 2>&1 &
  HAFEN_PID=$!
  wait_http "http://127.0.0.1:$HAFEN_PORT"
}

wait_http() {
  for _ in $(seq 1 300); do
    curl -sf "$1/_matrix/client/versions" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "server at $1 did not start" >&2; exit 1
}

