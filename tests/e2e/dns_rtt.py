#!/usr/bin/env python3
"""DNS round trips over one connected UDP socket: dns_rtt.py RESOLVER NAME COUNT

Prints `p50_us=.. p99_us=.. n=..` of the time from send() to the answer's recv(). A NAME
with `{i}` in it asks a new name each query (`{i}` = 0 .. COUNT-1)."""
import socket
import struct
import sys
import time


def query(name, qid):
    m = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        m += bytes([len(label)]) + label.encode()
    return m + b"\0" + struct.pack(">HH", 1, 1)


def main():
    resolver, name, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.settimeout(2)
    s.connect((resolver, 53))
    times = []
    for i in range(count):
        qid = i & 0xFFFF
        t0 = time.perf_counter_ns()
        s.send(query(name.replace("{i}", str(i)), qid))
        while True:
            d = s.recv(4096)
            if d[:2] == struct.pack(">H", qid):
                break
        times.append(time.perf_counter_ns() - t0)
    times = times[count // 10 :]  # warm-up
    times.sort()
    p = lambda q: times[min(len(times) - 1, int(len(times) * q))] // 1000
    print(f"p50_us={p(0.50)} p99_us={p(0.99)} n={len(times)}")


if __name__ == "__main__":
    sys.exit(main())
