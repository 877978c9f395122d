"""Benchmark child: an idle service. Prints its tag once, then waits for signals; exits 0 on SIGTERM."""

import signal
import sys

print("idle child", sys.argv[-1], flush=True)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
while True:
    signal.pause()
