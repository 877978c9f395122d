"""Test program: allocates (and touches) argv[1] MiB every 0.05 s, up to argv[2] MiB, then waits. With argv[3] =
N > 1 it first starts N - 1 copies of itself as its children, so the memory is spread over a process tree."""

import signal
import subprocess
import sys
import time

step, ceiling = float(sys.argv[1]), int(sys.argv[2])
spread = int(sys.argv[3]) if len(sys.argv) > 3 else 1
children = [subprocess.Popen([sys.executable, __file__, str(step), str(ceiling)]) for _ in range(spread - 1)]
blocks = []
while len(blocks) * step < ceiling:
    blocks.append(bytearray(int(step * 1024 * 1024)))  # zero-filled by the allocator: resident
    time.sleep(0.05)
print("reached", int(len(blocks) * step), "MiB", flush=True)
while True:
    signal.pause()
