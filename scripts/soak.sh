#!/usr/bin/env bash
# The soak test: NEXUS_SOAK_WORKFLOWS (300) workflows on 3 workers and 2
# orchestrators while a random one is SIGKILLed every 2 s. Prints
# "workflows=N kills=K lost=0 duplicated=0 completed=C failed=F".
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
cargo test -p nexus-tests --test soak -- --ignored --nocapture "$@"
