#!/usr/bin/env bash
# Installs the peers the benchmark compares against into bench/.tools: supervisor (PyPI) and PM2 (npm).
set -euo pipefail
cd "$(dirname "$0")"
mkdir -p .tools
[ -x .tools/venv/bin/supervisord ] || { python3 -m venv .tools/venv && .tools/venv/bin/pip install -q supervisor; }
[ -x .tools/pm2/node_modules/.bin/pm2 ] || { mkdir -p .tools/pm2 && (cd .tools/pm2 && npm init -y >/dev/null && npm install --silent pm2); }
.tools/venv/bin/supervisord --version
.tools/pm2/node_modules/.bin/pm2 --version --no-daemon 2>/dev/null | tail -1 || true
