#!/usr/bin/env python3
"""Connects in a loop for the control tests, run inside a workload.

  connect_loop.py SECONDS ALLOWED_HOST ALLOWED_PORT DENIED_HOST DENIED_PORT

Alternates a connect to the allowed destination (a server that answers) and one to the
denied destination, until SECONDS pass. Prints one line of counts:
`allowed_ok=N allowed_failed=N denied_refused=N denied_leaked=N` where a leak is a denied
connect that did not fail with EPERM.
"""
import errno
import socket
import sys
import time

secs, ah, ap, dh, dp = float(sys.argv[1]), sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
counts = {"allowed_ok": 0, "allowed_failed": 0, "denied_refused": 0, "denied_leaked": 0}
end = time.monotonic() + secs
while time.monotonic() < end:
    for host, port, ok_key, bad_key, want_eperm in (
        (ah, ap, "allowed_ok", "allowed_failed", False),
        (dh, dp, "denied_refused", "denied_leaked", True),
    ):
        s = socket.socket()
        s.settimeout(2)
        try:
            s.connect((host, port))
            counts[bad_key if want_eperm else ok_key] += 1
        except OSError as e:
            if want_eperm and e.errno == errno.EPERM:
                counts[ok_key] += 1
            else:
                counts[bad_key] += 1
        finally:
            s.close()
    time.sleep(0.002)
print(" ".join(f"{k}={v}" for k, v in counts.items()))
