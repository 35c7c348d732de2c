#!/usr/bin/env bash
# Validates everything under deploy/ that has a schema or a checker, offline:
#
#   1. Kubernetes manifests (deploy/k8s, deploy/k8s/monitoring): every object
#      against the Kubernetes $K8S_VERSION OpenAPI schemas that the PyPI
#      package kubernetes-validate ships, strict (unknown fields are errors);
#      custom resources (KEDA, Prometheus Operator) against the CRDs vendored
#      in deploy/schemas/; each kustomization lists every manifest beside it.
#      With kubectl or kustomize on PATH, the rendered kustomizations too.
#   2. deploy/compose.yaml against the Compose Specification's JSON schema
#      (check-jsonschema's vendored copy); with the Docker Compose plugin
#      installed, `docker compose config` as well.
#   3. deploy/prometheus/alerts.yaml: `promtool check rules`, the unit tests
#      in alerts_test.yaml (`promtool test rules`), every nexus_* metric it
#      names is one the binaries register, and the PrometheusRule in
#      deploy/k8s/monitoring carries the same groups.
#
# Tools go into target/tools/deploy/ when missing: a Python venv with pinned
# kubernetes-validate and check-jsonschema (PyPI), and promtool from Debian's
# prometheus package (unpacked there, not installed: no service starts).
# Nothing is fetched at validation time. PROMTOOL=/path/to/promtool uses
# another promtool. The systemd units are checked by scripts/check-systemd.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=1.30.0
PY_PINS="kubernetes-validate==1.37.0 check-jsonschema==0.39.0"
tools=target/tools/deploy
venv=$tools/venv
failed=0
fail() { echo "check-deploy: FAILED: $*" >&2; failed=1; }

# --- tools -------------------------------------------------------------------
if [[ "$(cat "$venv/.pins" 2>/dev/null)" != "$PY_PINS" ]]; then
  echo "check-deploy: installing $PY_PINS into $venv"
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086
  "$venv/bin/pip" install --quiet --disable-pip-version-check $PY_PINS
  echo "$PY_PINS" >"$venv/.pins"
fi
py=$venv/bin/python

if [[ -z "${PROMTOOL:-}" ]]; then
  PROMTOOL=$PWD/$tools/prometheus/usr/bin/promtool
  if ! "$PROMTOOL" --version >/dev/null 2>&1; then
    echo "check-deploy: unpacking promtool from Debian's prometheus package into $tools/prometheus"
    SUDO=""; [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
    download=$(mktemp -d)
    if ! (cd "$download" && apt-get download prometheus >/dev/null 2>&1); then
      $SUDO apt-get update -qq
      (cd "$download" && apt-get download prometheus >/dev/null 2>&1)
    fi
    rm -rf "$tools/prometheus"
    dpkg-deb -x "$download"/prometheus_*.deb "$tools/prometheus"
    rm -rf "$download"
  fi
fi
echo "check-deploy: $("$PROMTOOL" --version 2>&1 | head -1)"

# --- 1. Kubernetes -----------------------------------------------------------
echo "check-deploy: Kubernetes manifests against Kubernetes $K8S_VERSION (strict) and the vendored CRDs"
"$py" deploy/schemas/validate_manifests.py --kubernetes-version "$K8S_VERSION" \
  deploy/k8s deploy/k8s/monitoring || fail "Kubernetes manifests"

render=""
if command -v kustomize >/dev/null; then
  render="kustomize build"
elif command -v kubectl >/dev/null && kubectl kustomize --help >/dev/null 2>&1; then
  render="kubectl kustomize"
fi
if [[ -n "$render" ]]; then
  for dir in deploy/k8s deploy/k8s/monitoring; do
    echo "check-deploy: $render $dir, then the rendered objects"
    if out=$($render "$dir" 2>&1); then
      # The objects were listed one by one above: show errors and the count.
      "$py" deploy/schemas/validate_manifests.py --kubernetes-version "$K8S_VERSION" - <<<"$out" \
        | grep -v '^ok ' || fail "rendered $dir"
    else
      echo "$out" >&2
      fail "$render $dir"
    fi
  done
else
  echo "check-deploy: no kustomize or kubectl here: the kustomizations are checked file by file only"
fi

# --- 2. Compose --------------------------------------------------------------
echo "check-deploy: deploy/compose.yaml against the Compose Specification schema"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose.yaml || fail "compose.yaml schema"
if docker compose version >/dev/null 2>&1; then
  for profile in offline cli; do
    docker compose -f deploy/compose.yaml --profile "$profile" config -q || fail "docker compose config ($profile)"
  done
  echo "check-deploy: docker compose config: ok"
else
  echo "check-deploy: no Docker Compose plugin here: schema check only"
fi

# --- 3. Prometheus -----------------------------------------------------------
"$PROMTOOL" check rules deploy/prometheus/alerts.yaml || fail "promtool check rules"
(cd deploy/prometheus && "$PROMTOOL" test rules alerts_test.yaml) || fail "promtool test rules"

# Each metric the rules name must be registered by a binary (the registries
# add the nexus_ prefix; counters are exposed with _total).
unknown=0
while read -r metric; do
  base=${metric#nexus_}
  base=${base%_total}; base=${base%_bucket}; base=${base%_count}; base=${base%_sum}
  if ! grep -q "\"$base\"" orchestrator/src/metrics.rs phase-worker/src/metrics.rs; then
    echo "check-deploy: $metric is not a metric the orchestrator or the worker registers" >&2
    unknown=1
  fi
done < <(grep -oh 'nexus_[a-z_]*' deploy/prometheus/alerts.yaml deploy/prometheus/alerts_test.yaml | sort -u)
if [[ $unknown -eq 0 ]]; then
  echo "check-deploy: every metric the rules name is registered by a binary"
else
  fail "alert rules name unknown metrics"
fi

"$py" - <<'EOF' || fail "deploy/k8s/monitoring/prometheusrule.yaml differs from deploy/prometheus/alerts.yaml"
import sys, yaml
plain = yaml.safe_load(open("deploy/prometheus/alerts.yaml"))["groups"]
wrapped = yaml.safe_load(open("deploy/k8s/monitoring/prometheusrule.yaml"))["spec"]["groups"]
if plain != wrapped:
    sys.exit("check-deploy: the PrometheusRule's groups are not those of alerts.yaml: copy them again")
print("check-deploy: the PrometheusRule carries exactly the groups of alerts.yaml")
EOF

if [[ $failed -ne 0 ]]; then
  echo "check-deploy: some checks failed (see above)" >&2
  exit 1
fi
echo "check-deploy: all deploy checks passed"
