#!/usr/bin/env python3
"""Misbehaving clients for the proxy tests, run inside a workload.

  hostile.py MODE HOST PORT [HELLO_FILE]
  MODE: silent | garbage | truncated-hello | huge-header

Prints `closed <how> after <seconds>`: how the proxy ended the connection.
"""
import socket
import sys
import time

mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.create_connection((host, port), timeout=30)
t0 = time.monotonic()
how = "eof"
try:
    if mode == "garbage":
        s.sendall(bytes(range(1, 200)))
    elif mode == "truncated-hello":
        s.sendall(open(sys.argv[4], "rb").read()[:60])
    elif mode == "huge-header":
        # 1 MiB of header before the Host line: the proxy gives up after its 16 KiB bound.
        s.sendall(b"GET / HTTP/1.1\r\nX-Big: ")
        chunk = b"a" * 65536
        for _ in range(16):
            s.sendall(chunk)
        s.sendall(b"\r\nHost: allowed.example\r\n\r\n")
    data = s.recv(65536)
    while data:
        data = s.recv(65536)
except ConnectionResetError:
    how = "reset"
except BrokenPipeError:
    how = "reset"
except socket.timeout:
    how = "still-open"
print(f"closed {how} after {time.monotonic() - t0:.2f}")
