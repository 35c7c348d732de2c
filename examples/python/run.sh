#!/usr/bin/env bash
# Sets up a virtual environment with requirements.txt (once, in .venv),
# generates the client from proto/, and runs client.py with the arguments
# given: ./examples/python/run.sh --endpoint 127.0.0.1:50051
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
venv="${NEXUS_PYTHON_VENV:-$here/.venv}"
if ! "$venv/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q -r "$here/requirements.txt"
fi
PATH="$venv/bin:$PATH" "$here/generate.sh" >/dev/null
exec "$venv/bin/python" "$here/client.py" "$@"
