#!/usr/bin/env bash
# Create tests/python/.venv and install the hash-pinned lockfile into it.
#
# Idempotent and quiet: the sha256 of requirements.txt (plus the interpreter
# version) is stored in .venv/.requirements.sha256 after a successful install,
# and the install is skipped when it has not changed. Delete .venv to force a
# fresh one.
#
# Environment:
#   PYTHON   interpreter used to create the venv (default: python3.11, else python3;
#            it must be Python >= 3.11)
#   VERBOSE  set to 1 to let pip print its progress
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
venv="$here/.venv"
lock="$here/requirements.txt"
stamp="$venv/.requirements.sha256"

if [[ -z "${PYTHON:-}" ]]; then
    if command -v python3.11 >/dev/null 2>&1; then
        PYTHON=python3.11
    else
        PYTHON=python3
    fi
fi

if ! "$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' 2>/dev/null; then
    echo "setup.sh: $PYTHON is missing or older than Python 3.11" >&2
    exit 1
fi

# Integration tests may run this concurrently: one at a time.
exec 9>"$here/.venv.lock"
flock 9

quiet=(-q)
if [[ "${VERBOSE:-0}" == 1 ]]; then
    quiet=()
fi

# A venv whose interpreter no longer runs (e.g. the base Python was removed) is rebuilt.
if [[ -d "$venv" ]] && ! "$venv/bin/python" -c 'pass' >/dev/null 2>&1; then
    rm -rf "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    "$PYTHON" -m venv "$venv"
fi

want="$( (sha256sum "$lock" | cut -d' ' -f1; "$venv/bin/python" -c 'import sys; print(sys.version)') | sha256sum | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    exit 0
fi

# --require-hashes: every package, dependencies included, must be pinned with a hash in
# the lockfile (pip refuses anything else). Wheels only: nothing is built from source.
PIP_DISABLE_PIP_VERSION_CHECK=1 "$venv/bin/python" -m pip install "${quiet[@]}" \
    --require-hashes --only-binary=:all: -r "$lock"
rm -f "$stamp"
echo "$want" >"$stamp"
