"""Test program: reports STATUS and READY=1 on $NOTIFY_SOCKET (sd_notify protocol), then waits for signals."""

import os
import signal
import socket

address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
    sock.connect(address)
    sock.sendall(b"STATUS=loading weights")
    sock.sendall(b"READY=1\nSTATUS=serving")
while True:
    signal.pause()
