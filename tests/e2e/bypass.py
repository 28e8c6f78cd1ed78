#!/usr/bin/env python3
"""Clients that try other ways out than a plain connect()/sendto(), for tests/e2e/bypass.rs.

  bypass.py sendmmsg HOST PORT N        N UDP datagrams in one sendmmsg() (libc, ctypes)
  bypass.py iouring HOST PORT           TCP connect through io_uring (IORING_OP_CONNECT)
  bypass.py fastopen HOST PORT MSG      TCP sendto(MSG_FASTOPEN) without connect, read a line
  bypass.py mptcp HOST PORT MSG         socket(..., IPPROTO_MPTCP) connect, send, read a line
  bypass.py mark HOST PORT MSG          setsockopt(SO_MARK) first, then TCP connect

HOST `::ffff:a.b.c.d` uses a dual-stack IPv6 socket. Prints one line: `ok ...`,
`err <ERRNO NAME>` or `skip <reason>`; the mark mode prefixes `mark=ok|mark=<ERRNO> `.
"""
import ctypes
import errno
import mmap
import socket
import struct
import sys

libc = ctypes.CDLL(None, use_errno=True)


def name(e):
    return errno.errorcode.get(e, str(e))


def sock(host, kind, proto=0):
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(fam, kind, proto)
    s.settimeout(5)
    if fam == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    return s


def sockaddr(host, port):
    if ":" in host:
        raw = struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0)
        raw += socket.inet_pton(socket.AF_INET6, host) + struct.pack("=I", 0)
    else:
        raw = struct.pack("=H", socket.AF_INET) + struct.pack("!H", port)
        raw += socket.inet_pton(socket.AF_INET, host) + b"\0" * 8
    return ctypes.create_string_buffer(raw, len(raw))


def reply(s, msg):
    s.sendall(msg.encode() + b"\n")
    return s.makefile().readline().strip()


class Iovec(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_size_t)]


class Msghdr(ctypes.Structure):
    _fields_ = [
        ("name", ctypes.c_void_p),
        ("namelen", ctypes.c_uint32),
        ("iov", ctypes.c_void_p),
        ("iovlen", ctypes.c_size_t),
        ("control", ctypes.c_void_p),
        ("controllen", ctypes.c_size_t),
        ("flags", ctypes.c_int),
    ]


class Mmsghdr(ctypes.Structure):
    _fields_ = [("hdr", Msghdr), ("len", ctypes.c_uint)]


def sendmmsg(host, port, n):
    s = sock(host, socket.SOCK_DGRAM)
    addr = sockaddr(host, port)
    bufs = [ctypes.create_string_buffer(b"egress-%d" % i, 8) for i in range(n)]
    iovs = (Iovec * n)(*[Iovec(ctypes.addressof(b), 8) for b in bufs])
    msgs = (Mmsghdr * n)()
    for i in range(n):
        h = msgs[i].hdr
        h.name = ctypes.addressof(addr)
        h.namelen = len(addr)
        h.iov = ctypes.addressof(iovs[i])
        h.iovlen = 1
    r = libc.sendmmsg(s.fileno(), msgs, n, 0)
    if r < 0:
        return "err " + name(ctypes.get_errno())
    return "ok sent=%d" % r


def iouring(host, port):
    try:
        with open("/proc/sys/kernel/io_uring_disabled") as f:
            if f.read().strip() == "2":
                return "skip io_uring_disabled=2"
    except FileNotFoundError:
        pass
    # struct io_uring_params: 10 u32 (sq_entries .. resv[3]), then sq_off and cq_off (40 each).
    params = ctypes.create_string_buffer(120)
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(425), ctypes.c_long(4), params)
    if fd < 0:
        e = ctypes.get_errno()
        if e in (errno.ENOSYS, errno.EPERM):
            return "skip io_uring_setup: " + name(e)
        return "err setup " + name(e)
    sq_entries, cq_entries = struct.unpack_from("=II", params, 0)
    sq = struct.unpack_from("=7I", params, 40)  # head tail mask entries flags dropped array
    cq = struct.unpack_from("=6I", params, 80)  # head tail mask entries overflow cqes
    sq_ring = mmap.mmap(fd, sq[6] + sq_entries * 4, offset=0)
    cq_ring = mmap.mmap(fd, cq[5] + cq_entries * 16, offset=0x8000000)
    sqes = mmap.mmap(fd, sq_entries * 64, offset=0x10000000)

    s = sock(host, socket.SOCK_STREAM)
    addr = sockaddr(host, port)
    # IORING_OP_CONNECT = 16: fd, addr = sockaddr pointer, off (addr2) = its length.
    sqe = struct.pack("=BBHiQQIIQ", 16, 0, 0, s.fileno(), len(addr), ctypes.addressof(addr), 0, 0, 7)
    sqes[0:64] = sqe + b"\0" * (64 - len(sqe))
    tail = struct.unpack_from("=I", sq_ring, sq[1])[0]
    mask = struct.unpack_from("=I", sq_ring, sq[2])[0]
    struct.pack_into("=I", sq_ring, sq[6] + (tail & mask) * 4, 0)
    struct.pack_into("=I", sq_ring, sq[1], tail + 1)
    # io_uring_enter(fd, to_submit=1, min_complete=1, IORING_ENTER_GETEVENTS, NULL, 0)
    r = libc.syscall(ctypes.c_long(426), ctypes.c_long(fd), ctypes.c_long(1), ctypes.c_long(1),
                     ctypes.c_long(1), ctypes.c_void_p(0), ctypes.c_long(0))
    if r < 0:
        return "err enter " + name(ctypes.get_errno())
    head = struct.unpack_from("=I", cq_ring, cq[0])[0]
    cmask = struct.unpack_from("=I", cq_ring, cq[2])[0]
    user, res = struct.unpack_from("=Qi", cq_ring, cq[5] + (head & cmask) * 16)
    struct.pack_into("=I", cq_ring, cq[0], head + 1)
    if user != 7:
        return "err no completion"
    if res < 0:
        return "err " + name(-res)
    return "ok reply=" + reply(s, "uring")


def fastopen(host, port, msg):
    s = sock(host, socket.SOCK_STREAM)
    s.settimeout(None)  # a blocking socket: sendto() waits for the handshake
    s.sendto(msg.encode() + b"\n", 0x20000000, (host, port))  # MSG_FASTOPEN
    s.settimeout(5)
    return "ok reply=" + s.makefile().readline().strip()


def mptcp(host, port, msg):
    s = sock(host, socket.SOCK_STREAM, 262)
    s.connect((host, port))
    return "ok reply=" + reply(s, msg)


def mark(host, port, msg):
    s = sock(host, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, 36, 0x2a)  # SO_MARK
        m = "mark=ok"
    except OSError as e:
        m = "mark=" + name(e.errno)
    try:
        s.connect((host, port))
        return m + " ok reply=" + reply(s, msg)
    except OSError as e:
        return m + " err " + name(e.errno)


def main():
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    rest = sys.argv[4:]
    try:
        if mode == "sendmmsg":
            out = sendmmsg(host, port, int(rest[0]))
        elif mode == "iouring":
            out = iouring(host, port)
        elif mode == "fastopen":
            out = fastopen(host, port, rest[0])
        elif mode == "mptcp":
            out = mptcp(host, port, rest[0])
        elif mode == "mark":
            out = mark(host, port, rest[0])
        else:
            out = "usage: unknown mode " + mode
    except OSError as e:
        out = "err " + (name(e.errno) if e.errno else type(e).__name__)
    print(out, flush=True)


if __name__ == "__main__":
    main()
