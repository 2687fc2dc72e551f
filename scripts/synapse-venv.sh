#!/usr/bin/env bash
# Installs the Synapse that the interop tests (tests/integration/synapse.rs) run as a federation
# peer: a Python venv with matrix-synapse from PyPI at
# ${HAFEN_SYNAPSE_VENV:-$HOME/.cache/hafen-synapse-venv}. Debian's python3 and python3-venv are
# installed first when missing (as root, or with sudo). Idempotent: when the venv holds the pinned
# version it returns at once. Can be sourced (scripts/test.sh does; it then exports
# HAFEN_SYNAPSE_VENV) or run on its own.
#
# Usage: scripts/synapse-venv.sh        (HAFEN_SYNAPSE_VENV=/elsewhere to choose the place)
set -euo pipefail

SYNAPSE_VERSION=1.163.2
HAFEN_SYNAPSE_VENV=${HAFEN_SYNAPSE_VENV:-$HOME/.cache/hafen-synapse-venv}
export HAFEN_SYNAPSE_VENV

# The venv is complete only once this stamp names the pinned version: it is written last, so an
# install cut short is redone from scratch.
_synapse_stamp="$HAFEN_SYNAPSE_VENV/.hafen-synapse-version"

_synapse_venv_ready() {
  [ -x "$HAFEN_SYNAPSE_VENV/bin/python" ] &&
    [ "$(cat "$_synapse_stamp" 2>/dev/null)" = "$SYNAPSE_VERSION" ]
}

if ! _synapse_venv_ready; then
  _synapse_need=()
  for pkg in python3 python3-venv; do
    dpkg -s "$pkg" >/dev/null 2>&1 || _synapse_need+=("$pkg")
  done
  if [ ${#_synapse_need[@]} -gt 0 ]; then
    echo "synapse-venv: installing ${_synapse_need[*]}"
    _synapse_sudo=""; [ "$(id -u)" -ne 0 ] && _synapse_sudo="sudo"
    $_synapse_sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $_synapse_sudo apt-get install -y -qq "${_synapse_need[@]}" >/dev/null
  fi

  mkdir -p "$(dirname "$HAFEN_SYNAPSE_VENV")"
  # Two runs at once (two checkouts testing) must not build the same venv together.
  exec 9>"$HAFEN_SYNAPSE_VENV.lock"
  flock 9
  if ! _synapse_venv_ready; then
    echo "synapse-venv: installing matrix-synapse $SYNAPSE_VERSION into $HAFEN_SYNAPSE_VENV"
    _synapse_start=$(date +%s)
    rm -rf "$HAFEN_SYNAPSE_VENV"
    # Debian's interpreter, not whatever python3 comes first in PATH, so every machine gets the same.
    /usr/bin/python3 -m venv "$HAFEN_SYNAPSE_VENV"
    "$HAFEN_SYNAPSE_VENV/bin/pip" install -q --disable-pip-version-check \
      "matrix-synapse==$SYNAPSE_VERSION"
    "$HAFEN_SYNAPSE_VENV/bin/python" -c 'import synapse.app.homeserver'
    echo "$SYNAPSE_VERSION" >"$_synapse_stamp"
    echo "synapse-venv: done in $(($(date +%s) - _synapse_start)) s"
  fi
  flock -u 9
  exec 9>&-
fi
