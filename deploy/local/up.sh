#!/usr/bin/env bash
# Brings up Nexus as plain processes on this machine: Redis (AOF, fsync
# always) in .nexus-data/, the stand-in model unless OPENROUTER_API_KEY is set,
# one orchestrator and NEXUS_WORKERS phase workers. Logs and pids go to
# .nexus-data/. Stop everything with deploy/local/down.sh.
set -euo pipefail
source "$(dirname "$0")/env.sh"
mkdir -p "$NEXUS_DATA/redis" "$NEXUS_DATA/logs"

if ! command -v redis-server >/dev/null; then
  echo "installing redis-server (Debian package)…"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq && $SUDO apt-get install -y -qq redis-server >/dev/null
fi

echo "building Nexus ($NEXUS_PROFILE)…"
if [ "$NEXUS_PROFILE" = release ]; then
  (cd "$NEXUS_HOME" && cargo build --release --bins -q)
else
  (cd "$NEXUS_HOME" && cargo build --bins -q)
fi

"$(dirname "$0")/down.sh" --quiet || true

start() { # name, command...
  local name=$1; shift
  nohup "$@" >"$NEXUS_DATA/logs/$name.log" 2>&1 &
  echo $! >"$NEXUS_DATA/$name.pid"
}

wait_for_line() { # file, text
  for _ in $(seq 1 300); do
    grep -q "$2" "$1" 2>/dev/null && return 0
    sleep 0.1
  done
  echo "timed out waiting for '$2' in $1" >&2; tail -20 "$1" >&2; exit 1
}

start redis redis-server --port "$NEXUS_REDIS_PORT" --bind 127.0.0.1 --dir "$NEXUS_DATA/redis" \
  --appendonly yes --appendfsync always --save ""
wait_for_line "$NEXUS_DATA/logs/redis.log" "Ready to accept connections"
echo "redis         $REDIS_URL (AOF, appendfsync always, data in $NEXUS_DATA/redis)"

if [ -z "${OPENROUTER_API_KEY:-}" ]; then
  start stand-in "$BIN/stand-in-model" --listen "127.0.0.1:$NEXUS_STAND_IN_PORT"
  wait_for_line "$NEXUS_DATA/logs/stand-in.log" "listening on"
  export OPENROUTER_BASE_URL="http://127.0.0.1:$NEXUS_STAND_IN_PORT"
  export OPENROUTER_API_KEY="sk-stand-in-not-a-real-key"
  echo "model         stand-in at $OPENROUTER_BASE_URL (OPENROUTER_API_KEY not set; its answers say so)"
else
  echo "model         OpenRouter at ${OPENROUTER_BASE_URL:-https://openrouter.ai}"
fi

start orchestrator "$BIN/orchestrator" --listen "127.0.0.1:$NEXUS_GRPC_PORT"
wait_for_line "$NEXUS_DATA/logs/orchestrator.log" "orchestrator listening on"
echo "orchestrator  $NEXUS_ENDPOINT (gRPC, reflection, health)"

for n in $(seq 1 "$NEXUS_WORKERS"); do
  start "worker-$n" "$BIN/phase-worker" --consumer-name "local-worker-$n"
  wait_for_line "$NEXUS_DATA/logs/worker-$n.log" "phase-worker ready"
done
echo "workers       $NEXUS_WORKERS phase workers"
echo "logs          $NEXUS_DATA/logs/"
