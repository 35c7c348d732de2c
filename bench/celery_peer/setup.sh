#!/usr/bin/env bash
# Creates (or refreshes) the Python venv that runs the Celery peer of the
# Nexus benchmark: <repo>/bench/.venv with bench/celery_peer/requirements.txt
# installed. Idempotent: when the venv already matches requirements.txt (a
# stamp file holds the hash of requirements.txt and the Python version), it
# returns at once without touching the network.
#
# Usage: bench/celery_peer/setup.sh        (from anywhere)
# Env:   PYTHON=python3.11 to choose the interpreter (default: python3)
# Prints nothing on stdout; a line or two of progress on stderr when it has
# work to do, and pip's output only when pip fails.
set -euo pipefail

die() {
    echo "celery_peer/setup.sh: error: $*" >&2
    exit 1
}

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_root="$(cd "$script_dir/../.." && pwd)"
venv="$repo_root/bench/.venv"
requirements="$script_dir/requirements.txt"
stamp="$venv/.celery_peer.stamp"
python="${PYTHON:-python3}"

[ -f "$requirements" ] || die "missing $requirements"
command -v "$python" >/dev/null 2>&1 || die "'$python' not found on PATH (set PYTHON=...)"

py_version="$("$python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null)" \
    || die "'$python' does not run"
case "$py_version" in
    3.9.* | 3.[1-9][0-9].*) ;;
    *) die "Python >= 3.9 needed, '$python' is $py_version" ;;
esac

want="$( (cat "$requirements"; echo "python=$py_version") | sha256sum | cut -d' ' -f1)"

# Fast path: venv present, its python runs, and the stamp matches.
if [ -x "$venv/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$venv/bin/python" -c 'import importlib.util as u, sys; sys.exit(u.find_spec("celery") is None)' >/dev/null 2>&1; then
    exit 0
fi

# A venv made by another Python version cannot be reused: start over.
if [ -e "$venv" ]; then
    have_py="$("$venv/bin/python" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true)"
    if [ "$have_py" != "$py_version" ]; then
        echo "celery_peer/setup.sh: recreating $venv (python '${have_py:-broken}' -> '$py_version')" >&2
        rm -rf "$venv"
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    echo "celery_peer/setup.sh: creating venv $venv with $python $py_version" >&2
    mkdir -p "$(dirname "$venv")"
    "$python" -m venv "$venv" \
        || die "'$python -m venv' failed (on Debian: apt-get install python3-venv)"
    # Keep the venv out of git without editing the repo's .gitignore
    # (Python >= 3.13 writes this file itself).
    echo '*' >"$venv/.gitignore"
fi

echo "celery_peer/setup.sh: installing $(basename "$requirements") into $venv" >&2
rm -f "$stamp"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
if ! "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        --no-input -r "$requirements" >"$log" 2>&1; then
    cat "$log" >&2
    die "pip install -r $requirements failed (is PyPI reachable?)"
fi
"$venv/bin/python" -c 'import celery, redis' >/dev/null 2>&1 \
    || die "celery/redis not importable after install"

echo "$want" >"$stamp"
echo "celery_peer/setup.sh: ready: $venv/bin/python" >&2
