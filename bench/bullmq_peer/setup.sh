#!/usr/bin/env bash
# Installs the BullMQ peer's packages (bench/bullmq_peer/node_modules) from
# package-lock.json with `npm ci`, the first time or when the lock file or
# the Node version changed; otherwise returns at once without the network.
#
# Usage: bench/bullmq_peer/setup.sh        (from anywhere)
# Prints nothing on stdout. Exit status: 0 ready, 3 Node or npm missing or
# too old (the bench prints a skip line with the reason), 1 install failed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
stamp="$here/node_modules/.nexus-bullmq-peer.stamp"

missing() {
    echo "bullmq_peer/setup.sh: $*" >&2
    exit 3
}
die() {
    echo "bullmq_peer/setup.sh: error: $*" >&2
    exit 1
}

command -v node >/dev/null 2>&1 || missing "node not found on PATH (Node >= 20 needed)"
command -v npm >/dev/null 2>&1 || missing "npm not found on PATH"
node_version="$(node -p 'process.versions.node' 2>/dev/null)" || missing "node does not run"
[ "${node_version%%.*}" -ge 20 ] 2>/dev/null || missing "Node >= 20 needed (ioredis 6), found $node_version"

want="$( (cat "$here/package-lock.json"; echo "node=$node_version") | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -d "$here/node_modules/bullmq" ]; then
    exit 0
fi

echo "bullmq_peer/setup.sh: npm ci in $here (node $node_version)" >&2
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
# --ignore-scripts: the only install script is msgpackr-extract's optional
# native speed-up, which msgpackr does without.
if ! (cd "$here" && npm ci --no-audit --no-fund --ignore-scripts --loglevel=error) >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "npm ci failed (is the npm registry reachable?)"
fi
(cd "$here" && node -e 'require("bullmq"); require("ioredis")') >/dev/null 2>&1 \
    || die "bullmq/ioredis not loadable after npm ci"
echo "$want" >"$stamp"
echo "bullmq_peer/setup.sh: ready" >&2
