"""A service that prints `tick N` every 20 ms and dies of SIGPIPE (the default) if its output has no reader."""

import signal
import time

signal.signal(signal.SIGPIPE, signal.SIG_DFL)
n = 0
while True:
    print(f"tick {n}", flush=True)
    n += 1
    time.sleep(0.02)
