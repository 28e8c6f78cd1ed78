#!/usr/bin/env python3
"""A real socket client for the end-to-end tests, run inside a workload.

  client.py tcp HOST PORT [MESSAGE]   connect (AF_INET, AF_INET6, or dual-stack for
                                      ::ffff:a.b.c.d), send MESSAGE + newline, read one line
  client.py udp HOST PORT MESSAGE     sendto without connect
  client.py udp-connect HOST PORT MESSAGE

Prints one line: `ok peer=<getpeername> reply=<line> local=<getsockname>` or `err <ERRNO NAME> ms=<elapsed>`.
"""
import errno
import socket
import sys
import time


def family_of(host):
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def fmt_peer(p):
    return f"[{p[0]}]:{p[1]}" if ":" in p[0] else f"{p[0]}:{p[1]}"


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    msg = sys.argv[4] if len(sys.argv) > 4 else "hello"
    fam = family_of(host)
    kind = socket.SOCK_STREAM if mode == "tcp" else socket.SOCK_DGRAM
    s = socket.socket(fam, kind)
    s.settimeout(5)
    if fam == socket.AF_INET6:
        # Dual-stack, so that ::ffff:a.b.c.d reaches IPv4.
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    t0 = time.monotonic()
    try:
        if mode == "tcp":
            s.connect((host, port))
            peer = fmt_peer(s.getpeername())
            local = fmt_peer(s.getsockname())
            s.sendall(msg.encode() + b"\n")
            reply = s.makefile().readline().strip()
            print(f"ok peer={peer} reply={reply} local={local}")
        elif mode == "udp":
            s.sendto(msg.encode(), (host, port))
            print("ok sent")
        elif mode == "udp-connect":
            s.connect((host, port))
            s.send(msg.encode())
            print("ok sent")
        else:
            print(f"usage: unknown mode {mode}")
            return 2
    except OSError as e:
        ms = (time.monotonic() - t0) * 1000
        name = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
        print(f"err {name} ms={ms:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
