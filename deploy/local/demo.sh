#!/usr/bin/env bash
# One command from a fresh checkout to a finished workflow: brings the stack
# up (deploy/local/up.sh), submits examples/plan.txt, shows every phase live
# as the models write it, and prints the final plan and its rating. The stack
# keeps running afterwards for grpcurl and the nexus CLI; stop it with
# deploy/local/down.sh.
set -euo pipefail
source "$(dirname "$0")/env.sh"
export NEXUS_WEB="${NEXUS_WEB:-1}" # the orchestrator serves the web tracker too
"$(dirname "$0")/up.sh"
echo
"$BIN/nexus" start --name "Werkbank online shop" \
  --description-file "$NEXUS_HOME/examples/plan.txt" \
  --field budget="120k EUR" --field timeline="6 months" --watch
echo
echo "The stack is still running. Try:"
echo "  $BIN/nexus list"
echo "  http://127.0.0.1:$NEXUS_GRPC_PORT/   (the web tracker, in a browser)"
echo "  grpcurl -plaintext 127.0.0.1:$NEXUS_GRPC_PORT list"
echo "Stop it with: deploy/local/down.sh"
