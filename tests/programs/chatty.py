"""Test program: writes numbered 100-byte lines to stdout, argv[1] bytes in all, then exits 0: as fast as it can,
or at argv[2] bytes per second (paced in 0.1 s ticks)."""

import sys
import time

lines = int(sys.argv[1]) // 100
rate = int(sys.argv[2]) if len(sys.argv) > 2 else 0
per_tick = max(1, rate // 1000) if rate else lines  # 100-byte lines per 0.1 s
out = sys.stdout.buffer
written, started = 0, time.monotonic()
while written < lines:
    batch = min(per_tick, lines - written)
    out.write(b"".join(b"line %08d " % n + b"x" * 85 + b"\n" for n in range(written, written + batch)))
    out.flush()
    written += batch
    if rate:
        time.sleep(max(0.0, started + written / per_tick * 0.1 - time.monotonic()))
