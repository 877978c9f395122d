#!/bin/bash
# Boot a throw-away systemd (PID 1) by hand, as container.py does for the tests: fresh mount/uts/ipc/pid/cgroup
# (and net) namespaces on a tmpfs overlay of LOWER_ROOT. Prints the host PID of the container's PID 1.
#   CT=$(bash tests/hostint/ct_boot.sh STATE [LOWER_ROOT=/])
#   nsenter -t "$CT" -a systemctl is-system-running --wait      # then systemctl, journalctl, ... the same way
#   bash tests/hostint/ct_stop.sh STATE
# STATE          an empty directory for this container (console.log, pids, cgroup path)
# STATE/binds    optional, one bind mount a line: HOST_SRC<TAB>CT_DST
# STATE/prepare.sh  optional /bin/sh script run (chrooted, set -e) in the new root before systemd starts; booting
#                the host root needs at least: rm -f /etc/systemd/system/*.wants/*  (else host services start)
# Env: CT_NET=0 shares the host network (default: a private network namespace, loopback only);
#      CG2=<cgroup2 mount point> (default: the first cgroup2 mount in /proc/self/mounts).
# Needs root, util-linux, overlayfs, cgroup2. Host footprint: the cgroup directory $CG2/emp-ct-sh-<pid> only.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 STATE_DIR [LOWER_ROOT=/]" >&2; exit 2; }
[ "$(id -u)" = 0 ] || { echo "$0: needs root" >&2; exit 1; }
STATE=$(realpath "$1"); LOWER=$(realpath "${2:-/}")
CG2=${CG2:-$(awk '$3 == "cgroup2" { print $2; exit }' /proc/self/mounts)}
[ -n "$CG2" ] && [ -d "$CG2" ] || { echo "$0: no cgroup2 mount found; set CG2=<cgroup2 mount point>" >&2; exit 1; }
HERE=$(dirname "$(realpath "$0")")
NET=--net; [ "${CT_NET:-1}" = 0 ] && NET=
mkdir -p "$STATE"
CG="$CG2/emp-ct-sh-$$"; mkdir "$CG"; echo "$CG" > "$STATE/cgroup"
# The launcher joins the cgroup, then execs unshare (same PID): the cgroup namespace's root is $CG.
setsid bash -c 'echo $$ > "$1/cgroup.procs"; shift; exec "$@"' launcher "$CG" \
  unshare --mount --uts --ipc --pid --cgroup --fork --kill-child --propagation private $NET \
  bash "$HERE/ct_init.sh" "$STATE" "$LOWER" </dev/null >"$STATE/console.log" 2>&1 &
L=$!; echo "$L" > "$STATE/unshare.pid"; CT=
for _ in $(seq 500); do   # the container's PID 1 is the launcher's child whose NSpid ends in 1
  for c in $(cat "/proc/$L/task/$L/children" 2>/dev/null); do
    grep -qE '^NSpid:\s+[0-9]+\s+1$' "/proc/$c/status" 2>/dev/null && CT=$c
  done
  [ -n "$CT" ] && break
  kill -0 "$L" 2>/dev/null || break
  sleep 0.02
done
[ -n "$CT" ] || { echo "$0: the container did not start; see $STATE/console.log:" >&2; cat "$STATE/console.log" >&2; exit 1; }
echo "$CT" > "$STATE/init.pid"
for _ in $(seq 1500); do  # systemctl works once PID 1 is systemd and listens on its private socket
  [ "$(cat "/proc/$CT/comm" 2>/dev/null)" = systemd ] && [ -S "/proc/$CT/root/run/systemd/private" ] && break
  kill -0 "$CT" 2>/dev/null || { echo "$0: the container exited; see $STATE/console.log" >&2; exit 1; }
  sleep 0.02
done
echo "$CT"
