#!/usr/bin/env bash
# Instructions per phase of the worker, the orchestrator and (with --redis)
# redis-server, counted by callgrind: the same binaries and inputs give the
# same counts within a fraction of a percent, whatever else the machine is
# doing. On these shared 2-core machines a timed before/after of a change
# worth 5% is lost in run-to-run noise (the same binary ranges from 830 to
# 1,400 workflows/s within minutes); its instruction count is not.
#
#   bench/instructions.sh [--bin DIR] [--runs N] [--redis]
#
# Starts redis-server (AOF, appendfsync always), the stand-in answering at
# once with 8 words (the throughput figure's model), one orchestrator and
# one worker (NEXUS_THREADS=1, the response cache off, as in the bench),
# the measured processes under callgrind (the stand-in always, Redis with
# --redis); runs 5 workflows to warm up, zeroes the counters, runs N more
# (default 20) one after another with `nexus start --watch`, and divides each
# process's count by the phases. Also prints Redis calls per phase (INFO
# commandstats, calls inside scripts included) and AOF bytes per workflow.
# One run at a time: this measures the work per phase, not batching under
# load. The orchestrator's figure includes serving the CLI's start and watch;
# the stand-in's is not the engine's, but it shares the machine with it.
# To compare two builds, copy one's target/release binaries aside and pass
# --bin for each.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=target/release runs=20 redis=""
while [ $# -gt 0 ]; do
  case "$1" in
    --bin) bin=$2; shift 2 ;;
    --runs) runs=$2; shift 2 ;;
    --redis) redis=1; shift ;;
    *) echo "usage: $0 [--bin DIR] [--runs N] [--redis]" >&2; exit 2 ;;
  esac
done
command -v valgrind >/dev/null || { apt-get update -qq && apt-get install -y -qq valgrind >/dev/null; }
command -v redis-server >/dev/null || { apt-get update -qq && apt-get install -y -qq redis-server >/dev/null; }
[ -x "$bin/phase-worker" ] || cargo build --release --bins

dir=$(mktemp -d)
port=$((20000 + RANDOM % 20000))
export REDIS_URL="redis://127.0.0.1:$port"
export OPENROUTER_BASE_URL="http://127.0.0.1:$((port + 1))" OPENROUTER_API_KEY="sk-stand-in-not-a-real-key"
export NEXUS_ENDPOINT="http://127.0.0.1:$((port + 2))" NEXUS_THREADS=1 NEXUS_CACHE_TTL_SECS=0
pids=() counted_pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true' EXIT
counted() { # name, command...: the command under callgrind, its output in $dir/<name>.cg
  local name=$1; shift
  valgrind --tool=callgrind --callgrind-out-file="$dir/$name.cg" "$@" >"$dir/$name.log" 2>&1 &
  pids+=($!) counted_pids+=($!)
}
wait_for() { # log file, line
  for _ in $(seq 1 300); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.2; done
  echo "timed out waiting for '$2' in $1" >&2; tail -5 "$1" >&2; exit 1
}

redis_args=(--port "$port" --bind 127.0.0.1 --dir "$dir" --appendonly yes --appendfsync always --save "")
if [ -n "$redis" ]; then counted redis redis-server "${redis_args[@]}"; else
  redis-server "${redis_args[@]}" >"$dir/redis.log" 2>&1 & pids+=($!); fi
wait_for "$dir/redis.log" "Ready to accept connections"
counted stand-in "$bin/stand-in-model" --listen "127.0.0.1:$((port + 1))" --first-token-latency-ms 0 \
  --tokens-per-second 0 --reply-words 8
counted orchestrator "$bin/orchestrator" --listen "127.0.0.1:$((port + 2))"
counted worker "$bin/phase-worker" --consumer-name counted
wait_for "$dir/orchestrator.log" "orchestrator listening on"
wait_for "$dir/worker.log" "phase-worker ready"

run() { # count
  for n in $(seq 1 "$1"); do
    "$bin/nexus" start --name "Counted $n" --description "An online shop for furniture, with payments." \
      --watch >/dev/null || { echo "workflow $n failed" >&2; exit 1; }
  done
}
measured=(orchestrator worker); [ -n "$redis" ] && measured+=(redis); measured+=(stand-in)
run 5
for pid in "${counted_pids[@]}"; do callgrind_control -z "$pid" >/dev/null 2>&1; done
redis-cli -p "$port" CONFIG RESETSTAT >/dev/null
run "$runs"
commandstats=$(redis-cli -p "$port" INFO commandstats)
for pid in "${counted_pids[@]}"; do callgrind_control -d "$pid" >/dev/null 2>&1; done
sleep 1
phases=$((runs * 6))
echo "instructions per phase, callgrind, $runs six-phase workflows one at a time ($bin):"
for name in "${measured[@]}"; do
  dump=$(ls -t "$dir/$name.cg"* | grep -v '\.cg$' | head -1)
  total=$(callgrind_annotate "$dump" 2>/dev/null | awk '/PROGRAM TOTALS/ {gsub(",", "", $1); print $1; exit}')
  printf '  %-13s %9d   (profile: callgrind_annotate --inclusive=yes %s)\n' "$name" $((total / phases)) "$dump"
done
echo "  redis calls per phase (INFO commandstats, script-internal calls included):"
echo "$commandstats" | awk -F'[:=,]' -v phases="$phases" '/^cmdstat_/ {
  sub("cmdstat_", "", $1); printf "    %-22s %6.2f\n", $1, $3 / phases }' | sort -k2 -rn
aof_bytes=$(cat "$dir"/appendonlydir/*.incr.aof | wc -c)
echo "  AOF           $((aof_bytes / (runs + 5))) bytes per workflow"
