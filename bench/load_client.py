"""WebSocket fan-out load: N clients speaking chatlib's protocol, in a process of their own.

``python bench/load_client.py --port P -n N -m M --server-pid PID [--mode burst|closed|open]
[--rate R] [--compression none|deflate]`` prints one JSON line of results.

Every client opens ``ws://127.0.0.1:P/ws`` and sends ``{"type": "hello", "user": ..., "after":
<last id seen, 0 on a fresh server>}``. Client #0 is also the sender: it sends M frames
``{"type": "message", "text": "m <seq> <monotonic ns> <pad>"}`` (~100 bytes on the wire). Every
client, the sender included, must receive all M; it parses each frame as JSON, keeps the
``message`` ones and takes the latency from the timestamp in ``text`` (the sender is in this
process, so one clock). chatlib answers with ``{"type": "message", "id", "ts", "user", "text"}``
(plus presence frames, which are skipped); the baseline forwards the sender's frame verbatim.
So that the load client's work per delivery is the same for both (one ``json.loads`` of the same
size and shape, one ``split``), the sender's frames also carry ``id``, ``ts`` and ``user`` fields
in chatlib's order: chatlib ignores them (it reads ``type`` and ``text``), the baseline copies
them. Without them the baseline's frames would be ~45 bytes shorter and ~0.5 µs cheaper to parse.

Receivers share one nickname (``load``; the sender is ``sender``). chatlib broadcasts the whole
presence list whenever it changes, so N distinct nicknames would make the connect phase send
O(N^2) presence frames; that is measured separately (``--users distinct``), not mixed into the
fan-out numbers.

Before timing, a barrier: the sender sends ``sync <k>`` messages until every client has seen one,
so the server has registered everyone. Then (reading /proc/PID/stat around the timed phase):

* ``burst``: the sender sends all M back-to-back (awaiting each send): throughput, and latency
  that is mostly queueing;
* ``closed``: message i+1 is sent only when all N clients got message i: unloaded latency.
* ``open``: message i is due at ``t0 + i / rate`` (``--rate`` messages/s), whatever the
  deliveries do (open loop); its timestamp is the time it was *due*, not the time it went
  out, so a sender held up by a slow server does not hide the wait (no "coordinated
  omission", as in wrk2/HdrHistogram). ``send_lag_*`` says how late the sends were.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
import time
from functools import partial

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

PAD = "x" * 40  # frame text ~ "m 123 1234567890123456789 xxxx..." -> ~100-byte frames


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))  # as chatlib does


class RawReceiver(asyncio.Protocol):
    """A WebSocket client reduced to what an open-loop receiver needs (RFC 6455, client side).

    websockets' client costs the load process ~40 µs per frame received (its parser
    generator, message assembly, a task wake-up); at N=1000 x 20 messages/s it is 90 %
    busy and its own queueing, not the server, makes the tail latency. This one parses
    the server's frames in ``data_received`` (unmasked, unfragmented text frames; pings
    are answered, a close ends it) and hands each to ``deliver(raw, now)`` at once, so
    that latency is the server's plus one ``json.loads``. ``--mode open`` uses its
    subclass :class:`StampedReceiver` for the receivers (the sender, client #0, stays a
    websockets client); bench/http_fanout.py uses it for its WebSocket rows.
    """

    def __init__(self, deliver, gone) -> None:
        self.deliver, self.gone = deliver, gone
        self.buffer = bytearray()
        self.opened: asyncio.Future = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.closed = False

    @classmethod
    async def connect(cls, port: int, user: str, deliver, gone) -> RawReceiver:
        loop = asyncio.get_running_loop()
        _, self = await loop.create_connection(lambda: cls(deliver, gone), "127.0.0.1", port)
        return await self._handshake(port, user)

    async def _handshake(self, port: int, user: str) -> RawReceiver:
        """The opening handshake, then chatlib's hello."""
        key = base64.b64encode(os.urandom(16)).decode()
        self.transport.write(
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\n\r\n".encode())
        await asyncio.wait_for(self.opened, 30)
        self.send(0x1, dumps({"type": "hello", "user": user, "after": 0}).encode())
        return self

    def connection_made(self, transport) -> None:
        self.transport = transport

    def send(self, opcode: int, data: bytes) -> None:
        """One masked frame (a client must mask, RFC 6455 5.3)."""
        n = len(data)
        head = bytes((0x80 | opcode, 0x80 | n)) if n < 126 else struct.pack(
            "!BBH", 0x80 | opcode, 0xFE, n)
        mask = os.urandom(4)
        key = int.from_bytes((mask * (n // 4 + 1))[:n], "big")
        self.transport.write(head + mask + (int.from_bytes(data, "big") ^ key).to_bytes(n, "big"))

    def data_received(self, data: bytes) -> None:
        self.feed(data, (time.monotonic_ns(),))

    def feed(self, data: bytes, stamps: tuple) -> int:
        """Parse what arrived; each text frame completed goes to ``deliver(payload, *stamps)``.

        Returns how many text frames this completed.
        """
        buffer = self.buffer
        frames = 0
        buffer += data
        if not self.opened.done():
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return 0
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.opened.set_exception(RuntimeError(bytes(buffer[:200])))
                return 0
            del buffer[:end + 4]
            self.opened.set_result(None)
        pos, size = 0, len(buffer)
        while size - pos >= 2:
            first, length = buffer[pos], buffer[pos + 1]  # server frames are not masked
            start = pos + 2
            if length >= 126:
                start = pos + (4 if length == 126 else 10)
                if start > size:
                    break  # the extended length is not all here yet
                length = int.from_bytes(buffer[pos + 2:start], "big")
            if start + length > size:
                break
            payload = bytes(buffer[start:start + length])
            pos = start + length
            opcode = first & 0x0F
            if opcode == 0x1:
                self.deliver(payload, *stamps)
                frames += 1
            elif opcode == 0x9:  # ping: pong (the baseline pings every 20 s)
                self.send(0xA, payload)
            elif opcode == 0x8:
                self.closed = True
                self.gone(int.from_bytes(payload[:2], "big") if len(payload) >= 2 else None)
                self.transport.close()
                break
        del buffer[:pos]
        return frames

    def connection_lost(self, exc) -> None:
        if not self.closed:
            self.closed = True
            self.gone(None)

    async def close(self) -> None:
        if not self.closed:
            self.closed = True  # ours: not the server closing early
            self.send(0x8, struct.pack("!H", 1000))
        self.transport.close()


# The kernel's receive timestamps (socket(7)): Python's socket module does not name them.
# 35 is SO_TIMESTAMPNS (= SCM_TIMESTAMPNS) in asm-generic/socket.h, the value on x86-64 and
# arm64; its cmsg is a struct timespec (two C longs).
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
TIMESPEC = struct.Struct("@ll")
CMSG_SPACE = socket.CMSG_SPACE(TIMESPEC.size)
# One read buffer for all StampedReceivers (one read at a time, copied out at once). CPython's
# recv(n)/recvmsg(n) allocate n bytes, then shrink them to what was read; for n = 256 KiB (as
# asyncio's transports read, and as this did first) glibc may answer with mmap, mremap and
# munmap: three system calls per read (strace: ~18,000 of each in a 2 s run at N=1000),
# depending on whether the process's history has raised glibc's dynamic mmap threshold.
# The load process was 78-86 % busy at N=1000 x 20/s that way, 49-51 % with this buffer.
READ_BUFFER = [bytearray(262144)]
READ_VIEW = memoryview(READ_BUFFER[0])


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME - CLOCK_MONOTONIC now, in ns, to within ~1 µs.

    SO_TIMESTAMPNS stamps are CLOCK_REALTIME; the load process's send schedule and its own
    receive times are CLOCK_MONOTONIC. The two clocks run at the same rate (NTP's frequency
    adjustment slews both; only a step, e.g. settimeofday, moves REALTIME alone), so a stamp
    minus this offset is a monotonic time. It is taken as the reading of REALTIME between two
    of MONOTONIC closest together (of 20), and again at the end of the run to catch a step.
    """
    best = None
    for _ in range(20):
        before = time.monotonic_ns()
        real = time.time_ns()
        after = time.monotonic_ns()
        if best is None or after - before < best[0]:
            best = (after - before, real - (before + after) // 2)
    return best[1]


class _SocketWriter:
    """The two transport methods RawReceiver uses, on a plain non-blocking socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock

    def write(self, data: bytes) -> None:
        # Only the handshake and control frames (< 300 bytes) are written, into a send buffer
        # that nothing else fills: send() takes them whole.
        with contextlib.suppress(OSError):  # gone: the reader sees EOF or the close frame
            self.sock.send(data)

    def close(self) -> None:
        if self.sock.fileno() >= 0:
            asyncio.get_running_loop().remove_reader(self.sock.fileno())
            self.sock.close()


class StampedReceiver(RawReceiver):
    """RawReceiver that also hands over when the kernel received the bytes.

    Latency measured where the load process reads a frame includes the load process's own
    queue: at N=1000 it reads 1,000 copies of each message, ~20 µs each, on one core, so the
    last copy is read ~20 ms after it arrived whatever the server did. The kernel stamps
    each incoming segment when it enters the receive path (SO_TIMESTAMPNS; on 127.0.0.1 that
    is inside the server's ``send()``, on the server's core) and ``recvmsg`` returns, with
    the bytes, the stamp of the *last* segment it copied: the one that completed the last
    frame of the read. So ``deliver(payload, now, kernel)`` gets the application's receive
    time ``now`` and the kernel's ``kernel`` (monotonic ns, see :func:`realtime_offset_ns`;
    None if the read carried no stamp). A frame read together with a later one gets the later
    one's stamp (an upper bound: its latency can only be overstated); ``shared_reads`` counts
    such frames. asyncio's transports do not pass ancillary data, hence a socket of its own,
    read with ``loop.add_reader`` and ``recvmsg`` (the same one system call per read).
    """

    offset_ns = 0  # CLOCK_REALTIME - CLOCK_MONOTONIC, set by the load before connecting

    def __init__(self, deliver, gone) -> None:
        super().__init__(deliver, gone)
        self.sock: socket.socket | None = None
        self.shared_reads = self.unstamped_reads = 0

    @classmethod
    async def connect(cls, port: int, user: str, deliver, gone) -> StampedReceiver:
        loop = asyncio.get_running_loop()
        self = cls(deliver, gone)
        self.sock = sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as asyncio's
            await loop.sock_connect(sock, ("127.0.0.1", port))
        except BaseException:
            sock.close()
            raise
        self.transport = _SocketWriter(sock)
        loop.add_reader(sock.fileno(), self._read_ready)
        return await self._handshake(port, user)

    def _read_ready(self) -> None:
        try:
            size, ancillary, _, _ = self.sock.recvmsg_into(READ_BUFFER, CMSG_SPACE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            size, ancillary = 0, []
        now = time.monotonic_ns()
        data = READ_VIEW[:size]  # feed() copies it into the connection's buffer at once
        if not size:  # EOF or reset
            self.transport.close()
            self.connection_lost(None)
            return
        kernel = None
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                sec, nsec = TIMESPEC.unpack(value)
                kernel = sec * 1_000_000_000 + nsec - self.offset_ns
        if kernel is None:
            self.unstamped_reads += 1
        frames = self.feed(data, (now, kernel))
        if frames > 1:
            self.shared_reads += frames - 1


def proc_cpu(pid: int) -> tuple[float, float, float]:
    """(user, sys, total) CPU seconds of a process.

    user and sys come from /proc/PID/stat in clock ticks (10 ms); total, which is user+sys,
    comes from /proc/PID/task/*/schedstat in nanoseconds, precise enough for runs under 1 s.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    total_ns = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total_ns += int(f.read().split()[0])
        except OSError:
            pass  # a thread that just ended
    return int(fields[11]) / tick, int(fields[12]) / tick, total_ns / 1e9


def system_busy_s() -> float:
    """CPU seconds all cores spent busy (not idle/iowait), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def status_kb(pid: int, key: str = "VmRSS") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def kernel_counters(pid: int) -> dict[str, int]:
    """Counters that explain a run's system time: the machine's TCP segments and ACKs
    (/proc/net/snmp, /proc/net/netstat; machine-wide, so read them on a quiet machine), and
    the server's context switches (a voluntary one is its event loop sleeping in epoll).
    (/proc/PID/io's syscw does not count ``send()`` on a socket: it stays 0 here.)"""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if "ctxt_switches:" in line:
                key, value = line.split(":")
                out[f"server_{key.split('_')[0]}_switches"] = int(value)
    for path in ("/proc/net/snmp", "/proc/net/netstat"):
        with contextlib.suppress(OSError), open(path) as f:
            lines = f.read().splitlines()
            for names, values in zip(lines[::2], lines[1::2], strict=False):
                kind, names = names.split(":")
                for name, value in zip(names.split(), values.split(":")[1].split(),
                                       strict=False):
                    if (kind, name) in _TCP_COUNTERS:
                        out[name] = int(value)
    return out


_TCP_COUNTERS = {("Tcp", "OutSegs"), ("Tcp", "InSegs"), ("TcpExt", "DelayedACKs"),
                 ("TcpExt", "TCPHPAcks"), ("TcpExt", "TCPPureAcks"), ("TcpExt", "TCPHPHits"),
                 ("TcpExt", "TCPBacklogCoalesce"), ("TcpExt", "TCPRcvCoalesce"),
                 ("TcpExt", "TCPDelivered")}


def counters_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What happened between two :func:`kernel_counters` readings."""
    return {key: after[key] - before[key] for key in before if key in after}


def percentile(sorted_values: list, p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, round(p / 100 * (len(sorted_values) - 1))))
    return sorted_values[k]


def summary(n, m, delivered, lat_ns, t0, t_end, cpu0, cpu1, my0, my1, sys0, sys1) -> dict:
    """Results of the timed phase; ``other_cpu_s`` is CPU used by neither server nor load
    (other processes on the machine) while it ran: a check that the measurement was clean."""
    lat_ns.sort()
    total_s = (t_end - t0) / 1e9
    user_s, sys_s, cpu_s = (after - before for after, before in zip(cpu1, cpu0, strict=True))
    return dict(
        N=n, M=m, delivered=delivered, expected=n * m, total_s=total_s,
        deliveries_per_s=delivered / total_s if total_s > 0 else 0,
        lat_p50_ms=percentile(lat_ns, 50) / 1e6, lat_p99_ms=percentile(lat_ns, 99) / 1e6,
        lat_p999_ms=percentile(lat_ns, 99.9) / 1e6,
        lat_max_ms=lat_ns[-1] / 1e6 if lat_ns else float("nan"),
        server_cpu_s=cpu_s, server_utime_s=user_s, server_stime_s=sys_s,
        server_cpu_us_per_delivery=cpu_s / max(delivered, 1) * 1e6,
        server_user_us_per_delivery=user_s / max(delivered, 1) * 1e6,
        server_sys_us_per_delivery=sys_s / max(delivered, 1) * 1e6,
        client_cpu_s=my1 - my0, client_busy=(my1 - my0) / total_s if total_s > 0 else 0.0,
        other_cpu_s=max(0.0, (sys1 - sys0) - (user_s + sys_s) - (my1 - my0)),
    )


def kernel_arrival(kern_lat: list[int], gap_by_decile: list[list[int]], first_kern: list[int],
                   last_kern: list[int]) -> dict:
    """Open mode's second view of latency, from the kernel's receive stamps (ms).

    ``kern_*``: kernel arrival - due, the server's delivery latency without the load
    process's queue. ``gap_*``: application receive time - kernel arrival, the load
    process's queue, overall and by the delivery's place in its message's read order
    (deciles: the first 10 % of receivers to read it, ..., the last 10 %). ``first_*``: the
    earliest kernel arrival - due, per message (the server's reaction time); ``spread_*``:
    latest - earliest kernel arrival per message, how long the server took to write it to
    everyone.
    """
    kern_lat.sort()
    gaps = sorted(g for decile in gap_by_decile for g in decile)
    got = [i for i, first in enumerate(first_kern) if first is not None]  # seen with a stamp
    firsts = sorted(first_kern[i] for i in got)
    spreads = sorted(last_kern[i] - first_kern[i] for i in got)
    ms = 1e6
    return dict(
        kern_n=len(kern_lat),
        kern_p50_ms=percentile(kern_lat, 50) / ms, kern_p99_ms=percentile(kern_lat, 99) / ms,
        kern_p999_ms=percentile(kern_lat, 99.9) / ms, kern_max_ms=kern_lat[-1] / ms,
        gap_p50_ms=percentile(gaps, 50) / ms, gap_p99_ms=percentile(gaps, 99) / ms,
        gap_by_decile_p50_ms=[percentile(sorted(d), 50) / ms for d in gap_by_decile],
        first_p50_ms=percentile(firsts, 50) / ms, first_p99_ms=percentile(firsts, 99) / ms,
        spread_p50_ms=percentile(spreads, 50) / ms, spread_p99_ms=percentile(spreads, 99) / ms,
        spread_max_ms=spreads[-1] / ms if spreads else float("nan"),
    )


async def timed_phase(send_all, all_done: asyncio.Event, timeout: float, server_pid: int):
    """Run ``send_all()`` until every delivery is in (``all_done``) or ``timeout`` passes.

    Returns ``(timed_out, t_stop_ns, (server_cpu, own_cpu, system_busy))`` read at the end.
    """
    sending = asyncio.create_task(send_all())
    timed_out = False
    try:
        await asyncio.wait_for(all_done.wait(), max(1.0, timeout))
        await sending
    except TimeoutError:
        timed_out = True
        sending.cancel()
    t_stop = time.monotonic_ns()
    return timed_out, t_stop, (proc_cpu(server_pid), time.process_time(), system_busy_s())


async def run(a: argparse.Namespace) -> dict:
    url = f"ws://127.0.0.1:{a.port}/ws"
    compression = "deflate" if a.compression == "deflate" else None
    n, m, loop = a.n, a.m, asyncio.get_running_loop()
    deadline = loop.time() + a.timeout
    conns: list = [None] * n
    gate = asyncio.Semaphore(50)  # bounded connect concurrency (listen backlog)

    def nickname(i: int) -> str:
        if i == 0:
            return "sender"
        return f"load{i}" if a.users == "distinct" else "load"

    async def open_one(i: int) -> None:
        if a.mode == "open" and i > 0:  # receivers only: see RawReceiver, StampedReceiver
            async with gate:
                conns[i] = await StampedReceiver.connect(a.port, nickname(i),
                                                         partial(deliver, i), partial(gone, i))
            return
        async with gate:
            ws = await connect(url, compression=compression, ping_interval=None,
                               open_timeout=30, close_timeout=5, max_queue=64,
                               max_size=2**22)
            await ws.send(json.dumps({"type": "hello", "user": nickname(i), "after": 0}))
            conns[i] = ws

    synced = [False] * n
    got = [0] * n
    last_recv = [0] * n
    lat: list[int] = []
    per_seq: dict[int, int] = {}
    seq_done = asyncio.Event()
    all_done = asyncio.Event()
    remaining = [n]
    closes: list = []  # (client, close code) of connections the server closed early
    other_frames = [0]

    loads, record = json.loads, lat.append
    closed_mode = a.mode == "closed"
    # Open mode, StampedReceivers only: when the kernel received each delivery.
    kern_lat: list[int] = []  # kernel arrival - due
    readers_before = [0] * m  # per message: receivers that read it so far (its read order)
    first_kern: list = [None] * m  # per message: earliest kernel latency ...
    last_kern: list = [None] * m  # ... and latest
    gap_by_decile: list[list[int]] = [[] for _ in range(10)]  # app - kernel, by read order

    def stamped(seq: int, due: int, now: int, kernel: int) -> None:
        """Bookkeeping of one delivery whose kernel arrival time is known."""
        latency = kernel - due
        kern_lat.append(latency)
        position = readers_before[seq]
        readers_before[seq] = position + 1
        gap_by_decile[position * 10 // n].append(now - kernel)
        if position == 0:
            first_kern[seq] = last_kern[seq] = latency
        elif latency < first_kern[seq]:
            first_kern[seq] = latency
        elif latency > last_kern[seq]:
            last_kern[seq] = latency

    def deliver(i: int, raw, now: int, kernel: int | None = None) -> None:
        """One frame received by client ``i`` at ``now`` (monotonic ns), which the kernel
        received at ``kernel`` (monotonic ns; StampedReceivers only)."""
        frame = loads(raw)
        if frame.get("type") != "message":
            other_frames[0] += 1  # presence, typing, error
            return
        text = frame["text"]
        if text[0] == "s":  # "sync <k>"
            synced[i] = True
            return
        _, seq, ts, _ = text.split(" ", 3)
        due = int(ts)
        record(now - due)
        if kernel is not None:
            stamped(int(seq), due, now, kernel)
        got[i] += 1
        last_recv[i] = now
        if closed_mode:
            count = per_seq.get(seq, 0) + 1
            per_seq[seq] = count
            if count == n:
                seq_done.set()
        if got[i] == m:
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    def gone(i: int, code: int | None) -> None:
        """Client ``i``'s connection was closed by the server (``code``: its close code)."""
        if code is not None:
            closes.append((i, code))
        if got[i] < m:  # closed early (1013: chatlib's queue for it overflowed): give up
            remaining[0] -= 1
            if remaining[0] == 0:
                all_done.set()

    async def reader(i: int, ws) -> None:
        mono = time.monotonic_ns
        try:
            async for raw in ws:
                deliver(i, raw, mono())
        except ConnectionClosed as exc:
            gone(i, exc.rcvd.code if exc.rcvd is not None else None)

    t_c0 = time.monotonic()
    readers = []
    StampedReceiver.offset_ns = offset0 = realtime_offset_ns()
    try:
        await asyncio.wait_for(asyncio.gather(*(open_one(i) for i in range(n))), a.timeout)
        connect_s = time.monotonic() - t_c0
        ext = conns[0].response.headers.get("Sec-WebSocket-Extensions")
        readers = [asyncio.create_task(reader(i, ws)) for i, ws in enumerate(conns)
                   if not isinstance(ws, RawReceiver)]
        sender = conns[0]

        # Barrier: the server has registered every client once each has seen a sync message.
        for k in range(400):  # bounded: <= 400 x 50 ms
            await sender.send(json.dumps({"type": "message", "text": f"sync {k}"}))
            await asyncio.sleep(0.05)
            if all(synced):
                break
        else:
            raise RuntimeError(f"sync barrier failed: {sum(synced)}/{n} clients registered")
        ready_s = time.monotonic() - t_c0  # connected, and registered by the server
        await asyncio.sleep(0.3)  # let in-flight sync copies drain
        rss_connected = status_kb(a.server_pid)

        counters0 = kernel_counters(a.server_pid)
        cpu0, my0, sys0 = proc_cpu(a.server_pid), time.process_time(), system_busy_s()
        t0 = time.monotonic_ns()

        lags: list[int] = []

        async def send_all() -> None:
            if a.mode == "open":
                return await send_on_schedule()
            for seq in range(m):
                if a.mode == "closed":
                    seq_done.clear()
                text = f"m {seq} {time.monotonic_ns()} {PAD}"
                await sender.send(dumps({"type": "message", "id": seq, "ts": time.time(),
                                         "user": "sender", "text": text}))
                if a.mode == "closed":
                    await seq_done.wait()

        async def send_on_schedule() -> None:
            interval = round(1e9 / a.rate)
            start = time.monotonic_ns() + interval
            mono = time.monotonic_ns
            for seq in range(m):
                due = start + seq * interval
                # asyncio's timers wake up to ~1 ms late (epoll's timeout is in whole ms,
                # rounded up): sleep till 2 ms before, then spin (< 2 % of the load core).
                wait = due - 2_000_000 - mono()
                if wait > 0:
                    await asyncio.sleep(wait / 1e9)
                while mono() < due:
                    pass
                lags.append(mono() - due)
                text = f"m {seq} {due} {PAD}"  # latency counts from when it was due
                await sender.send(dumps({"type": "message", "id": seq, "ts": time.time(),
                                         "user": "sender", "text": text}))

        timed_out, t_stop, (cpu1, my1, sys1) = await timed_phase(
            send_all, all_done, deadline - loop.time(), a.server_pid)
        counters = counters_delta(counters0, kernel_counters(a.server_pid))
        t_end = max(last_recv) if any(last_recv) else t_stop
        rss_after = status_kb(a.server_pid)
        res = summary(n, m, sum(got), lat, t0, t_end, cpu0, cpu1, my0, my1, sys0, sys1)
        if lags:
            lags.sort()
            res.update(rate=a.rate, send_lag_p50_ms=percentile(lags, 50) / 1e6,
                       send_lag_p99_ms=percentile(lags, 99) / 1e6)
        if kern_lat:
            stamped_conns = [c for c in conns if isinstance(c, StampedReceiver)]
            res.update(kernel_arrival(kern_lat, gap_by_decile, first_kern, last_kern),
                       clock_step_us=(realtime_offset_ns() - offset0) / 1e3,
                       shared_reads=sum(c.shared_reads for c in stamped_conns),
                       unstamped_reads=sum(c.unstamped_reads for c in stamped_conns))
        res.update(mode=a.mode, compression=a.compression, negotiated_ext=ext,
                   users=a.users, connect_s=round(connect_s, 3), ready_s=round(ready_s, 3),
                   timed_out=timed_out,
                   server_VmRSS_connected_kB=rss_connected, server_VmRSS_after_kB=rss_after,
                   early_closes=len(closes), early_close_codes=sorted({c for _, c in closes}),
                   other_frames=other_frames[0], counters=counters)
        return res
    finally:
        for task in readers:
            task.cancel()

        async def close(ws) -> None:
            try:
                await asyncio.wait_for(ws.close(), 5)
            except Exception:
                pass

        await asyncio.wait_for(asyncio.gather(*(close(ws) for ws in conns if ws is not None),
                                              return_exceptions=True), 60)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("-n", type=int, required=True, help="clients (the sender is one of them)")
    p.add_argument("-m", type=int, required=True, help="messages the sender sends")
    p.add_argument("--server-pid", type=int, required=True, help="for CPU and RSS from /proc")
    p.add_argument("--mode", choices=["burst", "closed", "open"], default="burst")
    p.add_argument("--rate", type=float, default=100,
                   help="open mode: messages per second (M of them: M / rate seconds)")
    p.add_argument("--compression", choices=["none", "deflate"], default="none")
    p.add_argument("--users", choices=["shared", "distinct"], default="shared")
    p.add_argument("--timeout", type=float, default=120)
    a = p.parse_args()
    print(json.dumps(asyncio.run(run(a))), flush=True)


if __name__ == "__main__":
    main()
