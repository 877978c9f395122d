"""Test program: on SIGTERM, takes argv[1] seconds to finish (a service flushing its queue), then exits 0."""

import signal
import sys
import time


def finish(signum: int, frame: object) -> None:
    print("SIGTERM: finishing", flush=True)
    time.sleep(float(sys.argv[1]))
    print("finished", flush=True)
    sys.exit(0)


signal.signal(signal.SIGTERM, finish)
print("running", flush=True)
while True:
    signal.pause()
