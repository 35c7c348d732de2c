#!/usr/bin/env bash
# Checks the contract in proto/ with buf: `buf lint` (style, rules and the
# reasoned exceptions in proto/buf.yaml) and `buf breaking` (nothing a client
# built from the previous version relies on has changed).
#
# What `buf breaking` compares with:
#   - uncommitted changes under proto/: the last commit (HEAD), so a change
#     is checked before it is committed;
#   - otherwise the commit before HEAD (HEAD~1), as CI sees a submission;
#   - NEXUS_PROTO_AGAINST=<git ref> overrides both (e.g. the commit a branch
#     started from, to check several commits at once).
# A shallow clone is deepened by one commit; where there is no earlier
# commit at all, the breaking check says so and is skipped.
#
# buf comes from npm (@bufbuild/buf, pinned below) into target/tools/buf;
# set BUF=/path/to/buf to use another.
set -euo pipefail
cd "$(dirname "$0")/.."

BUF_VERSION=1.75.0
if [[ -z "${BUF:-}" ]]; then
  tools=target/tools/buf
  BUF="$tools/node_modules/.bin/buf"
  if [[ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]]; then
    echo "check-proto: installing @bufbuild/buf@$BUF_VERSION into $tools"
    mkdir -p "$tools"
    npm install --prefix "$tools" --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION" >/dev/null
  fi
fi

"$BUF" lint proto
echo "check-proto: buf lint passed"

if [[ -n "${NEXUS_PROTO_AGAINST:-}" ]]; then
  against="$NEXUS_PROTO_AGAINST"
elif ! git diff --quiet HEAD -- proto; then
  against=HEAD
else
  against=HEAD~1
fi
commit() { git rev-parse --verify --quiet "$against^{commit}" || true; }
sha="$(commit)"
if [[ -z "$sha" && "$(git rev-parse --is-shallow-repository)" == true ]]; then
  echo "check-proto: shallow clone without $against; fetching one more commit"
  git fetch --quiet --deepen=1 || true
  sha="$(commit)"
fi
if [[ -z "$sha" ]]; then
  echo "check-proto: buf breaking SKIPPED: no commit $against to compare with (a single-commit or shallow clone; fetch more history or set NEXUS_PROTO_AGAINST)"
  exit 0
fi
"$BUF" breaking proto --against "$(git rev-parse --git-dir)#ref=$sha,subdir=proto"
echo "check-proto: buf breaking passed against $against (${sha:0:12})"
