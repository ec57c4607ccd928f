#!/usr/bin/env bash
# Runs every server scenario of the pinned MCP conformance suite against URL and exits non-zero
# if any check fails (or the suite itself errors). Extra arguments go to the conformance CLI,
# e.g. `--scenario tools-call-with-progress` to run a single scenario.
#
#   tests/node/run-conformance-server.sh http://127.0.0.1:PORT/mcp [conformance args...]
#   tests/node/run-conformance-server.sh --self [conformance args...]   # against our own fixture
#
# Needs `npm ci` in tests/node first. Uses the Node 22 from node_modules: the conformance CLI
# crashes on the machine's Node 20.
set -uo pipefail

if [ $# -lt 1 ]; then
  echo "usage: $0 URL|--self [conformance args...]" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")" && pwd)
node22="$here/node_modules/.bin/node"
cli="$here/node_modules/@modelcontextprotocol/conformance/dist/index.js"
if [ ! -x "$node22" ] || [ ! -f "$cli" ]; then
  echo "missing node_modules: run 'npm ci' in $here" >&2
  exit 2
fi

out=$(mktemp -d)
fixture_pid=
trap '[ -n "$fixture_pid" ] && kill "$fixture_pid" 2>/dev/null; rm -rf "$out"' EXIT

url=$1
shift
if [ "$url" = --self ]; then
  "$node22" "$here/fixture-server.mjs" --http 0 >"$out/fixture.out" 2>"$out/fixture.err" &
  fixture_pid=$!
  url=
  for _ in $(seq 100); do
    url=$(sed -n 's/^listening //p' "$out/fixture.out")
    [ -n "$url" ] && break
    sleep 0.1
  done
  if [ -z "$url" ]; then
    echo "fixture did not start:" >&2
    cat "$out/fixture.err" >&2
    exit 1
  fi
fi

# --suite all: the default "active" suite leaves out json-schema-2020-12 and server-sse-polling.
"$node22" "$cli" server --url "$url" --suite all --output-dir "$out/results" "$@" >"$out/log" 2>&1
cli_status=$?

# Per-scenario verdicts from the saved checks (the CLI's own summary does not show warnings).
"$node22" --input-type=module - "$out/results" "$cli_status" <<'EOF'
import { readdirSync, readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';

const [dir, cliStatus] = process.argv.slice(2);
const results = existsSync(dir) ? readdirSync(dir).sort() : [];
let passed = 0, failed = 0, checksPassed = 0, checksFailed = 0, warnings = 0;
for (const name of results) {
  const scenario = name.replace(/^server-/, '').replace(/-\d{4}-\d\d-\d\dT[\d-]+Z$/, '');
  const checks = JSON.parse(readFileSync(join(dir, name, 'checks.json'), 'utf8'));
  const bad = checks.filter((c) => c.status === 'FAILURE');
  const warn = checks.filter((c) => c.status === 'WARNING');
  checksPassed += checks.filter((c) => c.status === 'SUCCESS').length;
  checksFailed += bad.length;
  warnings += warn.length;
  bad.length ? failed++ : passed++;
  console.log(`${bad.length ? 'FAIL' : 'ok  '} ${scenario}${warn.length ? ` (${warn.length} warning${warn.length > 1 ? 's' : ''})` : ''}`);
  for (const c of [...bad, ...warn]) console.log(`       ${c.status} ${c.id}: ${c.errorMessage ?? c.description}`);
}
if (cliStatus !== '0' && failed === 0) {
  // The CLI failed without a failing saved check: a scenario crashed before saving its results.
  console.log('FAIL the conformance CLI exited with status ' + cliStatus);
  failed++;
}
console.log(`checks: ${checksPassed} passed, ${checksFailed} failed, ${warnings} warnings`);
console.log(`conformance: ${passed} passed, ${failed} failed`);
process.exit(failed ? 1 : 0);
EOF
status=$?
if [ $status -ne 0 ]; then
  echo "--- conformance CLI output ---"
  cat "$out/log"
fi
exit $status
