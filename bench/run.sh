#!/usr/bin/env bash
# Builds the release binaries and runs the benchmark against them. Pass
# --quick for the small smoke run (CI runs that one in the debug build),
# --only hop,throughput to pick figures, --fsync always or everysec for one
# Redis fsync mode (default: both, for the throughput figure), --repeat N for
# the runs each throughput number is the median of (default 3), and
# --skip-bullmq / --skip-celery to leave a peer out. The peers install
# themselves on first use: BullMQ with npm ci (node >= 20), Celery in a
# venv from PyPI (python3 >= 3.9); a peer that cannot is skipped with the
# reason printed.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
cargo build --release --bins
ulimit -n "$(ulimit -Hn)"   # 10,000 in-flight calls need as many sockets
./target/release/nexus-bench "$@"
