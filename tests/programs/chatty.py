"""Test program: writes numbered 100-byte lines to stdout as fast as it can, argv[1] bytes in all, then exits 0."""

import sys

total = int(sys.argv[1])
out = sys.stdout.buffer
for number in range(total // 100):
    out.write(b"line %08d " % number + b"x" * 85 + b"\n")
out.flush()
