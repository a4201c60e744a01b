"""Raw HTTP/1.1 over a socket for the fuzzer: send bytes exactly as given, read one answer.

The fuzzer must not be protected by a client library: no normalised URL, no fixed-up
headers, no Content-Length computed for it. :func:`exchange` writes the bytes and reads the
first final response's status line, headers and (bounded) body, and says how it ended.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass, field

MAX_BODY = 1 << 20
"""Read at most this much of a response body (the fuzzer never needs more)."""


@dataclass
class Answer:
    outcome: str
    """``"answered"``, ``"closed"`` (the server hung up without a status line), ``"reset"``
    (connection reset by the server) or ``"hang"`` (nothing within the deadline)."""
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0


def parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> bytes:
    if "content-length" in headers:
        return await reader.readexactly(min(int(headers["content-length"]), MAX_BODY))
    if "chunked" in headers.get("transfer-encoding", ""):
        body = bytearray()
        while len(body) < MAX_BODY:  # bounded by MAX_BODY (and the caller's deadline)
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                break
            body += await reader.readexactly(size)
            await reader.readexactly(2)
        return bytes(body)
    return await reader.read(MAX_BODY)


async def exchange(port: int, data: bytes, *, deadline: float = 30.0,
                   head_only: bool = False, host: str = "127.0.0.1") -> Answer:
    """Send ``data`` on a new connection; the first final answer within ``deadline`` s."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    writer = None
    try:
        async with asyncio.timeout(deadline):
            reader, writer = await asyncio.open_connection(host, port, limit=1 << 17)
            try:
                writer.write(data)
                await writer.drain()
            except (ConnectionResetError, BrokenPipeError):
                pass  # the server may answer (and close) before it has read everything
            while True:  # 1xx interim answers (100 Continue) come before the final one
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except asyncio.IncompleteReadError:
                    return Answer("closed", seconds=loop.time() - start)
                except asyncio.LimitOverrunError:
                    return Answer("answered", status=-1, seconds=loop.time() - start)
                status, headers = parse_head(head)
                if not 100 <= status < 200 or status == 101:
                    break
            body = b""
            streaming = headers.get("content-type", "").startswith("text/event-stream")
            if not head_only and status != 101 and not streaming \
                    and not data.startswith(b"HEAD"):
                with contextlib.suppress(asyncio.IncompleteReadError, ValueError):
                    body = await read_body(reader, headers)
            return Answer("answered", status, headers, body, loop.time() - start)
    except TimeoutError:
        return Answer("hang", seconds=loop.time() - start)
    except ConnectionResetError:
        return Answer("reset", seconds=loop.time() - start)
    finally:
        if writer is not None:
            writer.transport.abort()  # no TIME_WAIT pile-up on our side; we are done
