"""A network you can dial: TCP and UDP relays that add delay, jitter, loss and cuts.

On 127.0.0.1 a round trip takes a tenth of a millisecond, so the costs a real network
imposes (long polling's extra round trip, the handshake before the first WebSocket message,
a connection that drops) never show. Put this proxy between any client (a browser, a
chatlib client, curl) and the chat server, and they do::

    proxy = await netem.start(target=server, delay=0.05, jitter=0.01)   # in a notebook
    proxy.url            # 'http://127.0.0.1:PORT/': open the chat page here
    proxy.cut()          # drop every connection now (clients see a reset)
    proxy.stall(2.0)     # deliver nothing for 2 s (the connections stay up)
    await proxy.stop()

    python -m chatlib netem --listen 9000 --target 127.0.0.1:8765 --delay 50ms

What it models, per connection and per direction (client -> server, server -> client):

* **Delay**: each chunk read from one side is written to the other ``delay`` seconds after
  it arrived, plus a uniform random ``jitter`` in ``[-jitter, +jitter]``. A chunk never
  overtakes the one before it (TCP delivers in order; jitter on a real link delays the
  packets behind a late one too), so a chunk goes out at
  ``max(arrival + delay + jitter, previous chunk's departure)``. A round trip costs about
  ``2 * delay``.
* **The TCP handshake**: the kernel completes the client's connect at once, so without help
  a new connection would save the SYN / SYN-ACK round trip. The first bytes a client sends
  on a new connection are therefore held as if sent ``2 * delay`` after the connect: a fresh
  HTTP request costs two round trips before its answer, as on a real network.
* **Bandwidth**: a token bucket per direction, ``rate`` bytes per second with bursts of up
  to ``burst`` bytes. Bytes wait for their tokens after their delay, in order.
* **Loss** (``loss=``, a probability per chunk): this relay joins two loopback TCP
  connections, and neither loses a segment, so a loss is *modelled* by its effect: the
  chunk arrives ``retransmit`` seconds late, and, because TCP delivers in order, every
  chunk behind it waits too. The default, ``2 * delay + 0.2`` (a round trip plus Linux's
  minimum retransmission timeout, ``TCP_RTO_MIN``), is a steady path's RTO: a *tail* loss,
  with nothing sent after it. With data flowing behind the loss, Linux's RACK-TLP
  (RFC 8985) detects it sooner, about ``1.25 * (2 * delay)`` after sending: pass that. That is
  head-of-line blocking; the kernel's own retransmission machinery is not involved.
* **TLS** (``tls=True``): clients speak TLS to the proxy (``https://``, ``wss://``); the
  proxy decrypts *behind* the delay and forwards plain HTTP to the target, so the TLS
  handshake's flights pay the delay as on a real network. The certificate is a fresh
  self-signed ECDSA P-256 one for ``127.0.0.1``/``localhost`` (the WebTransport server's
  kind), made at start;
  :meth:`Netem.client_ssl_context` trusts it.
* **Stalls and cuts**: :meth:`Netem.stall` holds every byte (both directions, every
  connection) for a while, like a link that goes quiet; :meth:`Netem.cut` aborts every
  connection at once, both sides get a TCP reset (``ConnectionResetError``, a WebSocket
  close 1006, an ``EventSource`` error). Both take ``after=`` to schedule them.

Settings are attributes: change ``proxy.delay`` and the next chunk uses it.

Limits: each direction buffers at most ``buffer`` bytes (256 KiB by default) between
reading and writing. When that is full the proxy stops reading from the sender, whose own
TCP window then fills: backpressure, as a slow link gives. Everything is per chunk as
``read()`` returns it, not per packet: this is not a packet-level emulator (loss is the
model above, no reordering, no MTU). The proxy listens on 127.0.0.1 only.

**UDP mode** (:func:`start_udp`, :class:`UdpNetem`): a relay for datagrams (QUIC, HTTP/3,
WebTransport), which *can* lose and reorder for real, per datagram and per direction::

    relay = await netem.start_udp(target=("127.0.0.1", 4433), delay=0.05, loss=0.02, seed=1)
    relay.address        # ('127.0.0.1', PORT): send datagrams here
    await relay.stop()

Each datagram from a client goes to the target from a socket of that client's own (as a
NAT does: the target sees one address per client), ``delay`` (plus ``jitter``) later, and
the target's answers come back the same way. With probability ``loss`` a datagram is
dropped; with probability ``reorder`` it is held ``reorder_gap`` seconds more, so that
datagrams sent after it overtake it (jitter reorders too: datagrams, unlike a byte stream,
need not leave in order). The random numbers come from ``seed``, so a run is repeatable.

For the Linux kernel's own emulator, ``tc qdisc add dev lo root netem delay 50ms`` does the
same for *all* loopback traffic (root only, and every process on the machine feels it).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import socket
import ssl
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

__all__ = ["Netem", "NetemStats", "UdpNetem", "UdpStats", "parse_duration", "parse_rate",
           "start", "start_udp"]

CHUNK = 64 * 1024
"""Largest read from a socket, in bytes."""

DEFAULT_BUFFER = 256 * 1024
"""Bytes one direction of one connection may hold between reading and writing."""

CONNECT_TIMEOUT = 10.0
"""Seconds the proxy waits for the target to accept a connection."""

_EOF = b""  # queued after the last chunk: the sender half-closed its side


@dataclass
class NetemStats:
    """What went through the proxy since it started."""

    connections: int = 0  # accepted in total
    active: int = 0  # open right now
    bytes_up: int = 0  # client -> server, written to the server
    bytes_down: int = 0  # server -> client, written to the client
    cuts: int = 0  # connections aborted by cut()
    losses: int = 0  # chunks delivered ``retransmit`` late, as if a segment was lost


class _TokenBucket:
    """``rate`` bytes per second, up to ``burst`` bytes at once; waiting is the caller's job."""

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.stamp = now

    def take(self, n: int, now: float) -> float:
        """Take ``n`` tokens; return how long to wait before sending them (0 if none)."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n  # may go negative: a debt paid by waiting, so big chunks still pass
        return 0.0 if self.tokens >= 0 else -self.tokens / self.rate


class _Direction:
    """One direction of one connection: a reader task feeding a writer task through a queue.

    Two tasks, so that bytes keep being read (and time-stamped on arrival) while earlier
    ones wait out their delay. The queue is bounded (``buffer`` bytes in ``CHUNK``-sized
    reads at most), so a full queue stops the reading: backpressure.
    """

    def __init__(self, netem: Netem, reader: asyncio.StreamReader,
                 writer: asyncio.StreamWriter, *, up: bool, not_before: float) -> None:
        self.netem, self.reader, self.writer, self.up = netem, reader, writer, up
        self.chunk = min(CHUNK, netem.buffer)
        self.queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(
            max(1, netem.buffer // self.chunk))
        self.last_departure = 0.0
        self.not_before = not_before  # the client cannot send before its handshake ends
        self.bucket: _TokenBucket | None = None
        self.busy = False  # the write loop holds a chunk it has not written yet
        self.bytes_read = 0  # from the sender, in total

    async def read_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:  # ends at EOF (or when the connection is cut: the task is cancelled)
            data = await self.reader.read(self.chunk)
            self.bytes_read += len(data)
            now = loop.time()
            if data and self.queue.empty() and not self.busy and self.netem._instant(now):
                # Nothing to wait for and nothing queued ahead: write straight through,
                # saving a task switch per chunk (the proxy's overhead at zero delay).
                self.writer.write(data)
                await self.writer.drain()
                self.netem._count(self.up, len(data))
                continue
            departure = max(now, self.not_before) + self.netem._sample_delay()
            if data:
                departure += self.netem._sample_loss()
            self.last_departure = departure = max(departure, self.last_departure)
            await self.queue.put((departure, data))
            if not data:
                return

    async def write_loop(self) -> None:
        loop = asyncio.get_running_loop()
        netem = self.netem
        while True:
            self.busy = False
            departure, data = await self.queue.get()
            self.busy = True
            while True:  # sleep until due; bounded: each round moves the clock forward
                wait = max(departure, netem._stalled_until) - loop.time()
                if wait <= 0:
                    break
                await asyncio.sleep(wait)
            if not data:
                if self.writer.can_write_eof():
                    self.writer.write_eof()  # pass the half-close on, in order
                else:  # TLS (asyncio's has no half-close): close, with close_notify
                    self.writer.close()
                return
            if netem.rate:
                if self.bucket is None or self.bucket.rate != netem.rate:
                    self.bucket = _TokenBucket(netem.rate, netem.burst, loop.time())
                wait = self.bucket.take(len(data), loop.time())
                if wait:
                    await asyncio.sleep(wait)
            self.writer.write(data)
            await self.writer.drain()  # the receiver's backpressure reaches us here
            netem._count(self.up, len(data))


class _Connection:
    """A client connection and its connection to the target, relayed both ways."""

    def __init__(self, netem: Netem, client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 server: tuple[asyncio.StreamReader, asyncio.StreamWriter],
                 accepted_at: float) -> None:
        self.writers = (client[1], server[1])
        # The client's connect returned at once; on a real network it would have waited one
        # round trip for the SYN-ACK, so its first bytes cannot leave before that.
        handshake_done = accepted_at + 2 * netem.delay
        self.directions = (
            _Direction(netem, client[0], server[1], up=True, not_before=handshake_done),
            _Direction(netem, server[0], client[1], up=False, not_before=0.0),
        )
        self.tasks: list[asyncio.Task] = []

    async def run(self) -> None:
        self.tasks = [asyncio.ensure_future(coro) for d in self.directions
                      for coro in (d.read_loop(), d.write_loop())]
        # Done when both write loops have passed their EOF on; as soon as any task fails
        # (a reset on either side, a cut), the whole connection goes, with a reset.
        failed = False
        try:
            pending = set(self.tasks)
            writers_left = {self.tasks[1], self.tasks[3]}
            while writers_left and not failed:  # bounded: each round ends at least one task
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                failed = any(t.cancelled() or t.exception() is not None for t in done)
                writers_left -= done
        finally:
            if failed:
                self.abort()
            else:
                self.close()

    def _stop_tasks(self) -> None:
        for task in self.tasks:
            task.cancel()

    def close(self) -> None:
        self._stop_tasks()
        for writer in self.writers:
            writer.close()

    def abort(self) -> None:
        """Both sides get a TCP reset (RST), as when a middlebox drops the connection."""
        self._stop_tasks()
        for writer in self.writers:
            with contextlib.suppress(OSError):
                # SO_LINGER with a zero timeout turns close() into a reset.
                sock = writer.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.transport.abort()


def _target_address(target) -> tuple[str, int, str]:
    """``(host, port, path)`` from a ChatServer, a URL, ``"host:port"`` or a tuple."""
    if isinstance(target, tuple):
        return target[0], int(target[1]), "/"
    if hasattr(target, "host") and hasattr(target, "port"):
        return target.host, int(target.port), "/"
    if hasattr(target, "url"):
        target = target.url
    text = str(target)
    if "://" not in text:
        text = "tcp://" + text
    parts = urlsplit(text)
    if not parts.hostname or not parts.port:
        raise ValueError(f"target {target!r}: expected a URL with a port, or host:port")
    return parts.hostname, parts.port, parts.path or "/"


class Netem:
    """The proxy. Create it with :func:`start` (or build it, then ``await proxy.start()``).

    Args:
        target: where to forward: a :class:`chatlib.ChatServer`, a URL such as
            ``"http://127.0.0.1:8765/"`` or ``"127.0.0.1:8765"``.
        delay: one-way delay in seconds, each direction (a round trip costs twice this).
        jitter: up to this many seconds more or less, uniformly at random, per chunk.
        rate: bandwidth cap in bytes per second per direction; ``None`` for no cap.
        burst: bytes the token bucket lets through at once (default: 16 KiB).
        port: the port to listen on, on 127.0.0.1; 0 picks a free one.
        buffer: bytes held per direction per connection before reading pauses.
        seed: seed for the jitter's and the loss's random numbers, for repeatable runs.
        loss: probability (0 to 1) that a chunk is "lost": it arrives ``retransmit`` late.
        retransmit: seconds a lost chunk is late; ``None``: ``2 * delay + 0.2``.
        tls: clients speak TLS to the proxy; it is decrypted behind the delay.
    """

    def __init__(self, target, *, delay: float = 0.0, jitter: float = 0.0,
                 rate: float | None = None, burst: int = 16 * 1024, port: int = 0,
                 buffer: int = DEFAULT_BUFFER, seed: int | None = None, loss: float = 0.0,
                 retransmit: float | None = None, tls: bool = False,
                 _server_ssl: ssl.SSLContext | None = None) -> None:
        if delay < 0 or jitter < 0:
            raise ValueError("delay and jitter must be >= 0 seconds")
        _check_probability("loss", loss)
        if retransmit is not None and retransmit < 0:
            raise ValueError("retransmit must be >= 0 seconds, or None for the default")
        if rate is not None and rate <= 0:
            raise ValueError("rate must be > 0 bytes per second, or None for no cap")
        if buffer < 1 or burst < 1:
            raise ValueError("buffer and burst must be at least 1 byte")
        self.target_host, self.target_port, self._path = _target_address(target)
        self.delay, self.jitter, self.rate, self.burst = delay, jitter, rate, burst
        self.buffer = buffer
        self.loss, self.retransmit, self.tls = loss, retransmit, tls
        self.requested_port = port
        self._server_ssl = _server_ssl  # set on the TLS terminator behind a tls=True proxy
        self._terminator: Netem | None = None
        self._certificate: bytes | None = None
        self.port: int | None = None
        self.stats = NetemStats()
        self._random = random.Random(seed)
        self._stalled_until = 0.0
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._handlers: set[asyncio.Task] = set()
        self._timers: set[asyncio.TimerHandle] = set()

    @property
    def url(self) -> str:
        """The target's URL, through the proxy: ``http://127.0.0.1:PORT/`` (``https`` with TLS)."""
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}{self._path}"

    def client_ssl_context(self) -> ssl.SSLContext:
        """An SSL context that trusts this proxy's certificate (and nothing else)."""
        if self._certificate is None:
            raise RuntimeError("this proxy was not started with tls=True")
        return ssl.create_default_context(cadata=self._certificate.decode())

    def __repr__(self) -> str:
        rate = f" rate={self.rate:g} B/s" if self.rate else ""
        return (f"<Netem {self.url} -> {self.target_host}:{self.target_port} "
                f"delay={self.delay * 1000:g} ms jitter={self.jitter * 1000:g} ms{rate}>")

    def _sample_delay(self) -> float:
        if not self.jitter:
            return self.delay
        return max(0.0, self.delay + self._random.uniform(-self.jitter, self.jitter))

    def _sample_loss(self) -> float:
        """Extra seconds for one chunk: ``retransmit`` if it is lost, else 0."""
        if not self.loss or self._random.random() >= self.loss:
            return 0.0
        self.stats.losses += 1
        return 2 * self.delay + 0.2 if self.retransmit is None else self.retransmit

    def _instant(self, now: float) -> bool:
        """True when a chunk arriving now would be written at once."""
        return (not self.delay and not self.jitter and not self.rate and not self.loss
                and now >= self._stalled_until)

    def _count(self, up: bool, n: int) -> None:
        if up:
            self.stats.bytes_up += n
        else:
            self.stats.bytes_down += n

    async def start(self) -> Netem:
        if self.tls and self._terminator is None:
            # Decrypt behind the delay: the delaying relay forwards the TLS bytes to a
            # terminator (a Netem with no delay that listens with TLS), which forwards
            # plain bytes to the target. The handshake's flights cross the delay.
            self._certificate, context = _self_signed_server_context()
            self._terminator = await Netem((self.target_host, self.target_port),
                                           _server_ssl=context).start()
        # Loopback only: this proxy is a teaching tool, not something to expose.
        self._server = await asyncio.start_server(self._handle, "127.0.0.1",
                                                  self.requested_port, limit=CHUNK,
                                                  ssl=self._server_ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        """Stop listening and close every connection (gracefully: FIN, not reset)."""
        for timer in self._timers:
            timer.cancel()
        self._timers.clear()
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections):
            connection.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.wait(self._handlers, timeout=5)
        if self._server is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None
        if self._terminator is not None:
            await self._terminator.stop()
            self._terminator = None

    async def __aenter__(self) -> Netem:
        return await self.start() if self._server is None else self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _later(self, after: float | None, action: Callable[[], None]) -> None:
        if not after:
            action()
            return
        loop = asyncio.get_running_loop()
        timer = loop.call_later(after, lambda: (self._timers.discard(timer), action()))
        self._timers.add(timer)

    def cut(self, after: float | None = None) -> None:
        """Abort every open connection (now, or ``after`` seconds): both ends get a reset.

        New connections are accepted as usual afterwards, so clients can reconnect.
        """
        def cut_now() -> None:
            for connection in list(self._connections):
                connection.abort()
                self.stats.cuts += 1
        self._later(after, cut_now)

    def stall(self, duration: float, after: float | None = None) -> None:
        """Deliver nothing, in either direction, for ``duration`` seconds (now or ``after``).

        Connections stay open and bytes are kept (up to ``buffer``), then delivered in order.
        """
        def stall_now() -> None:
            loop = asyncio.get_running_loop()
            self._stalled_until = max(self._stalled_until, loop.time() + duration)
        self._later(after, stall_now)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._handlers.add(task)
        loop = asyncio.get_running_loop()
        accepted_at = loop.time()
        self.stats.connections += 1
        self.stats.active += 1
        connection = None
        try:
            try:
                host, port = ((self.target_host, self.target_port) if self._terminator is None
                              else ("127.0.0.1", self._terminator.port))
                upstream = await asyncio.wait_for(
                    asyncio.open_connection(host, port, limit=CHUNK), CONNECT_TIMEOUT)
            except (OSError, TimeoutError):
                writer.transport.abort()  # the client sees a reset, as with a refused port
                return
            connection = _Connection(self, (reader, writer), upstream, accepted_at)
            self._connections.add(connection)
            await connection.run()
        except asyncio.CancelledError:
            if connection is not None:
                connection.close()
        finally:
            self.stats.active -= 1
            if connection is not None:
                self._connections.discard(connection)
            self._handlers.discard(task)


def _check_probability(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability, from 0 to 1")


def _self_signed_server_context() -> tuple[bytes, ssl.SSLContext]:
    """A server context with a fresh self-signed certificate (the WebTransport server's kind:
    chatlib.webtransport.make_certificate, ECDSA P-256, for 127.0.0.1 and localhost), and
    that certificate in PEM, for clients to trust.

    The key is never written anywhere that outlives this call (the ``ssl`` module loads a
    certificate only from a file: a private temporary directory, removed at once).
    """
    from cryptography.hazmat.primitives import serialization

    from .webtransport import make_certificate  # aioquic's dependencies: load only for TLS

    made = make_certificate()
    cert_pem = made.certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = made.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    with tempfile.TemporaryDirectory() as directory:
        path = os.path.join(directory, "netem.pem")
        with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "wb") as file:
            file.write(key_pem + cert_pem)
        context.load_cert_chain(path)
    return cert_pem, context


async def start(target, *, delay: float = 0.0, jitter: float = 0.0, rate: float | None = None,
                **options) -> Netem:
    """Start a :class:`Netem` proxy in front of ``target`` and return it once it listens.

    >>> proxy = await netem.start(target=server, delay=0.05)    # doctest: +SKIP
    >>> proxy.url                                               # doctest: +SKIP
    'http://127.0.0.1:41017/'
    """
    return await Netem(target, delay=delay, jitter=jitter, rate=rate, **options).start()


MAX_FLOWS = 1024
"""Client addresses a UDP relay serves at once; datagrams from more are dropped (counted)."""

BACKLOG = 1024
"""Datagrams a new flow holds while its socket towards the target opens."""


@dataclass
class UdpStats:
    """What went through a UDP relay since it started (both directions unless named)."""

    datagrams_up: int = 0  # client -> server, sent to the server
    datagrams_down: int = 0  # server -> client, sent to the client
    dropped: int = 0  # lost on purpose (``loss`` or ``drop``), both directions
    dropped_down: int = 0  # ... of which server -> client
    reordered: int = 0  # held ``reorder_gap`` more, so later ones could overtake
    flows: int = 0  # client addresses seen
    refused: int = 0  # beyond MAX_FLOWS, or BACKLOG while a flow's socket opens


class _Listener(asyncio.DatagramProtocol):
    """The relay's own socket: datagrams from clients arrive here; answers leave from it."""

    def __init__(self, relay: UdpNetem) -> None:
        self.relay = relay

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay._from_client(data, addr)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP "port unreachable" for a client that left: UDP has no one to tell


class _Flow(asyncio.DatagramProtocol):
    """One client's socket towards the target, connected to it (a NAT mapping)."""

    def __init__(self, relay: UdpNetem, client) -> None:
        self.relay, self.client = relay, client
        self.transport: asyncio.DatagramTransport | None = None
        self.backlog: list[bytes] = []  # due before the socket was ready (at most BACKLOG)

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.relay._listener is None:  # the relay stopped while this socket was opening
            transport.close()
            return
        for data in self.backlog:
            self.send(data)
        self.backlog.clear()

    def datagram_received(self, data: bytes, addr) -> None:
        self.relay._from_server(data, self.client)

    def error_received(self, exc: Exception) -> None:
        pass  # the target is not listening (yet): datagrams are lost, as on a network

    def send(self, data: bytes) -> None:
        if self.transport is None:
            if len(self.backlog) < BACKLOG:
                self.backlog.append(data)
            else:
                self.relay.stats.refused += 1
            return
        if not self.transport.is_closing():
            self.transport.sendto(data)
            self.relay.stats.datagrams_up += 1


class UdpNetem:
    """The UDP relay. Create it with :func:`start_udp` (or build it, then ``await start()``).

    Args:
        target: where to relay to: a :class:`chatlib.ChatServer` (its port number, on UDP),
            ``"127.0.0.1:4433"`` or a ``(host, port)`` tuple.
        delay: one-way delay in seconds, each direction.
        jitter: up to this many seconds more or less, uniformly at random, per datagram.
        loss: probability (0 to 1) that a datagram is dropped, each direction.
        reorder: probability (0 to 1) that a datagram is held ``reorder_gap`` seconds more.
        reorder_gap: how long a reordered datagram is held on top of its delay.
        port: the port to listen on, on 127.0.0.1; 0 picks a free one.
        seed: seed for the random numbers (jitter, loss, reordering): repeatable runs.
        drop: ``drop(n, up)`` is called for every datagram (``n`` counts the datagrams of
            that direction from 0, ``up`` is client -> server) and drops it when true: the
            same losses in two runs, whatever else differs (on top of ``loss``).

    Settings are attributes, read per datagram. Delivery is scheduled with the event loop's
    timers (``call_at``): no task per datagram, and :meth:`stop` cancels what is pending.
    """

    def __init__(self, target, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0,
                 reorder: float = 0.0, reorder_gap: float = 0.01, port: int = 0,
                 seed: int | None = None,
                 drop: Callable[[int, bool], bool] | None = None) -> None:
        if delay < 0 or jitter < 0 or reorder_gap < 0:
            raise ValueError("delay, jitter and reorder_gap must be >= 0 seconds")
        _check_probability("loss", loss)
        _check_probability("reorder", reorder)
        self.target_host, self.target_port, _ = _target_address(target)
        self.delay, self.jitter, self.loss = delay, jitter, loss
        self.reorder, self.reorder_gap = reorder, reorder_gap
        self.drop = drop
        self._counts = [0, 0]  # datagrams seen so far: [down, up]
        self.requested_port = port
        self.port: int | None = None
        self.stats = UdpStats()
        self._random = random.Random(seed)
        self._listener: asyncio.DatagramTransport | None = None
        self._flows: dict[tuple, _Flow] = {}
        self._pending: set[asyncio.TimerHandle] = set()
        self._opening: set[asyncio.Task] = set()  # flows' sockets being created

    @property
    def address(self) -> tuple[str, int]:
        """Where clients send their datagrams: ``("127.0.0.1", PORT)``."""
        return "127.0.0.1", self.port

    def __repr__(self) -> str:
        return (f"<UdpNetem 127.0.0.1:{self.port} -> {self.target_host}:{self.target_port} "
                f"delay={self.delay * 1000:g} ms jitter={self.jitter * 1000:g} ms "
                f"loss={self.loss:g} reorder={self.reorder:g}>")

    async def start(self) -> UdpNetem:
        loop = asyncio.get_running_loop()
        # Loopback only, as the TCP proxy.
        self._listener, _ = await loop.create_datagram_endpoint(
            lambda: _Listener(self), local_addr=("127.0.0.1", self.requested_port))
        self.port = self._listener.get_extra_info("sockname")[1]
        return self

    async def stop(self) -> None:
        """Drop what is in flight, close every socket."""
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        if self._opening:
            await asyncio.wait(self._opening, timeout=5)
        for flow in self._flows.values():
            if flow.transport is not None:
                flow.transport.close()
        self._flows.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        await asyncio.sleep(0)  # let the transports' close callbacks run

    async def __aenter__(self) -> UdpNetem:
        return await self.start() if self._listener is None else self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _schedule(self, send: Callable[[bytes], None], data: bytes, up: bool) -> None:
        """Drop ``data``, or call ``send(data)`` after its delay (a timer, not a task)."""
        n = self._counts[up]
        self._counts[up] += 1
        if self.drop is not None and self.drop(n, up):
            self.stats.dropped += 1
            self.stats.dropped_down += not up
            return
        if self.loss and self._random.random() < self.loss:
            self.stats.dropped += 1
            self.stats.dropped_down += not up
            return
        wait = self.delay
        if self.jitter:
            wait = max(0.0, wait + self._random.uniform(-self.jitter, self.jitter))
        if self.reorder and self._random.random() < self.reorder:
            wait += self.reorder_gap
            self.stats.reordered += 1
        if wait <= 0:
            send(data)
            return
        loop = asyncio.get_running_loop()

        def fire() -> None:
            self._pending.discard(handle)
            send(data)
        handle = loop.call_at(loop.time() + wait, fire)
        self._pending.add(handle)

    def _from_client(self, data: bytes, client) -> None:
        flow = self._flows.get(client)
        if flow is None:
            if len(self._flows) >= MAX_FLOWS:
                self.stats.refused += 1
                return
            flow = self._flows[client] = _Flow(self, client)
            self.stats.flows += 1
            loop = asyncio.get_running_loop()
            task = loop.create_task(loop.create_datagram_endpoint(
                lambda: flow, local_addr=("127.0.0.1", 0),
                remote_addr=(self.target_host, self.target_port)))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        self._schedule(flow.send, data, up=True)

    def _from_server(self, data: bytes, client) -> None:
        def send(data: bytes) -> None:
            if self._listener is not None:
                self._listener.sendto(data, client)
                self.stats.datagrams_down += 1
        self._schedule(send, data, up=False)


async def start_udp(target, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0,
                    reorder: float = 0.0, **options) -> UdpNetem:
    """Start a :class:`UdpNetem` relay in front of ``target`` and return it once it listens.

    >>> relay = await netem.start_udp(("127.0.0.1", 4433), loss=0.02)  # doctest: +SKIP
    >>> relay.address                                                  # doctest: +SKIP
    ('127.0.0.1', 50712)
    """
    return await UdpNetem(target, delay=delay, jitter=jitter, loss=loss, reorder=reorder,
                          **options).start()


_DURATION = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*(us|µs|ms|s|)\s*")
_RATE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([kmg]?)(bit|b|bps)?(?:/s)?\s*", re.IGNORECASE)


def parse_duration(text: str) -> float:
    """Seconds from ``"50ms"``, ``"0.05s"``, ``"250us"`` or a plain number of seconds.

    >>> parse_duration("50ms"), parse_duration("1.5"), parse_duration("250us")
    (0.05, 1.5, 0.00025)
    """
    match = _DURATION.fullmatch(text)
    if match is None:
        raise ValueError(f"not a duration: {text!r} (try 50ms, 0.05s)")
    scale = {"us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}[match[2]]
    return round(float(match[1]) * scale, 9)


def parse_rate(text: str) -> float:
    """Bytes per second from ``"1mbit"``, ``"512kbit"``, ``"100kB"``, ``"64k"`` or bytes.

    Units as in ``tc``: ``bit`` is bits, ``B`` / ``bps`` / nothing is bytes, per second;
    k, m, g are powers of 1000.

    >>> parse_rate("1mbit"), parse_rate("100kB"), parse_rate("2000")
    (125000.0, 100000.0, 2000.0)
    """
    match = _RATE.fullmatch(text)
    if match is None or (match[3] and match[3] not in ("bit", "B", "bps")
                         and match[3].lower() != "bit"):
        raise ValueError(f"not a rate: {text!r} (try 1mbit, 100kB)")
    value = float(match[1]) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match[2].lower()]
    unit = match[3] or ""
    return value / 8 if unit.lower() == "bit" else value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m chatlib netem``."""
    parser.add_argument("--listen", type=int, default=9000, metavar="PORT",
                        help="port to listen on, on 127.0.0.1 (default 9000; 0 = any free)")
    parser.add_argument("--target", default="127.0.0.1:8765",
                        help="where the chat server is: host:port or URL "
                             "(default 127.0.0.1:8765)")
    parser.add_argument("--delay", type=parse_duration, default=0.0,
                        help="one-way delay per direction, e.g. 50ms (a round trip is twice)")
    parser.add_argument("--jitter", type=parse_duration, default=0.0,
                        help="random extra delay, up to +/- this, e.g. 10ms")
    parser.add_argument("--rate", type=parse_rate, default=None,
                        help="bandwidth cap per direction, e.g. 1mbit or 100kB")
    parser.add_argument("--cut-every", type=parse_duration, default=None, metavar="DURATION",
                        help="cut every connection this often, e.g. 30s")
    parser.add_argument("--stall-every", type=parse_duration, default=None,
                        metavar="DURATION", help="stall the link this often, e.g. 20s")
    parser.add_argument("--stall-for", type=parse_duration, default=2.0, metavar="DURATION",
                        help="how long each stall lasts (default 2s)")
    parser.add_argument("--loss", type=float, default=0.0, metavar="P",
                        help="probability of a loss per chunk (TCP: modelled, see --help of "
                             "chatlib.netem) or per datagram (--udp), e.g. 0.02")
    parser.add_argument("--tls", action="store_true",
                        help="TCP: speak TLS to clients (https://, wss://; a fresh self-signed "
                             "certificate, so curl -k), decrypted behind the delay")
    parser.add_argument("--udp", action="store_true",
                        help="relay UDP datagrams (QUIC, WebTransport) instead of TCP")
    parser.add_argument("--reorder", type=float, default=0.0, metavar="P",
                        help="--udp: probability that a datagram is held back 10 ms")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed for jitter, loss and reordering (repeatable runs)")


async def _repeat(every: float, action: Callable[[], None]) -> None:
    while True:  # runs until cancelled
        await asyncio.sleep(every)
        action()


async def run(args: argparse.Namespace) -> None:
    """Run the proxy (or, with ``--udp``, the relay) the command line describes, until SIGINT
    or SIGTERM."""
    if args.udp:
        if args.rate or args.tls or args.cut_every or args.stall_every:
            raise SystemExit("netem --udp: --rate, --tls, --cut-every and --stall-every are "
                             "TCP options")
        proxy = await start_udp(args.target, delay=args.delay, jitter=args.jitter,
                                loss=args.loss, reorder=args.reorder, seed=args.seed,
                                port=args.listen)
        print(f"netem: udp://127.0.0.1:{proxy.port} -> {proxy.target_host}:{proxy.target_port}"
              f"  delay {args.delay * 1000:g} ms, jitter {args.jitter * 1000:g} ms, "
              f"loss {args.loss:g}, reorder {args.reorder:g}  (Ctrl+C to stop)", flush=True)
    else:
        proxy = await start(args.target, delay=args.delay, jitter=args.jitter, rate=args.rate,
                            port=args.listen, loss=args.loss, tls=args.tls, seed=args.seed)
        print(f"netem: {proxy.url} -> {proxy.target_host}:{proxy.target_port}  "
              f"delay {args.delay * 1000:g} ms, jitter {args.jitter * 1000:g} ms, "
              f"rate {'unlimited' if not args.rate else f'{args.rate:g} B/s'}, "
              f"loss {args.loss:g}  (Ctrl+C to stop)", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    tasks = []
    if args.cut_every:
        tasks.append(asyncio.ensure_future(_repeat(args.cut_every, proxy.cut)))
    if args.stall_every:
        tasks.append(asyncio.ensure_future(
            _repeat(args.stall_every, lambda: proxy.stall(args.stall_for))))
    try:
        await stop.wait()
    finally:
        for task in tasks:
            task.cancel()
        await proxy.stop()
