#!/usr/bin/env python3
"""Counting HTTP/1.1 proxy: `http_count.py LISTEN_PORT TARGET_PORT NAME`.

Forwards every connection to 127.0.0.1:TARGET_PORT unchanged and counts the requests
(method + path shape) it sees; prints the counts on SIGTERM/SIGINT and every 5 s to
stderr. Used by bench/roundtrips.sh to count the HTTP round trips per message between the
gateway and the router. Not for throughput runs (Python in the path).
"""
import asyncio
import collections
import re
import signal
import sys

listen, target, name = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
counts = collections.Counter()
conns = 0


def shape(method, path):
    path = path.split("?")[0]
    path = re.sub(r"/transactions/[^/]+", "/transactions/{id}", path)
    path = re.sub(r"/senders/[^/]+", "/senders/{s}", path)
    path = re.sub(r"/blob/[^/]+", "/blob/{b}", path)
    return f"{method} {path}"


async def pump_requests(reader, writer):
    buf = b""
    while True:
        while b"\r\n\r\n" not in buf:
            data = await reader.read(65536)
            if not data:
                writer.close()
                return
            buf += data
        head, buf = buf.split(b"\r\n\r\n", 1)
        lines = head.decode("latin-1").split("\r\n")
        method, path = lines[0].split(" ")[:2]
        hdrs = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            hdrs[k.strip().lower()] = v.strip()
        key = shape(method, path)
        if method == "GET" and "if-none-match" in hdrs:
            key += " (hanging)"
        counts[key] += 1
        writer.write(head + b"\r\n\r\n")
        if hdrs.get("transfer-encoding", "").lower() == "chunked":
            while True:
                while b"\r\n" not in buf:
                    buf += await reader.read(65536)
                size_line, rest = buf.split(b"\r\n", 1)
                size = int(size_line.split(b";")[0], 16)
                need = size + 2
                while len(rest) < need:
                    rest += await reader.read(65536)
                writer.write(size_line + b"\r\n" + rest[:need])
                buf = rest[need:]
                if size == 0:
                    break
        else:
            n = int(hdrs.get("content-length", "0"))
            while len(buf) < n:
                data = await reader.read(max(65536, n - len(buf)))
                if not data:
                    break
                buf += data
            writer.write(buf[:n])
            buf = buf[n:]
        await writer.drain()


async def pump(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()


async def handle(cr, cw):
    global conns
    conns += 1
    sr, sw = await asyncio.open_connection("127.0.0.1", target)
    try:
        await asyncio.gather(pump_requests(cr, sw), pump(sr, cw))
    except (ConnectionError, OSError, ValueError):
        pass
    finally:
        sw.close()
        cw.close()


def report():
    total = sum(counts.values())
    lines = [f"{name}: {total} requests over {conns} connections"]
    for k, v in sorted(counts.items()):
        lines.append(f"  {v:8d} {k}")
    return "\n".join(lines)


async def main():
    server = await asyncio.start_server(handle, "127.0.0.1", listen)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(s, stop.set)
    async with server:
        await stop.wait()
    print(report(), flush=True)


asyncio.run(main())
