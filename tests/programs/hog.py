"""Test program: allocates (and touches) argv[1] MiB every 0.05 s, up to argv[2] MiB, then waits."""

import signal
import sys
import time

step, ceiling = int(sys.argv[1]), int(sys.argv[2])
blocks = []
while len(blocks) * step < ceiling:
    blocks.append(bytearray(step * 1024 * 1024))  # zero-filled by the allocator: resident
    time.sleep(0.05)
print("reached", len(blocks) * step, "MiB", flush=True)
while True:
    signal.pause()
