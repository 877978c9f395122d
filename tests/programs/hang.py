"""Test program: records its pid in argv[1], then waits for signals forever (a stuck setup step)."""

import os
import signal
import sys

with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(f"{os.getpid()}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    signal.pause()
