#!/usr/bin/env python3
"""Ways around the socket hooks, for the per-packet program's tests (tests/e2e/packets.rs).

  attack.py srh ALLOWED6 DENIED6 PORT    TCP connect to ALLOWED6 with an IPv6 segment routing
                                         header (IPV6_RTHDR, type 4) whose active segment is
                                         DENIED6: the packets' destination is DENIED6
  attack.py lsrr ALLOWED4 DENIED4 PORT   TCP connect to ALLOWED4 with an IPv4 loose source
                                         route (IP_OPTIONS) through DENIED4
  attack.py ping DST                     ping socket sendto() without connect; waits 1 s for
                                         the echo reply
  attack.py connect DST PORT             a plain TCP connect
  attack.py hold DST PORT SECS [TAG]     TCP connect, then a line (TAG, default x) every 100 ms for SECS
  attack.py serve IP PORT [tfo]          accept connections; answer each line with "pong"
                                         (tfo: the listener takes TCP Fast Open)

Each prints one line: what happened ("connected", "error: ...", "reply", "timeout", ...).
"""
import socket
import struct
import sys
import time

IPV6_RTHDR = 57


def srh(allowed, denied, port):
    s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    # Type 4 (SRH), two segments: [0] is replaced by the final destination (the connect
    # address), [segments left = 1] is where the packet goes first.
    segs = [b"\0" * 16, socket.inet_pton(socket.AF_INET6, denied)]
    hdr = struct.pack("!BBBBBBH", 0, 2 * len(segs), 4, 1, 1, 0, 0) + b"".join(segs)
    try:
        s.setsockopt(socket.IPPROTO_IPV6, IPV6_RTHDR, hdr)
    except OSError as e:
        print("setsockopt refused: %s" % e.strerror)
        return
    connect(s, (allowed, port))


def lsrr(allowed, denied, port):
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    opt = bytes([1, 131, 7, 4]) + socket.inet_aton(denied)
    try:
        s.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, opt)
    except OSError as e:
        print("setsockopt refused: %s" % e.strerror)
        return
    connect(s, (allowed, port))


def connect(s, addr):
    s.settimeout(1.5)
    try:
        s.connect(addr)
        print("connected")
    except OSError as e:
        print("error: %s" % (e.strerror or e))


def ping(dst):
    v6 = ":" in dst
    fam = socket.AF_INET6 if v6 else socket.AF_INET
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    try:
        s = socket.socket(fam, socket.SOCK_DGRAM, proto)
    except OSError as e:
        print("socket refused: %s" % e.strerror)
        return
    s.settimeout(1.0)
    req = struct.pack("!BBHHH", 128 if v6 else 8, 0, 0, 0, 1) + b"egress"
    try:
        s.sendto(req, (dst, 0))
        s.recv(1024)
        print("reply")
    except socket.timeout:
        print("timeout")
    except OSError as e:
        print("error: %s" % e.strerror)


def plain(dst, port):
    fam = socket.AF_INET6 if ":" in dst else socket.AF_INET
    connect(socket.socket(fam, socket.SOCK_STREAM), (dst, port))


def hold(dst, port, secs, tag="x"):
    s = socket.create_connection((dst, port), timeout=2)
    print("connected", flush=True)
    s.settimeout(0.05)
    end = time.time() + secs
    while time.time() < end:
        try:
            s.send(tag.encode() + b"\n")
        except OSError:
            pass
        time.sleep(0.1)


def serve(ip, port, tfo=False):
    fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
    l = socket.socket(fam, socket.SOCK_STREAM)
    l.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if tfo:
        l.setsockopt(socket.IPPROTO_TCP, 23, 16)  # TCP_FASTOPEN, queue of 16
    l.bind((ip, port))
    l.listen(16)
    print("listening", flush=True)
    while True:
        c, _ = l.accept()
        c.settimeout(3)
        try:
            while True:
                b = c.recv(100)
                if not b:
                    break
                c.sendall(b"pong\n")
        except OSError:
            pass
        c.close()


if __name__ == "__main__":
    a = sys.argv
    if a[1] == "srh":
        srh(a[2], a[3], int(a[4]))
    elif a[1] == "lsrr":
        lsrr(a[2], a[3], int(a[4]))
    elif a[1] == "ping":
        ping(a[2])
    elif a[1] == "connect":
        plain(a[2], int(a[3]))
    elif a[1] == "hold":
        hold(a[2], int(a[3]), float(a[4]), *a[5:6])
    elif a[1] == "serve":
        serve(a[2], int(a[3]), a[4:] == ["tfo"])
    sys.stdout.flush()
