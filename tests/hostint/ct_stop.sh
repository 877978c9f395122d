#!/bin/bash
# Tear down a container started by ct_boot.sh: poweroff, then cgroup.kill as a fallback, then remove the cgroup.
#   bash tests/hostint/ct_stop.sh STATE      (the STATE given to ct_boot.sh)
STATE=${1:?usage: ct_stop.sh STATE_DIR (the directory given to ct_boot.sh)}
CT=$(cat "$STATE/init.pid" 2>/dev/null || true); L=$(cat "$STATE/unshare.pid"); CG=$(cat "$STATE/cgroup")
[ -n "$CT" ] && nsenter -t "$CT" -a systemctl poweroff --no-block 2>/dev/null
for _ in $(seq 300); do kill -0 "$L" 2>/dev/null || break; sleep 0.1; done   # PID 1 exits: the namespaces go
if kill -0 "$L" 2>/dev/null; then
  echo 1 > "$CG/cgroup.kill" 2>/dev/null || for p in $(find "$CG" -name cgroup.procs -exec cat {} +); do kill -9 "$p"; done
  kill -9 "$L" 2>/dev/null
fi
for _ in $(seq 100); do
  [ -d "$CG" ] || exit 0
  find "$CG" -depth -type d -exec rmdir {} \; 2>/dev/null
  sleep 0.1
done
echo "cgroup $CG still busy: $(find "$CG" -name cgroup.procs -exec cat {} +)" >&2; exit 1
