#!/usr/bin/env bash
# From a fresh checkout to a running development EST server on https://127.0.0.1:8445:
# a virtualenv with the runtime set (requirements.txt, hash-checked) and est_app editable,
# `est-admin init` (development CA, TLS certificate, database, instance/config.yaml), a first
# user, then est-server.
# The user's password is taken from $EST_PASSWORD, or generated and printed once.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq python3-venv; else
    echo "python3-venv is missing: sudo apt-get install python3-venv" >&2; exit 1; fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q --require-hashes -r requirements.txt
.venv/bin/pip install -q --no-deps -e .  # hash-checking mode refuses `-e .` in the same call
.venv/bin/est-admin init --dir instance
export EST_CONFIG="$PWD/instance/config.yaml"
if ! .venv/bin/est-admin user list | cut -f1 | grep -qx gateway; then
  password="${EST_PASSWORD:-$(.venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(18))')}"
  printf '%s\n' "$password" | .venv/bin/est-admin user add gateway
  [ -n "${EST_PASSWORD:-}" ] || echo "EST user 'gateway' has password: $password  (shown once; change it with est-admin user passwd gateway)"
fi
exec .venv/bin/est-server --config "$EST_CONFIG"
