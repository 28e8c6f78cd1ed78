#!/usr/bin/env python3
"""A burst of connections to a server-first service (the server speaks first, like SSH or SMTP).

  burst.py server HOST PORT         serves a banner line on every connection, then holds it
                                    open until the client closes; prints "listening" when ready
  burst.py client HOST PORT N SECS  opens N connections at once, waits up to SECS for every
                                    banner, then prints one line:
                                    served=N lost=N last_ms=X (time until the last banner)
  burst.py hold HOST PORT N SECS    the same, then keeps the connections open (idle) for SECS
                                    more before it closes them and exits

Used by `cargo xtask bench` (W11) and the e2e test proxy::a_burst_of_server_first_connections.
"""
import asyncio
import resource
import sys
import time

BANNER = b"SSH-2.0-egress-burst\r\n"


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, want))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


async def serve(host, port):
    async def one(reader, writer):
        try:
            writer.write(BANNER)
            await writer.drain()
            await reader.read()  # until the client closes
        except OSError:
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(one, host, port, backlog=65535, reuse_address=True)
    print("listening", flush=True)
    async with server:
        await server.serve_forever()


async def burst(host, port, n, secs, hold=0.0):
    t0 = time.monotonic()
    deadline = t0 + secs
    done = []  # (ok, seconds since the start)
    writers = []

    async def one():
        try:
            left = max(0.0, deadline - time.monotonic())
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), left)
            writers.append(writer)
            left = max(0.0, deadline - time.monotonic())
            line = await asyncio.wait_for(reader.readline(), left)
            done.append((line == BANNER, time.monotonic() - t0))
        except (OSError, asyncio.TimeoutError):
            done.append((False, time.monotonic() - t0))

    await asyncio.gather(*(one() for _ in range(n)))
    served = [t for ok, t in done if ok]
    last = max(served) if served else float("nan")
    if hold <= 0:
        for w in writers:
            w.close()
    print(f"served={len(served)} lost={n - len(served)} last_ms={last * 1e3:.1f}", flush=True)
    if hold > 0:
        await asyncio.sleep(hold)
        for w in writers:
            w.close()
        print("closed", flush=True)


def main():
    raise_nofile()
    mode, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    if mode == "server":
        asyncio.run(serve(host, port))
    elif mode == "hold":
        asyncio.run(burst(host, port, int(sys.argv[4]), 30.0, float(sys.argv[5])))
    else:
        asyncio.run(burst(host, port, int(sys.argv[4]), float(sys.argv[5])))


if __name__ == "__main__":
    main()
