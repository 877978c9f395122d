#!/bin/bash
# PID 1 of the fresh namespaces that container.py (or ct_boot.sh) creates: builds the container's root as an
# overlay (tmpfs upper layer) of LOWER, mounts the API filesystems, applies bind mounts and the prepare hook,
# pivots into the root and execs systemd. Not meant to be run by hand.
#   ct_init.sh STATE LOWER
#   STATE/binds       optional, one bind mount a line: HOST_SRC<TAB>CT_DST (a file or a directory)
#   STATE/prepare.sh  optional, run with /bin/sh in the new root (chroot) before systemd starts
set -euo pipefail
STATE=$1; LOWER=$2; R=$STATE/root
mkdir -p "$R" "$STATE/tmpfs"
mount -t tmpfs -o mode=755 tmpfs "$STATE/tmpfs"            # every write of the container lands in RAM
mkdir -p "$STATE/tmpfs/upper" "$STATE/tmpfs/work"
mount -t overlay overlay -o "lowerdir=$LOWER,upperdir=$STATE/tmpfs/upper,workdir=$STATE/tmpfs/work" "$R"
mount -t proc proc "$R/proc"
mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$R/sys"
mount -t cgroup2 cgroup2 "$R/sys/fs/cgroup"  # unified mode; root is the container's cgroup
mount -t tmpfs -o mode=755,nosuid tmpfs "$R/dev"
for n in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  IFS=: read -r name major minor <<<"$n"; mknod -m 666 "$R/dev/$name" c "$major" "$minor"
done
mkdir "$R/dev/pts" "$R/dev/shm"
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts "$R/dev/pts"
ln -s pts/ptmx "$R/dev/ptmx"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/dev/shm"
ln -s /proc/self/fd "$R/dev/fd"
ln -s /proc/self/fd/0 "$R/dev/stdin"; ln -s /proc/self/fd/1 "$R/dev/stdout"; ln -s /proc/self/fd/2 "$R/dev/stderr"
mount -t tmpfs -o mode=755,nosuid,nodev tmpfs "$R/run"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$R/tmp"
if [ -f "$STATE/binds" ]; then
  while IFS=$'\t' read -r src dst; do
    [ -n "$src" ] || continue
    if [ -d "$src" ]; then mkdir -p "$R$dst"; else mkdir -p "$(dirname "$R$dst")"; touch "$R$dst"; fi
    mount --bind "$src" "$R$dst"
  done < "$STATE/binds"
fi
if [ -f "$STATE/prepare.sh" ]; then
  cp "$STATE/prepare.sh" "$R/run/.ct-prepare.sh"
  chroot "$R" /bin/sh -e /run/.ct-prepare.sh
  rm -f "$R/run/.ct-prepare.sh"
fi
hostname emp-ct
cd "$R"; mkdir -p .oldroot; pivot_root . .oldroot; umount -l /.oldroot; rmdir /.oldroot
exec env -i container=emp-test TERM=dumb /lib/systemd/systemd --show-status=no
