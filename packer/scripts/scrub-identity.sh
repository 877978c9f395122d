#!/usr/bin/env bash
# Packer provisioner, the last one (runs as root; re-runs itself with sudo when it is not): removes what
# identifies the build machine, so that each instance made from the image gets its own identity at first boot.
# The agent's models (/var/lib/emp-agent/models) and their index (models.json) stay.
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -n -E bash "$0" "$@"
say() { echo "scrub-identity.sh: $*"; }

if [ -d /run/systemd/system ] && systemctl is-active --quiet emp-agent.service; then
  systemctl stop emp-agent.service
  say "stopped emp-agent"
fi

# systemd's machine id: an empty file makes systemd generate a new one at first boot (a missing file breaks a
# read-only /etc). D-Bus keeps a copy on older systems.
truncate -s 0 /etc/machine-id
rm -f /var/lib/dbus/machine-id

# The agent: its machine id (derived from this machine), process ledger, bootstrap journal, embedded registry
# data and logs.
rm -f /var/lib/emp-agent/machine-id /var/lib/emp-agent/processes.json /var/lib/emp-agent/bootstrap.json
rm -rf /var/lib/emp-agent/registry
if [ -d /var/log/emp-agent ]; then find /var/log/emp-agent -mindepth 1 -delete; fi

# cloud-init: instance state and logs, so that it runs its per-instance modules (host keys, users, user-data) on
# every new instance.
if command -v cloud-init >/dev/null 2>&1; then
  cloud-init clean --logs
else
  # Nothing would regenerate the host keys removed below: a unit that does it once, before sshd.
  cat > /etc/systemd/system/emp-ssh-host-keys.service <<'UNIT'
[Unit]
Description=Generate the SSH host keys an emp-agent image ships without
ConditionPathExists=!/etc/ssh/ssh_host_ed25519_key
Before=ssh.service sshd.service

[Service]
Type=oneshot
ExecStart=/usr/bin/ssh-keygen -A

[Install]
WantedBy=multi-user.target
UNIT
  systemctl enable emp-ssh-host-keys.service >/dev/null 2>&1 ||
    ln -sfn /etc/systemd/system/emp-ssh-host-keys.service /etc/systemd/system/multi-user.target.wants/
fi

# SSH host keys, systemd's random seed and the journal of this machine (stored under its machine id).
rm -f /etc/ssh/ssh_host_*_key /etc/ssh/ssh_host_*_key.pub
rm -f /var/lib/systemd/random-seed
if [ -d /var/log/journal ]; then find /var/log/journal -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +; fi

rm -rf /tmp/emp-agent-bake
say "machine id, agent identity and state, cloud-init state, SSH host keys removed; models kept"
