"""A classroom of chatlib WebSocket clients in one process, on raw asyncio (bench/classroom.py).

``python bench/classroom_load.py --port P -n 5000 --rate 10 --duration 30 --server-pid PID``

Thousands of ``websockets`` client connections would make this process, not the server, the
bottleneck (each frame goes through a sans-I/O parser, a queue and a task switch). Here each
connection is one :class:`asyncio.Protocol` that parses the server's unmasked frames itself
and ``json.loads`` only ``message`` frames (presence frames are skipped by their prefix).

1. Connect: every client opens ``/ws`` (a hand-written upgrade request) and sends
   ``{"type": "hello", "user": "s<i>", "after": 0}`` (distinct nicknames, as in a classroom).
2. Barrier: client 0 sends ``sync <k>`` until every client has seen one; then one JSON line
   ``{"phase": "connected", ...}`` goes to stdout and the process waits for ``go`` on stdin.
3. Chat: ``rate`` messages per second in total for ``duration`` seconds, message k sent by
   client ``k * 7919 % n`` (senders spread across the room, each far below the per-connection
   limit), text ``m<pid> <k> <monotonic ns> <pad>`` (the pid tells this run's messages from
   older ones a reused server replays).
4. Verify: every client must receive every message, in order, once: chatlib numbers messages
   1, 2, 3, ... and each client joined with ``after=0``, so each client checks that every
   message frame's ``id`` is its previous one + 1 (no gap, no duplicate, no reordering) and
   counts the ``m`` messages. Latency = receive time - the timestamp in ``text`` (one clock).
   Then one JSON line ``{"phase": "done", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import resource
import struct
import sys
import time

from load_client import status_kb

PAD = "x" * 40
MESSAGE = b'{"type":"message"'


def raise_nofile(wanted: int) -> tuple[int, int]:
    """Raise this process's soft open-files limit toward the hard one; (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, wanted)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def masked(opcode: int, payload: bytes) -> bytes:
    """A client frame (FIN set): clients must mask (RFC 6455 5.3)."""
    key = os.urandom(4)
    n = len(payload)
    if n < 126:
        head = struct.pack("!BB", 0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = struct.pack("!BBH", 0x80 | opcode, 0x80 | 126, n)
    else:
        head = struct.pack("!BBQ", 0x80 | opcode, 0x80 | 127, n)
    full = (key * (n // 4 + 1))[:n]
    body = (int.from_bytes(payload, "big") ^ int.from_bytes(full, "big")).to_bytes(n, "big")
    return head + key + body


READ_BUFFER = bytearray(65536)
"""One receive buffer for every connection (``buffer_updated`` runs right after each read).
A plain :class:`asyncio.Protocol` gets a fresh 256 KiB ``bytes`` from ``sock.recv`` per read:
24 µs per read under cProfile, most of this process's time at 1,000 clients."""


class Client(asyncio.BufferedProtocol):
    """One WebSocket connection: handshake, hello, then a lean frame reader."""

    def __init__(self, room: Room, i: int) -> None:
        self.room, self.i = room, i
        self.transport: asyncio.Transport | None = None
        self.buf = b""
        self.open = False
        self.opened = room.loop.create_future()
        self.last_id = 0
        self.got = 0
        self.synced = False
        self.close_code: int | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        key = base64.b64encode(os.urandom(16)).decode()
        transport.write(f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{self.room.port}\r\n"
                        "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
                        .encode())

    def hello(self) -> dict:
        """The first frame: a distinct nickname, from the start of the default room."""
        return {"type": "hello", "user": f"s{self.i}", "after": 0}

    def send_json(self, obj: dict) -> None:
        self.transport.write(masked(0x1, json.dumps(obj, separators=(",", ":")).encode()))

    def get_buffer(self, sizehint: int) -> memoryview:
        return memoryview(READ_BUFFER)

    def buffer_updated(self, nbytes: int) -> None:
        data = bytes(READ_BUFFER[:nbytes])
        buf = self.buf + data if self.buf else data
        if not self.open:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self.buf = buf
                return
            if not buf.startswith(b"HTTP/1.1 101"):
                self.fail(f"handshake refused: {buf[:end].decode(errors='replace')[:200]}")
                return
            self.open = True
            self.send_json(self.hello())
            if not self.opened.done():
                self.opened.set_result(None)
            buf = buf[end + 4:]
        pos, size = 0, len(buf)
        while size - pos >= 2:  # bounded: each turn consumes a frame or breaks
            b0, b1 = buf[pos], buf[pos + 1]
            n, head = b1 & 0x7F, 2
            if n == 126:
                if size - pos < 4:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 4], "big"), 4
            elif n == 127:
                if size - pos < 10:
                    break
                n, head = int.from_bytes(buf[pos + 2:pos + 10], "big"), 10
            if size - pos < head + n:
                break
            payload = buf[pos + head:pos + head + n]
            pos += head + n
            opcode = b0 & 0x0F
            if opcode == 0x1:
                if payload.startswith(MESSAGE):
                    self.room.on_message(self, payload)
                elif payload.startswith(b'{"type":"error"'):  # e.g. rate limited: a failure
                    self.room.errors.append(f"client {self.i}: {payload[:200].decode()}")
            elif opcode == 0x9:  # ping: pong with the same payload
                self.transport.write(masked(0xA, payload))
            elif opcode == 0x8:
                self.close_code = int.from_bytes(payload[:2], "big") if n >= 2 else 1005
                self.transport.write(masked(0x8, payload[:2]))
        self.buf = buf[pos:] if pos < size else b""

    def fail(self, why: str) -> None:
        self.room.errors.append(f"client {self.i}: {why}")
        if not self.opened.done():
            self.opened.set_exception(RuntimeError(why))
        self.transport.close()

    def connection_lost(self, exc) -> None:
        if not self.opened.done():
            self.opened.set_exception(ConnectionError(f"client {self.i}: lost before 101"))
        self.room.on_lost(self)


class Room:
    def __init__(self, port: int, n: int) -> None:
        self.loop = asyncio.get_running_loop()
        self.port, self.n = port, n
        self.clients: list[Client] = []
        self.errors: list[str] = []
        self.order_errors = 0
        self.lat_ns: list[int] = []
        self.expected = 0  # "m" messages sent so far
        self.done_count = 0  # clients that have all ``target`` messages
        self.target = -1
        self.all_done = asyncio.Event()
        self.lost_early = 0
        self.tag = f"m{os.getpid()} "

    def on_message(self, c: Client, payload: bytes) -> None:
        now = time.monotonic_ns()
        self.count(c, json.loads(payload), now)

    def count(self, c: Client, frame: dict, now: int) -> None:
        """One message frame ``c`` received at ``now``: its id must be the previous one + 1;
        this run's messages are counted (and timed) toward ``target``."""
        if frame["id"] != c.last_id + 1:
            self.order_errors += 1
            if len(self.errors) < 20:
                self.errors.append(f"client {c.i}: id {frame['id']} after {c.last_id}")
        c.last_id = frame["id"]
        text = frame["text"]
        if text[0] == "s":
            c.synced = True
        elif text.startswith(self.tag):  # this run's (a reused server replays older ones)
            self.lat_ns.append(now - int(text.split(" ", 3)[2]))
            c.got += 1
            if c.got == self.target:
                self.done_count += 1
                if self.done_count == self.n:
                    self.all_done.set()

    def on_lost(self, c: Client) -> None:
        if self.target < 0 or c.got < self.target:
            self.lost_early += 1
            if len(self.errors) < 20:
                self.errors.append(f"client {c.i} closed early (code {c.close_code})")


def pct(values: list[int], p: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))] / 1e6


def emit(obj: dict) -> None:
    print(json.dumps(obj), flush=True)


async def run(a: argparse.Namespace) -> None:
    soft, hard = raise_nofile(a.n + 100)
    if soft < a.n + 50:
        emit({"phase": "error", "error": f"this process may open only {soft} files (hard limit "
              f"{hard}): not enough for {a.n} clients; raise `ulimit -Hn` (as root or in "
              "/etc/security/limits.conf)"})
        return
    room = Room(a.port, a.n)
    loop = room.loop
    gate = asyncio.Semaphore(a.concurrency)  # bounded connect concurrency (listen backlog)

    async def open_one(i: int) -> None:
        async with gate:
            client = Client(room, i)
            await loop.create_connection(lambda: client, "127.0.0.1", a.port)
            room.clients.append(client)
            await asyncio.wait_for(client.opened, 30)

    t0 = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(a.n))), a.timeout)
    connect_s = time.monotonic() - t0
    room.clients.sort(key=lambda c: c.i)
    first = room.clients[0]
    for k in range(600):  # bounded: <= 600 x 50 ms
        first.send_json({"type": "message", "text": f"sync {k}"})
        await asyncio.sleep(0.05)
        if all(c.synced for c in room.clients):
            break
    else:
        raise RuntimeError(f"sync barrier: {sum(c.synced for c in room.clients)}/{a.n} synced")
    ready_s = time.monotonic() - t0
    await asyncio.sleep(0.5)  # in-flight sync copies drain
    emit({"phase": "connected", "N": a.n, "connect_s": round(connect_s, 3),
          "ready_s": round(ready_s, 3), "nofile_soft": soft, "nofile_hard": hard,
          "server_VmRSS_connected_kB": status_kb(a.server_pid)})
    line = await loop.run_in_executor(None, sys.stdin.readline)
    if line.strip() != "go":
        return
    m = round(a.rate * a.duration)
    room.target = m
    cpu0 = time.process_time()
    start = time.monotonic()
    for k in range(m):
        delay = start + k / a.rate - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        sender = room.clients[k * 7919 % a.n]
        if sender.transport.is_closing():
            room.errors.append(f"sender {sender.i} closed")
            continue
        sender.send_json({"type": "message",
                          "text": f"{room.tag}{k} {time.monotonic_ns()} {PAD}"})
    sent_s = time.monotonic() - start
    try:
        await asyncio.wait_for(room.all_done.wait(), a.drain_timeout)
        timed_out = False
    except TimeoutError:
        timed_out = True
    cpu_s = time.process_time() - cpu0
    room.lat_ns.sort()
    delivered = sum(c.got for c in room.clients)
    emit({"phase": "done", "N": a.n, "M": m, "rate": a.rate, "send_s": round(sent_s, 3),
          "delivered": delivered, "expected": a.n * m,
          "all_delivered": delivered == a.n * m and room.order_errors == 0,
          "order_errors": room.order_errors, "lost_early": room.lost_early,
          "timed_out": timed_out, "lat_p50_ms": pct(room.lat_ns, 50),
          "lat_p99_ms": pct(room.lat_ns, 99), "lat_max_ms": pct(room.lat_ns, 100),
          "load_cpu_s": round(cpu_s, 3), "load_busy": round(cpu_s / max(sent_s, 0.1), 3),
          "server_VmRSS_after_kB": status_kb(a.server_pid),
          "server_VmHWM_kB": status_kb(a.server_pid, "VmHWM"), "errors": room.errors[:20]})
    for c in room.clients:
        c.transport.close()
    await asyncio.sleep(0.2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, default=5000, help="clients")
    p.add_argument("--rate", type=float, default=10.0, help="messages per second, in total")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of chat")
    p.add_argument("--server-pid", type=int, default=None, help="for RSS from /proc")
    p.add_argument("--concurrency", type=int, default=200, help="connects in flight")
    p.add_argument("--timeout", type=float, default=120, help="for all to connect, seconds")
    p.add_argument("--drain-timeout", type=float, default=30,
                   help="seconds after the last send for every delivery to arrive")
    asyncio.run(run(p.parse_args()))


if __name__ == "__main__":
    main()
