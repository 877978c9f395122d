#!/usr/bin/env bash
# Packer provisioner for the GPU image (runs as root; re-runs itself with sudo when it is not): the profile's
# bootstrap up to its preparation, `emp-agent bootstrap --until prepare` (detect, pull_models, prepare), so that
# instances boot with the models verified in place and the preparation steps done. Nothing is registered and no
# service is left running.
#   EMP_AGENT_PROFILE  the profile to bake (required)
#   other variables    what the profile's pulls need (HF_TOKEN, a model auth_env, ...), from bake_environment
set -euo pipefail
[ "$(id -u)" = 0 ] || exec sudo -n -E bash "$0" "$@"
: "${EMP_AGENT_PROFILE:?EMP_AGENT_PROFILE: the profile to bake}"
export EMP_AGENT_PROFILE

/opt/emp-agent/bin/emp-agent bootstrap --until prepare

# The bake ran as root; the service runs as emp-agent and writes into its state (the model index, new models)
# and its logs.
for dir in /var/lib/emp-agent /var/log/emp-agent; do
  if [ -d "$dir" ]; then chown -R emp-agent:emp-agent "$dir"; fi
done
if [ -d /run/systemd/system ] && systemctl is-active --quiet emp-agent.service; then
  echo "bake-profile.sh: emp-agent is running after the bake" >&2; exit 1
fi
echo "bake-profile.sh: profile $EMP_AGENT_PROFILE baked"
