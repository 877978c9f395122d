#!/usr/bin/env bash
# Installs the peers the benchmarks compare against.
#   bash bench/setup.sh          supervisor (PyPI) and PM2 (npm) into bench/.tools, and emp-agent as a host
#                                installs it (no test extras, not editable) into bench/.tools/agent, for
#                                bench/supervisors.py
#   bash bench/setup.sh --pull   nginx-light, curl and aria2 from the Debian archive (root), for bench/pull.py
set -euo pipefail
cd "$(dirname "$0")"
if [ "${1:-}" = "--pull" ]; then
  missing=""
  command -v nginx >/dev/null || missing="$missing nginx-light"
  command -v aria2c >/dev/null || missing="$missing aria2"
  command -v curl >/dev/null || missing="$missing curl"
  if [ -n "$missing" ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null
  fi
  nginx -v; aria2c --version | head -1; curl --version | head -1
  exit 0
fi
mkdir -p .tools
[ -x .tools/venv/bin/supervisord ] || { python3 -m venv .tools/venv && .tools/venv/bin/pip install -q supervisor==4.3.0; }
[ -x .tools/pm2/node_modules/.bin/pm2 ] || { mkdir -p .tools/pm2 && (cd .tools/pm2 && npm init -y >/dev/null && npm install --silent pm2@7.0.4); }
# Rebuilt every time: the benchmark measures the working tree as it is now.
rm -rf .tools/agent .tools/pycache && python3 -m venv .tools/agent && .tools/agent/bin/pip install -q -c ../constraints.txt ..
# Byte code at the unit's optimisation level, as bootstrap/install.sh compiles it for a host.
stdlib="$(.tools/agent/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
PYTHONPYCACHEPREFIX="$PWD/.tools/pycache" .tools/agent/bin/python -OO -m compileall -q -j 0 \
  -x '/(site-packages|dist-packages|test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/' "$stdlib" >/dev/null || true
PYTHONPYCACHEPREFIX="$PWD/.tools/pycache" .tools/agent/bin/python -OO -m compileall -q -j 0 \
  -x '/(tests?|pip|setuptools|_distutils_hack)/' .tools/agent/lib >/dev/null || true
.tools/agent/bin/emp-agent version
.tools/venv/bin/supervisord --version
.tools/pm2/node_modules/.bin/pm2 --version --no-daemon 2>/dev/null | tail -1 || true
