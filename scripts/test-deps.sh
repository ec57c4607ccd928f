#!/usr/bin/env bash
# Installs what the integration tests drive, pinned by lockfiles: the Node packages in
# tests/node (the official TypeScript SDK, server-everything, the conformance suite and Node 22)
# and the Python venv in tests/python (the official Python SDK). Re-runs are no-ops until a
# lockfile changes.
set -euo pipefail
cd "$(dirname "$0")/.."

lock=tests/node/package-lock.json
stamp=tests/node/node_modules/.portcullis-lock.sha256
want=$(sha256sum "$lock" | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "test-deps: npm ci in tests/node" >&2
  (cd tests/node && npm ci --no-audit --no-fund --loglevel=error)
  echo "$want" > "$stamp"
fi
tests/node/node_modules/.bin/node --version | grep -q '^v22\.' || {
  echo "test-deps: tests/node/node_modules/.bin/node is not Node 22" >&2
  exit 1
}

tests/python/setup.sh
