# Shared settings of the local process scripts (sourced, not run).
# Override any of them in the environment before calling up.sh.
NEXUS_HOME="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NEXUS_DATA="${NEXUS_DATA:-$NEXUS_HOME/.nexus-data}"
NEXUS_REDIS_PORT="${NEXUS_REDIS_PORT:-6390}"
NEXUS_GRPC_PORT="${NEXUS_GRPC_PORT:-50051}"
NEXUS_STAND_IN_PORT="${NEXUS_STAND_IN_PORT:-8089}"
NEXUS_WORKERS="${NEXUS_WORKERS:-2}"
NEXUS_PROFILE="${NEXUS_PROFILE:-debug}"
BIN="$NEXUS_HOME/target/$NEXUS_PROFILE"
export REDIS_URL="redis://127.0.0.1:$NEXUS_REDIS_PORT"
export NEXUS_ENDPOINT="http://127.0.0.1:$NEXUS_GRPC_PORT"
