"""What the HTTP edge costs and whether refused clients learn why: ``python bench/edge.py``.

Starts ``python -m chatlib serve`` (from this checkout, or from ``--source DIR`` to measure
another version side by side) on a free port and measures, over raw sockets:

* ``chunks``: one ``POST /api/messages`` whose body is 1-byte chunks (``1\\r\\n{\\r\\n``) for
  ``--chunk-kb`` KB of framing: the server's CPU seconds for it (from /proc), what the
  client got back and when;
* ``post-1mb``: ``--tries`` POSTs of 1 MB (64 KB is the limit): how many clients read the 413;
* ``ws-1009``: ``--tries`` WebSocket clients that send a 1 MB frame (64 KB is the limit): how
  many read the 1009 close frame.

Prints one line per figure. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def chat_server(source: Path):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(source)}
    process = subprocess.Popen([sys.executable, "-m", "chatlib", "serve", "--port", str(port)],
                               env=env, cwd=source, stdout=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "serving" in line, line
        yield process.pid, port
    finally:
        process.terminate()
        process.wait(10)


async def chunk_attack(port: int, pid: int, kb: int) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    body = b"1\r\n{\r\n" * (kb * 1024 // 6)
    before, start = cpu_seconds(pid), time.monotonic()
    status = "no answer"
    try:
        writer.write(head)
        for i in range(0, len(body), 65536):
            writer.write(body[i:i + 65536])
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
    except OSError as exc:
        status = f"send failed ({type(exc).__name__})"
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(60):
            answer = await reader.readuntil(b"\r\n")
            status = answer.decode().strip()
    elapsed = time.monotonic() - start
    writer.close()
    await asyncio.sleep(0.5)  # let the server finish whatever it still parses
    return (f"chunks: {kb} KB of 1-byte chunks -> {status!r} after {elapsed:.2f} s; "
            f"server CPU {cpu_seconds(pid) - before:.3f} s")


async def big_post(port: int) -> bool:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"POST /api/messages HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n")
        with contextlib.suppress(OSError):
            for _ in range(16):
                writer.write(b"x" * 65536)
                await writer.drain()
        async with asyncio.timeout(10):
            return (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 413")
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        writer.close()


async def big_frame(port: int) -> bool:
    """Like most simple clients, write the whole frame first, then read."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
                     b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n")
        async with asyncio.timeout(10):
            await reader.readuntil(b"\r\n\r\n")
        # A masked text frame of 1 MB (mask 0: the payload goes out as is).
        frame = bytes([0x81, 0xFF]) + (1_048_576).to_bytes(8, "big") + bytes(4)
        with contextlib.suppress(OSError):
            writer.write(frame)
            for _ in range(16):
                writer.write(b"x" * 65536)
                await writer.drain()
        async with asyncio.timeout(10):
            head = await reader.readexactly(4)
        return head[0] == 0x88 and int.from_bytes(head[2:4], "big") == 1009
    except (OSError, asyncio.IncompleteReadError, TimeoutError):
        return False
    finally:
        writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--source", type=Path, default=ROOT, help="checkout to run chatlib from")
    parser.add_argument("--chunk-kb", type=int, default=420)
    parser.add_argument("--tries", type=int, default=80)
    args = parser.parse_args()
    with chat_server(args.source.resolve()) as (pid, port):
        print(await chunk_attack(port, pid, args.chunk_kb), flush=True)
        got = [await big_post(port) for _ in range(args.tries)]
        print(f"post-1mb: {sum(got)}/{len(got)} clients read the 413", flush=True)
        got = [await big_frame(port) for _ in range(args.tries)]
        print(f"ws-1009: {sum(got)}/{len(got)} clients read the 1009 close frame", flush=True)


if __name__ == "__main__":
    asyncio.run(main())
