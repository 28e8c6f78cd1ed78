#!/usr/bin/env python3
"""Both ends of the kernel-relay e2e tests (tests/e2e/kernel_relay.rs).

serve IP PORT: servers on PORT (HTTP/1.1 keep-alive), PORT+1 (sink: reads to EOF, answers
"<bytes> <sha256>" and closes), PORT+2 (source: reads "N\\n", sends N bytes, closes) and
PORT+3 (banner: speaks first, then echoes lines until EOF, then closes). Runs until killed.

Client modes (run inside the workload) print one line each:
  http IP PORT N        N requests on one connection: "ok N <response bytes>"
  close IP PORT N       N connections, one request each with Connection: close (the server
                        answers and closes at once): "ok <complete answers> of N"
  sink IP PORT BYTES    sends BYTES then shuts down writing, reads the answer:
                        "sent <bytes> <sha256> got <answer>"
  source IP PORT BYTES  "got <bytes> <sha256>"
  banner IP PORT        "banner <line> echo <line> eof"
  wait IP PORT SECS     reads the banner, then waits for the connection to close:
                        "closed after <s>" or "open after <s>"
"""
import hashlib
import http.client
import http.server
import socket
import socketserver
import sys
import threading
import time


def stream(n):
    """n deterministic, incompressible-looking bytes, in chunks."""
    block = hashlib.sha256(b"egress").digest() * 2048  # 64 KiB
    i = 0
    while n > 0:
        chunk = bytes(b ^ (i & 0xFF) for b in block[:256]) + block[256:]
        chunk = chunk[: min(n, len(chunk))]
        yield chunk
        n -= len(chunk)
        i += 1


class Http(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True

    def do_GET(self):
        body = ("pong " + self.path + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


class Sink(socketserver.BaseRequestHandler):
    def handle(self):
        h, n = hashlib.sha256(), 0
        while True:
            b = self.request.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        self.request.sendall(f"{n} {h.hexdigest()}\n".encode())


class Source(socketserver.BaseRequestHandler):
    def handle(self):
        f = self.request.makefile("rb")
        n = int(f.readline())
        for chunk in stream(n):
            self.request.sendall(chunk)


class Banner(socketserver.BaseRequestHandler):
    def handle(self):
        self.request.sendall(b"banner from the server\n")
        f = self.request.makefile("rb")
        for line in f:
            self.request.sendall(line)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def serve(ip, port):
    servers = [
        http.server.ThreadingHTTPServer((ip, port), Http),
        Server((ip, port + 1), Sink),
        Server((ip, port + 2), Source),
        Server((ip, port + 3), Banner),
    ]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("listening", flush=True)
    threading.Event().wait()  # until the test kills us


def main():
    mode, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "serve":
        return serve(ip, port)
    arg = sys.argv[4] if len(sys.argv) > 4 else ""
    if mode == "http":
        c = http.client.HTTPConnection(ip, port, timeout=10)
        total = 0
        for i in range(int(arg)):
            c.request("GET", f"/{i}")
            r = c.getresponse()
            body = r.read()
            assert body == f"pong /{i}\n".encode(), body
            total += len(body)
        print(f"ok {arg} {total}")
        return
    if mode == "close":
        ok = 0
        for i in range(int(arg)):
            s = socket.create_connection((ip, port), timeout=10)
            req = f"GET /n{i} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            s.sendall(req.encode())
            data = b""
            while True:
                b = s.recv(1 << 16)
                if not b:
                    break
                data += b
            ok += data.endswith(f"pong /n{i}\n".encode())
            s.close()
        print(f"ok {ok} of {arg}")
        return
    s = socket.create_connection((ip, port), timeout=30)
    if mode == "sink":
        h, n = hashlib.sha256(), 0
        for chunk in stream(int(arg)):
            s.sendall(chunk)
            h.update(chunk)
            n += len(chunk)
        s.shutdown(socket.SHUT_WR)
        got = s.makefile("rb").read().decode().strip()
        print(f"sent {n} {h.hexdigest()} got {got}")
    elif mode == "source":
        s.sendall(f"{arg}\n".encode())
        h, n = hashlib.sha256(), 0
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            h.update(b)
            n += len(b)
        print(f"got {n} {h.hexdigest()}")
    elif mode == "banner":
        f = s.makefile("rb")
        banner = f.readline().decode().strip()
        s.sendall(b"ping\n")
        echo = f.readline().decode().strip()
        s.shutdown(socket.SHUT_WR)
        rest = f.read()
        tail = "eof" if rest == b"" else repr(rest)
        print(f"banner {banner} echo {echo} {tail}")
    elif mode == "wait":
        f = s.makefile("rb")
        f.readline()
        print("connected", flush=True)
        start = time.monotonic()
        s.settimeout(float(arg))
        try:
            b = s.recv(1)
            state = "closed" if b == b"" else "data"
        except ConnectionResetError:
            state = "closed"
        except socket.timeout:
            state = "open"
        print(f"{state} after {time.monotonic() - start:.1f}")


if __name__ == "__main__":
    main()
