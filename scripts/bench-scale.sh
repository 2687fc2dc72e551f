#!/usr/bin/env bash
# The scale scenario against Hafen alone: grows one server (release build, durable writes) to
# SCALE_USERS users, SCALE_ROOMS rooms and SCALE_EVENTS messages through the Client-Server API,
# measuring at 10%, 25%, 50% and 100% of that size, and writes docs/benchmarks-scale.md.
# Synapse is not run here: at its send rate (about 40 messages/s in docs/benchmarks.md) a
# million messages would take seven hours.
#
# Usage: scripts/bench-scale.sh
#        SCALE_USERS=1000 SCALE_ROOMS=100 SCALE_EVENTS=100000 scripts/bench-scale.sh
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE_USERS=${SCALE_USERS:-10000}
SCALE_ROOMS=${SCALE_ROOMS:-1000}
SCALE_EVENTS=${SCALE_EVENTS:-1000000}
WORK=${BENCH_WORK:-$HOME/.cache/hafen-bench}
OUT=${BENCH_OUT:-$WORK/results}
HAFEN_PORT=18108
mkdir -p "$WORK" "$OUT"
source scripts/setup-debian.sh
source scripts/bench-common.sh
export PATH="$HOME/.cargo/bin:$PATH"
command -v curl >/dev/null || apt-get install -y -qq curl >/dev/null

export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/hafen-release}
cargo build --release -p hafen --bin hafen -p hafen-bench
HAFEN="$CARGO_TARGET_DIR/release/hafen"
BENCH="$CARGO_TARGET_DIR/release/hafen-bench"

cleanup() { [ -n "${HAFEN_PID:-}" ] && kill "$HAFEN_PID" 2>/dev/null || true; }
trap cleanup EXIT
start_hafen
"$BENCH" --base-url "http://127.0.0.1:$HAFEN_PORT" --label hafen --registration-token bench \
  --pid "$HAFEN_PID" --scenarios scale --data-dir "$WORK/hafen/db" \
  --scale-users "$SCALE_USERS" --scale-rooms "$SCALE_ROOMS" --scale-events "$SCALE_EVENTS" \
  --out "$OUT/scale.json"
kill "$HAFEN_PID"; wait "$HAFEN_PID" 2>/dev/null || true; HAFEN_PID=

python3 scripts/bench-scale-report.py "$OUT/scale.json" "$("$HAFEN" --version)" \
  "SCALE_USERS=$SCALE_USERS SCALE_ROOMS=$SCALE_ROOMS SCALE_EVENTS=$SCALE_EVENTS scripts/bench-scale.sh" \
  > docs/benchmarks-scale.md
echo "wrote docs/benchmarks-scale.md"
