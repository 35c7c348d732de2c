#!/usr/bin/env bash
# Stops the processes deploy/local/up.sh started. Redis data stays in
# .nexus-data/redis, so a later up.sh resumes every accepted workflow.
set -uo pipefail
source "$(dirname "$0")/env.sh"
quiet=${1:-}
for pidfile in "$NEXUS_DATA"/*.pid; do
  [ -e "$pidfile" ] || continue
  pid=$(cat "$pidfile")
  if kill "$pid" 2>/dev/null; then
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
    [ "$quiet" = --quiet ] || echo "stopped $(basename "$pidfile" .pid) ($pid)"
  fi
  rm -f "$pidfile"
done
