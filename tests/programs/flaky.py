"""Test program: appends a line to argv[1] each start and exits with argv[2] at once."""

import sys

with open(sys.argv[1], "a") as handle:
    handle.write("start\n")
print("flaky exiting", sys.argv[2], flush=True)
sys.exit(int(sys.argv[2]))
