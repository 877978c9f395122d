"""Test program: forks a grandchild into a new session that binds argv[1] (TCP) and ignores SIGTERM; the
parent ignores SIGTERM too. Writes "<pid> <grandchild pid>" to argv[2] once the port is bound."""

import os
import signal
import socket
import sys

signal.signal(signal.SIGTERM, signal.SIG_IGN)
read_end, write_end = os.pipe()
if os.fork() == 0:
    os.setsid()
    server = socket.socket()
    server.bind(("127.0.0.1", int(sys.argv[1])))
    server.listen()
    os.write(write_end, f"{os.getpid()}".encode())
    while True:
        signal.pause()
grandchild = os.read(read_end, 32).decode()
with open(sys.argv[2] + ".tmp", "w") as handle:
    handle.write(f"{os.getpid()} {grandchild}\n")
os.rename(sys.argv[2] + ".tmp", sys.argv[2])
while True:
    signal.pause()
