"""Test program: ignores SIGTERM and leaves a grandchild in its own session that ignores SIGTERM too.

argv: pidfile. Writes "<own pid> <grandchild pid>" once both run, then waits for signals forever.
"""

import os
import signal
import sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
read_end, write_end = os.pipe()
child = os.fork()
if child == 0:
    os.setsid()  # escapes the process group, like a daemonising custom node
    os.write(write_end, b"x")
    while True:
        signal.pause()
os.read(read_end, 1)
with open(sys.argv[1] + ".tmp", "w") as handle:
    handle.write(f"{os.getpid()} {child}\n")
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
print("stubborn running", flush=True)
while True:
    signal.pause()
