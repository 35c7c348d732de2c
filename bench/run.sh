#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark against them. Pass
# --quick for the small smoke run (CI runs that one in the debug build),
# --only hop,throughput to pick figures, --skip-celery to leave Celery out.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
cargo build --release --bins
ulimit -n "$(ulimit -Hn)"   # 10,000 in-flight calls need as many sockets
./target/release/nexus-bench "$@"
