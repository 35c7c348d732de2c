#!/usr/bin/env bash
# Generates the Python client of the Nexus API from proto/ into gen/ (not
# checked in): the messages (workflow_pb2) and the service stub
# (workflow_pb2_grpc). Needs grpcio-tools (requirements.txt).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$here/../.."
rm -rf "$here/gen" && mkdir -p "$here/gen"
python3 -m grpc_tools.protoc -I "$root/proto" \
  --python_out="$here/gen" --grpc_python_out="$here/gen" \
  "$root/proto/nexus/v1/workflow.proto"
echo "generated $here/gen/nexus/v1/workflow_pb2.py and workflow_pb2_grpc.py"
