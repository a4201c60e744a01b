"""Long-poll and SSE fan-out load: N HTTP clients in a process of their own.

``python bench/http_fanout.py --transport longpoll|sse --port P -n N -m M --server-pid PID``
prints one JSON line of results (same fields as ``load_client.py``).

The clients are raw asyncio HTTP/1.1 on keep-alive connections (no httpx: its per-request
cost would make the load process, not the server, the bottleneck on 2 cores):

* ``longpoll``: each client loops ``GET /api/messages?after=<cursor>&wait=25`` and advances its
  cursor to the newest id it got (a response carries every message after the cursor, so under a
  burst one response delivers many);
* ``sse``: each client holds one ``GET /api/events?after=0`` stream (chunked) and parses
  ``event: message`` / ``data: {...}`` blocks;
* ``ws``: each client is a WebSocket on ``/ws`` (load_client's lean ``RawReceiver``), so that
  WebSocket's cost per delivery is measured under the *same* sender as SSE and long polling
  (one ``POST`` at a time: one message in flight), not under a burst of frames.

One more connection is the sender: it ``POST``s ``/api/messages`` ``{"user": "sender", "text":
"m <seq> <monotonic ns> <pad>"}`` M times back-to-back (each waits for its 201). The server's
HTTP rate limit must be raised for that (the orchestrator starts chatlib with ``--rate``).
Before timing, ``sync <k>`` messages are posted until every client has seen one. Deliveries
count the N receivers only (the sender receives nothing over HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from functools import partial

from load_client import PAD, RawReceiver, proc_cpu, status_kb, summary, system_busy_s, timed_phase


class Http:
    """One keep-alive HTTP/1.1 connection to 127.0.0.1 (just enough HTTP for this bench)."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.requests = 0

    async def open(self) -> Http:
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port,
                                                                 limit=2**22)
        return self

    def send_request(self, method: str, target: str, body: bytes = b"", extra: str = "") -> None:
        head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"Content-Length: {len(body)}\r\n{extra}\r\n")
        self.writer.write(head.encode() + body)
        self.requests += 1

    async def read_head(self) -> tuple[int, dict[str, str]]:
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        headers = {}
        for line in lines[1:]:
            if ":" in line:
                name, value = line.split(":", 1)
                headers[name.strip().lower()] = value.strip()
        return status, headers

    async def read_chunk(self) -> bytes:
        """One chunk of a chunked body; b"" at the end."""
        size = int((await self.reader.readline()).split(b";")[0], 16)
        data = await self.reader.readexactly(size + 2)
        return data[:-2]

    async def request(self, method: str, target: str, body: bytes = b"",
                      extra: str = "") -> tuple[int, bytes]:
        self.send_request(method, target, body, extra)
        status, headers = await self.read_head()
        if "content-length" in headers:
            return status, await self.reader.readexactly(int(headers["content-length"]))
        parts = []
        for _ in range(1_000_000):  # bounded
            chunk = await self.read_chunk()
            if not chunk:
                break
            parts.append(chunk)
        return status, b"".join(parts)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def run(a: argparse.Namespace) -> dict:
    n, m, loop = a.n, a.m, asyncio.get_running_loop()
    deadline = loop.time() + a.timeout
    synced = [False] * n
    got = [0] * n
    last_recv = [0] * n
    polls = [0] * n
    lat: list[int] = []
    all_done = asyncio.Event()
    remaining = [n]
    errors: list[str] = []

    def deliver(i: int, text: str, now: int) -> None:
        if text[0] == "s":  # "sync <k>"
            synced[i] = True
            return
        _, _seq, ts, _ = text.split(" ", 3)
        lat.append(now - int(ts))
        got[i] += 1
        last_recv[i] = now
        if got[i] == m:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    async def long_poller(i: int, http: Http) -> None:
        cursor, loads, mono = 0, json.loads, time.monotonic_ns
        for _ in range(10_000_000):  # bounded; the task is cancelled when the run ends
            status, body = await http.request("GET", f"/api/messages?after={cursor}&wait=25")
            now = mono()
            polls[i] += 1
            if status != 200:
                errors.append(f"{status} {body[:100]!r}")
                return
            for message in loads(body)["messages"]:
                deliver(i, message["text"], now)
                cursor = message["id"]

    async def sse_reader(i: int, http: Http) -> None:
        loads, mono = json.loads, time.monotonic_ns
        http.send_request("GET", "/api/events?after=0", extra="Accept: text/event-stream\r\n")
        status, _headers = await http.read_head()
        if status != 200:
            errors.append(f"SSE status {status}")
            return
        buffer = ""
        for _ in range(10_000_000):  # bounded; the task is cancelled when the run ends
            chunk = await http.read_chunk()
            if not chunk:
                return
            now = mono()
            buffer += chunk.decode()
            *events, buffer = buffer.split("\n\n")
            for event in events:
                if "event: message\n" not in event:
                    continue  # retry:, presence, ping
                data = event[event.index("data: ") + 6:]
                deliver(i, loads(data)["text"], now)

    def ws_frame(i: int, raw: bytes, now: int) -> None:
        data = json.loads(raw)
        if data.get("type") == "message":
            deliver(i, data["text"], now)

    def ws_gone(i: int, code) -> None:
        if remaining[0]:
            errors.append(f"WebSocket {i} closed ({code})")

    async def ws_open(i: int) -> RawReceiver:
        return await RawReceiver.connect(a.port, "load", partial(ws_frame, i),
                                         partial(ws_gone, i))

    clients = [Http(a.port) for _ in range(n)] if a.transport != "ws" else []
    sender = Http(a.port)
    tasks: list[asyncio.Task] = []
    try:
        t_c0 = time.monotonic()
        opened = await asyncio.wait_for(asyncio.gather(
            sender.open(), *(c.open() for c in clients),
            *(ws_open(i) for i in range(n) if a.transport == "ws")), a.timeout)
        connect_s = time.monotonic() - t_c0
        if a.transport == "ws":
            clients = opened[1:]
        else:
            body_of = {"longpoll": long_poller, "sse": sse_reader}[a.transport]
            tasks = [asyncio.create_task(body_of(i, c)) for i, c in enumerate(clients)]

        async def post(text: str) -> None:
            body = json.dumps({"user": "sender", "text": text}).encode()
            status, answer = await sender.request("POST", "/api/messages", body,
                                                  "Content-Type: application/json\r\n")
            if status != 201:
                raise RuntimeError(f"POST answered {status}: {answer[:200]!r}")

        for k in range(400):  # bounded barrier: <= 400 x 50 ms
            await post(f"sync {k}")
            await asyncio.sleep(0.05)
            if all(synced):
                break
        else:
            raise RuntimeError(f"sync barrier failed: {sum(synced)}/{n} clients; {errors[:3]}")
        await asyncio.sleep(0.3)
        rss_connected = status_kb(a.server_pid)
        polls0 = sum(polls)

        cpu0, my0, sys0 = proc_cpu(a.server_pid), time.process_time(), system_busy_s()
        t0 = time.monotonic_ns()

        async def send_all() -> None:
            for seq in range(m):
                await post(f"m {seq} {time.monotonic_ns()} {PAD}")

        timed_out, t_stop, (cpu1, my1, sys1) = await timed_phase(
            send_all, all_done, deadline - loop.time(), a.server_pid)
        t_end = max(last_recv) if any(last_recv) else t_stop
        res = summary(n, m, sum(got), lat, t0, t_end, cpu0, cpu1, my0, my1, sys0, sys1)
        res.update(mode="burst", transport=a.transport, connect_s=round(connect_s, 3),
                   timed_out=timed_out, server_VmRSS_connected_kB=rss_connected,
                   server_VmRSS_after_kB=status_kb(a.server_pid),
                   responses_per_client=(sum(polls) - polls0) / n if a.transport == "longpoll"
                   else None, errors=errors[:5])
        return res
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        sender.close()
        for c in clients:
            if isinstance(c, RawReceiver):
                await c.close()
            else:
                c.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--transport", choices=["longpoll", "sse", "ws"], required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, required=True, help="receiving clients")
    p.add_argument("-m", type=int, required=True, help="messages the sender posts")
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
