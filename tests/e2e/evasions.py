#!/usr/bin/env python3
"""Clients that try to slip a request for a denied host past the egress proxy.

Usage: evasions.py MODE IP PORT ARGS...; prints one line: what came back.
  keepalive IP PORT HOST...     one connection, one request per host, each after the last response
  pipeline IP PORT HOST...      one connection, all requests at once
  raw IP PORT TEXT              TEXT (with \\r\\n escapes) as is; the first status line back
  tls-split IP PORT SNI SIZE    a real TLS handshake whose ClientHello is cut into records of
                                SIZE bytes, each in its own TCP segment; then GET /
  tls-big IP PORT SNI PAD       a ClientHello padded by PAD bytes (may exceed 16 KiB); what
                                the other side answers to it
"""
import socket
import ssl
import sys
import time


def connect(ip, port):
    s = socket.create_connection((ip, int(port)), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(f):
    """One response from a file-like socket: (status, body) or (None, why)."""
    line = f.readline()
    if not line:
        return None, "closed"
    status = int(line.split()[1])
    length = 0
    while True:
        h = f.readline()
        if h in (b"\r\n", b"\n", b""):
            break
        k, _, v = h.decode().partition(":")
        if k.strip().lower() == "content-length":
            length = int(v.strip())
    body = f.read(length) if length else b""
    return status, body.decode(errors="replace").strip()


def request(host, path="/"):
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: evasions\r\n\r\n".encode()


def exchange(ip, port, hosts, pipelined):
    """One connection, a request per host (all at once when pipelined); the responses."""
    s = connect(ip, port)
    f = s.makefile("rb")
    if pipelined:
        s.sendall(b"".join(request(h, f"/{h}") for h in hosts))
    out = []
    for h in hosts:
        try:
            if not pipelined:
                s.sendall(request(h, f"/{h}"))
            st, body = read_response(f)
        except OSError as e:
            st, body = None, type(e).__name__
        out.append(f"{st}:{body}")
        if st is None:
            break
    print(" | ".join(out))


def keepalive(ip, port, *hosts):
    exchange(ip, port, hosts, False)


def pipeline(ip, port, *hosts):
    exchange(ip, port, hosts, True)


def raw(ip, port, text):
    s = connect(ip, port)
    s.sendall(text.encode().decode("unicode_escape").encode("latin-1"))
    f = s.makefile("rb")
    try:
        st, body = read_response(f)
    except OSError as e:
        st, body = None, type(e).__name__
    print(f"{st}:{body}")


def client_hello(sni):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    inc, outg = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, outg, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return obj, inc, outg, outg.read()


def records(hs, size):
    out = []
    for i in range(0, len(hs), size):
        part = hs[i:i + size]
        out.append(b"\x16\x03\x01" + len(part).to_bytes(2, "big") + part)
    return out


def tls_split(ip, port, sni, size):
    obj, inc, outg, hello = client_hello(sni)
    assert hello[0] == 0x16
    hs = hello[5:]
    s = connect(ip, port)
    for rec in records(hs, int(size)):
        s.sendall(rec)
        time.sleep(0.002)  # a segment each
    try:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                s.sendall(outg.read())
                data = s.recv(65536)
                if not data:
                    print("refused: closed during the handshake")
                    return
                inc.write(data)
        s.sendall(outg.read())
        obj.write(request(sni))
        s.sendall(outg.read())
        buf = b""
        while b"\r\n\r\n" not in buf:
            try:
                buf += obj.read(65536)
            except ssl.SSLWantReadError:
                data = s.recv(65536)
                if not data:
                    break
                inc.write(data)
        print(buf.split(b"\r\n")[0].decode(errors="replace") + " " + buf.split(b"\r\n\r\n", 1)[-1].decode(errors="replace").strip())
    except (ssl.SSLError, OSError) as e:
        print(f"refused: {type(e).__name__}: {e}")


def tls_big(ip, port, sni, pad):
    _, _, _, hello = client_hello(sni)
    hs = hello[5:]
    # handshake: type(1) len(3) version(2) random(32) sid(1+n) suites(2+n) comp(1+n) ext(2+n)
    body = hs[4:]
    i = 34
    i += 1 + body[i]
    i += 2 + int.from_bytes(body[i:i + 2], "big")
    i += 1 + body[i]
    ext = body[i + 2:]
    # "max": the largest extensions block there can be, which makes the hello pass 64 KiB.
    pad = 65535 - 4 - len(ext) if pad == "max" else int(pad)
    ext = b"\x00\x15" + pad.to_bytes(2, "big") + bytes(pad) + ext
    body = body[:i] + len(ext).to_bytes(2, "big") + ext
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    s = connect(ip, port)
    try:
        # The proxy may refuse (close) while the hello is still being sent.
        for rec in records(hs, 16384):
            s.sendall(rec)
        data = s.recv(100)
    except OSError as e:
        print(f"refused: {type(e).__name__}")
        return
    if not data:
        print("refused: closed")
    elif data[0] == 0x15:
        print(f"alert {data[6] if len(data) > 6 else '?'}")
    elif data[0] == 0x16:
        print("server hello")
    else:
        print(f"other {data[:10]!r}")


MODES = {
    "keepalive": keepalive,
    "pipeline": pipeline,
    "raw": raw,
    "tls-split": tls_split,
    "tls-big": tls_big,
}

if __name__ == "__main__":
    MODES[sys.argv[1]](*sys.argv[2:])
