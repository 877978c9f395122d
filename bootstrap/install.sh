#!/usr/bin/env bash
# Installs emp-agent on a host, or upgrades it: the emp-agent account, a venv in /opt/emp-agent, the systemd
# unit, the shipped profiles and a default config, then enables the unit. Safe to run twice: the second run
# changes nothing unless the package version changed (then the agent is restarted), and operator edits under
# /etc/emp-agent are never overwritten.
#
#   install.sh [--wheelhouse DIR] [--package SPEC] [--no-start] [--prefix DIR]
#
#   --wheelhouse DIR   install offline from wheels in DIR (emp-agent, its dependencies, optionally systemd-python)
#   --package SPEC     what to install from the index (default: emp-agent) or a path to a wheel
#   --no-start         enable the unit but do not start it (image bakes)
#   --prefix DIR       where the venv goes (default /opt/emp-agent; the unit expects the default)
set -euo pipefail

prefix=/opt/emp-agent
wheelhouse=""
package="emp-agent"
start=1
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse|--package|--prefix)
      [ $# -ge 2 ] || { echo "install.sh: $1 needs a value (see --help)" >&2; exit 2; } ;;&
    --wheelhouse) wheelhouse="$2"; shift 2 ;;
    --package) package="$2"; shift 2 ;;
    --no-start) start=0; shift ;;
    --prefix) prefix="$2"; shift 2 ;;
    -h|--help) sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

say() { echo "install.sh: $*"; }
[ "$(id -u)" = 0 ] || { echo "install.sh: run as root" >&2; exit 2; }
if [ -n "$wheelhouse" ] && [ ! -d "$wheelhouse" ]; then
  echo "install.sh: wheelhouse $wheelhouse is not a directory" >&2; exit 2
fi

python=""
for candidate in python3.13 python3.12 python3.11 python3; do
  if command -v "$candidate" >/dev/null 2>&1 &&
     "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    python="$candidate"; break
  fi
done
[ -n "$python" ] || { echo "install.sh: emp-agent needs Python 3.11 or newer" >&2; exit 1; }
if ! "$python" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1; then
    say "installing python3-venv"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv >/dev/null
  else
    echo "install.sh: the Python venv module is missing" >&2; exit 1
  fi
fi

# The account: sysusers.d when systemd has it, plain useradd otherwise (same result).
if ! getent group emp-agent >/dev/null; then groupadd --system emp-agent; say "created group emp-agent"; fi
if ! getent passwd emp-agent >/dev/null; then
  useradd --system --gid emp-agent --home-dir /var/lib/emp-agent --no-create-home --shell /usr/sbin/nologin \
    --comment "emp-agent GPU host agent" emp-agent
  say "created user emp-agent"
fi
if getent group video >/dev/null && ! id -nG emp-agent | tr ' ' '\n' | grep -qx video; then
  usermod -aG video emp-agent
fi

# The venv and the package.
[ -x "$prefix/bin/python" ] || { "$python" -m venv "$prefix"; say "created $prefix"; }
before="$("$prefix/bin/python" -c 'import agent; print(agent.__version__)' 2>/dev/null || echo none)"
pip=("$prefix/bin/python" -m pip install --quiet --disable-pip-version-check)
if [ -n "$wheelhouse" ]; then
  "${pip[@]}" --no-index --find-links "$wheelhouse" --upgrade "$package"
  if ls "$wheelhouse"/systemd_python-*.whl >/dev/null 2>&1; then
    "${pip[@]}" --no-index --find-links "$wheelhouse" systemd-python
  fi
else
  "${pip[@]}" --upgrade "$package"
fi
after="$("$prefix/bin/python" -c 'import agent; print(agent.__version__)')"
deploy="$("$prefix/bin/python" -c 'import agent, pathlib; print(pathlib.Path(agent.__file__).parent / "_deploy")')"
ln -sfn "$prefix/bin/emp-agent" /usr/local/bin/emp-agent
install -d /usr/local/share/man/man1
"$prefix/bin/emp-agent" manpage > /usr/local/share/man/man1/emp-agent.1.new
if cmp -s /usr/local/share/man/man1/emp-agent.1.new /usr/local/share/man/man1/emp-agent.1; then
  rm -f /usr/local/share/man/man1/emp-agent.1.new
else
  mv /usr/local/share/man/man1/emp-agent.1.new /usr/local/share/man/man1/emp-agent.1
fi
say "emp-agent $after in $prefix (was $before)"
# Byte code at the unit's optimisation level, in the unit's cache (Environment= in emp-agent.service): without it
# the first start would compile every module it imports and keep the compiler's garbage.
pycache=/var/cache/emp-agent/pycache
stdlib="$("$prefix/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')"
install -d -m 0755 /var/cache/emp-agent "$pycache"
compile() {  # compile DIR EXCLUDED-REGEX
  PYTHONPYCACHEPREFIX="$pycache" "$prefix/bin/python" -OO -m compileall -q -j 0 -x "$2" "$1" >/dev/null ||
    say "warning: some modules in $1 did not compile (they compile at first use)"
}
compile "$stdlib" '/(site-packages|dist-packages|test|tests|idlelib|tkinter|turtledemo|lib2to3|ensurepip)/'
compile "$prefix/lib" '/(tests?|pip|setuptools|_distutils_hack)/'
chown -R emp-agent:emp-agent /var/cache/emp-agent

# Files: the unit and sysusers entry follow the package; /etc/emp-agent is the operator's.
changed=0
install_file() {  # install_file SRC DEST MODE: copy when different
  if ! cmp -s "$1" "$2"; then install -D -m "$3" "$1" "$2"; changed=1; say "wrote $2"; fi
}
install_file "$deploy/systemd/emp-agent.service" /etc/systemd/system/emp-agent.service 0644
install_file "$deploy/systemd/emp-agent.sysusers" /usr/lib/sysusers.d/emp-agent.conf 0644
install -d -m 0755 /etc/emp-agent /etc/emp-agent/profiles
for profile in "$deploy"/profiles/*; do  # profiles and their assets (the demo's checkpoint); never overwritten
  target="/etc/emp-agent/profiles/$(basename "$profile")"
  [ -e "$target" ] && continue
  if [ -d "$profile" ]; then cp -r "$profile" "$target"; else install -m 0644 "$profile" "$target"; fi
  say "wrote $target"
done
if [ ! -e /etc/emp-agent/agent.toml ]; then
  cat > /etc/emp-agent/agent.toml <<'TOML'
# emp-agent settings (docs/settings.md). Environment variables in /etc/emp-agent/env win over this file.
# profile = "comfyui"
# redis_url goes in /etc/emp-agent/env (it holds a password): EMP_AGENT_REDIS_URL=rediss://...
TOML
  say "wrote /etc/emp-agent/agent.toml"
fi
if [ ! -e /etc/emp-agent/env ]; then
  install -m 0600 /dev/null /etc/emp-agent/env
  say "wrote /etc/emp-agent/env (mode 0600: put EMP_AGENT_REDIS_URL and tokens here)"
fi
chmod 0600 /etc/emp-agent/env

# systemd, when it runs (a chroot or an image build without it gets the files only).
if [ -d /run/systemd/system ]; then
  [ "$changed" = 1 ] && systemctl daemon-reload
  systemctl enable emp-agent.service >/dev/null 2>&1
  configured=0
  if grep -Eq '^[[:space:]]*profile[[:space:]]*=' /etc/emp-agent/agent.toml 2>/dev/null ||
     grep -Eq '^[[:space:]]*EMP_AGENT_PROFILE=' /etc/emp-agent/env 2>/dev/null; then configured=1; fi
  if [ "$start" = 1 ] && [ "$configured" = 0 ]; then
    say "no profile set yet: put profile = \"...\" in /etc/emp-agent/agent.toml and the secrets in"
    say "/etc/emp-agent/env, check with 'emp-agent check --env-file /etc/emp-agent/env', then 'systemctl start emp-agent'"
  elif [ "$start" = 1 ]; then
    if systemctl is-active --quiet emp-agent.service; then
      if [ "$before" != "$after" ] || [ "$changed" = 1 ]; then
        systemctl restart emp-agent.service; say "restarted emp-agent"
      fi
    else
      systemctl start emp-agent.service; say "started emp-agent"
    fi
  fi
else
  mkdir -p /etc/systemd/system/multi-user.target.wants
  ln -sfn /etc/systemd/system/emp-agent.service /etc/systemd/system/multi-user.target.wants/emp-agent.service
  say "systemd is not running: the unit is enabled for the next boot"
fi
say "done"
