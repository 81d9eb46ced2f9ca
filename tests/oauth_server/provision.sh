#!/usr/bin/env bash
# Installs the test authorization server (tests/oauth_server/server.py) into
# a Python venv, with the packages pinned in requirements.txt beside this
# script. Does nothing if that venv already has exactly those pins.
#
#   bash tests/oauth_server/provision.sh [VENV]   (default: target/tmp/oauth-server-venv)
#
# The tests (tests/oauth2_real_server.rs) run this themselves when the venv
# is missing or stale; .ci/run runs it first so that a failure shows plainly.
# Needs python3 (>= 3.10) with its venv module, and PyPI.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-"$here/../../target/tmp/oauth-server-venv"}
requirements="$here/requirements.txt"
stamp="$venv/epochflight-requirements.txt"

mkdir -p "$(dirname "$venv")"
# One provisioning at a time (parallel test binaries, CI and a developer).
exec 9>"$venv.lock"
flock 9

if [ -x "$venv/bin/python" ] && cmp -s "$stamp" "$requirements"; then
  exit 0
fi
if ! command -v python3 >/dev/null; then
  echo "provision.sh: python3 not found; on Debian: apt-get install -y python3 python3-venv" >&2
  exit 1
fi
rm -rf "$venv"
if ! python3 -m venv "$venv"; then
  echo "provision.sh: 'python3 -m venv' failed; on Debian: apt-get install -y python3-venv" >&2
  exit 1
fi
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-input -r "$requirements"
"$venv/bin/python" -c "import django, oauth2_provider; print('test authorization server:', 'Django', django.get_version(), '+ django-oauth-toolkit', oauth2_provider.__version__)"
cp "$requirements" "$stamp"
