#!/usr/bin/env bash
# Installs the outside clients Burrow's tests drive through real tunnels, from the public
# registries, pinned by tests/clients/package-lock.json and tests/clients/requirements.txt:
# Node's ws, socket.io, express and playwright-core; Python websockets; Debian's chromium.
# Idempotent: skips what is already there.
set -euo pipefail
cd "$(dirname "$0")/../tests/clients"

apt_install() {
  if [ "$(id -u)" != 0 ]; then
    echo "warning: $* missing and not root; install it with apt-get" >&2
    return 0
  fi
  if [ -z "${APT_UPDATED:-}" ]; then apt-get update -qq >/dev/null; APT_UPDATED=1; fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

command -v node >/dev/null 2>&1 || { echo "==> installing nodejs"; apt_install nodejs npm; }
command -v chromium >/dev/null 2>&1 || { echo "==> installing chromium"; apt_install chromium; }
command -v tmux >/dev/null 2>&1 || { echo "==> installing tmux"; apt_install tmux; }

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "==> npm ci (tests/clients)"
  npm ci --no-audit --no-fund --loglevel=error
fi

if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import websockets' 2>/dev/null; then
  echo "==> python venv with pinned websockets (tests/clients/.venv)"
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements.txt
fi
