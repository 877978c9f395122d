"""Test program: writes its environment as JSON to argv[1] (atomically), then waits for signals."""

import json
import os
import signal
import sys

with open(sys.argv[1] + ".tmp", "w") as handle:
    json.dump(dict(os.environ), handle)
os.rename(sys.argv[1] + ".tmp", sys.argv[1])
while True:
    signal.pause()
