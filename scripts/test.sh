#!/usr/bin/env bash
# Runs the whole test suite: unit tests, and the integration tests in tests/ (real server over
# real HTTP on loopback, real RocksDB in temp dirs, the matrix-sdk client, the real binary killed
# with SIGKILL and restarted, a real Synapse as federation peer).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup-debian.sh
# The real Synapse the interop tests (tests/integration/synapse.rs) federate with: a venv made
# once and reused (about 20 s the first time); exports HAFEN_SYNAPSE_VENV, which also makes those
# tests fail rather than skip if Synapse is missing.
source scripts/synapse-venv.sh
export PATH="$HOME/.cargo/bin:$PATH"
export CARGO_TERM_COLOR=never
# Build outputs are kept outside the checkout so that a fresh clone on the same machine (CI)
# reuses compiled dependencies (RocksDB's C++ alone takes a quarter of an hour on 2 cores).
# On a new machine the directory is simply empty and everything is built.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/hafen-target}
# Dependency audit (REQUIREMENTS.md D5, docs/security-updates.md): yanked crates and RustSec
# advisories affecting Cargo.lock fail the run.
python3 scripts/dep-audit.py --self-test
python3 scripts/dep-audit.py
# Formatting and lints are part of the suite: unformatted code or any clippy warning fails it.
# (A toolchain installed by setup-debian.sh with the minimal profile lacks them: add them then.)
if ! cargo clippy --version >/dev/null 2>&1 || ! cargo fmt --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The crash test starts the real binary: build it first so the test does not time out building.
cargo build --bin hafen
cargo test --no-fail-fast -- --test-threads 4
