#!/usr/bin/env bash
# Packer provisioner (runs on the machine being baked, as root; re-runs itself with sudo when it is not): installs
# emp-agent with bootstrap/install.sh from what the file provisioners uploaded, enabled for the next boot but not
# started, and records the image's profile in /etc/emp-agent/agent.toml.
#   EMP_BAKE_DIR       the upload dir: install.sh and wheelhouse/ (wheelhouse/ without wheels: the package index)
#   EMP_BAKE_PACKAGE  what to install (default emp-agent; a pin such as emp-agent==0.2.0 works with both sources)
#   EMP_BAKE_PROFILE   the profile instances run (empty: none; set it at deploy time, e.g. with cloud-init)
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -n -E bash "$0" "$@"

dir=${EMP_BAKE_DIR:?EMP_BAKE_DIR: the directory install.sh and wheelhouse/ were uploaded to}
package=${EMP_BAKE_PACKAGE:-emp-agent}
profile=${EMP_BAKE_PROFILE:-}
if [ -n "$profile" ] && ! [[ "$profile" =~ ^[A-Za-z0-9._/-]+$ ]]; then
  echo "install-agent.sh: profile '$profile' is not a profile name or path" >&2; exit 2
fi

# A cloud image may still be running its own first boot (apt, users): let it finish first.
if command -v cloud-init >/dev/null 2>&1; then cloud-init status --wait >/dev/null 2>&1 || true; fi

args=(--no-start --package "$package")
if compgen -G "$dir/wheelhouse/*.whl" >/dev/null; then
  args+=(--wheelhouse "$dir/wheelhouse")
fi
bash "$dir/install.sh" "${args[@]}"

if [ -n "$profile" ]; then
  # First in the file (a key after a [table] header would belong to that table). EMP_AGENT_PROFILE in
  # /etc/emp-agent/env, written at deploy time, still overrides it.
  config=/etc/emp-agent/agent.toml
  { printf 'profile = "%s"\n' "$profile"; grep -vE '^[[:space:]]*profile[[:space:]]*=' "$config" || true; } > "$config.new"
  chmod 0644 "$config.new"
  mv "$config.new" "$config"
  echo "install-agent.sh: profile $profile written to $config"
fi

if [ -d /run/systemd/system ]; then
  systemctl is-enabled --quiet emp-agent.service
  if systemctl is-active --quiet emp-agent.service; then
    echo "install-agent.sh: emp-agent is running; an image bake must not start it" >&2; exit 1
  fi
fi
echo "install-agent.sh: $(/opt/emp-agent/bin/emp-agent version) installed, enabled, not started"
