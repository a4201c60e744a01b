"""WebTransport over HTTP/3: the chat on one QUIC connection, in the server's own loop.

``ChatServer(webtransport=True)`` (``start_server(webtransport=True)``, ``chatlib serve
--webtransport``) also listens on **UDP**, at the same port number as its TCP port, with
aioquic, in the same asyncio loop as uvicorn (no thread, no process). A browser opens
``new WebTransport("https://127.0.0.1:PORT/wt", {serverCertificateHashes: [...]})``; the
page learns that URL and the certificate's SHA-256 from ``GET /api/webtransport``
(:func:`info`), which answers ``{"available": false}`` when the server runs without it.

**The certificate** (:func:`make_certificate`) is made at start, in memory: ECDSA P-256,
self-signed, valid 13 days. That is what ``serverCertificateHashes`` accepts (at most 14
days, not CA-signed; RSA fails with ``QUIC_TLS_CERTIFICATE_UNKNOWN``), so a browser needs no
flag and no trusted CA. Chromium tries ``::1`` before ``127.0.0.1`` for ``localhost``: a
server on loopback binds both.

**The protocol** is the WebSocket's (chatlib.wire: the same JSON events, the same hello,
acks, errors and resume protocol), carried like this:

* The client opens **one bidirectional stream** and writes its hello, then its messages; the
  server writes history, then live events on it. **Framing: one JSON text per line**
  (UTF-8, ``\\n``-terminated; newline-delimited JSON). A QUIC stream is a byte stream, like
  TCP: without framing, reads split and join events anywhere. JSON as chatlib encodes it
  never contains a raw newline (it escapes control characters), so a newline needs no
  escaping, each line is exactly one WebSocket frame's text, the browser splits with a
  ``TextDecoderStream`` and ``split("\\n")``, and a line is readable in a packet capture.
  A length prefix would allow binary payloads, which the chat has none of. A line longer
  than ``Limits.max_frame`` bytes closes the session (1009), as a WebSocket frame does.
* **Typing notices are datagrams** both ways (``{"type": "typing", ...}``): they may be lost,
  and a lost one costs nothing (the next keystroke sends another). Everything else is on the
  stream. (A typing event that the hub groups with messages in one fan-out goes on the
  stream with them.)
* The session ends with a ``CLOSE_WEBTRANSPORT_SESSION`` capsule on the CONNECT stream,
  carrying the :class:`~chatlib.closecode.CloseCode` of the WebSocket in the same case
  (1008 no hello or a bad one, 1009 a line too long, 1013 fell behind, 1011 store down,
  1001/1012 going away/restarting) and a reason: the browser's ``transport.closed``
  resolves with ``{closeCode, reason}``. aioquic does not parse capsules: this module
  writes and reads the two it needs (:func:`capsule`, :func:`read_capsules`).

**The same checks as every transport:** Host and Origin (the CONNECT request carries
``:authority`` and ``origin``: chatlib.guard), token mode (``Authorization: Bearer``,
``?token=``, or a single-use ``?ticket=`` that ``GET /api/webtransport`` hands out, since a
page cannot set headers on a WebTransport request and sends no cookie: chatlib.auth),
the rate budgets (chatlib.limits.SendBudget, shared with the other transports), the hello
timeout, the send queue bound (1013), and the stuck-client rule: a client that acknowledges
nothing for ``Limits.stuck_timeout`` while bytes wait for it has its QUIC connection closed
at once (the CONNECTION_CLOSE frees everything, as a TCP reset does). A client that sends
garbage gets an error event; one that opens more streams than its one gets them refused,
and after :data:`MAX_EXTRA_STREAMS` its session closed (1008); one that floods datagrams
has them dropped past its budget, and is told (429) at most once a second. Admission
control (chatlib.admission) counts a session as it counts a WebSocket.

Reading order: :class:`WebTransportServer` (binding, checks, the stuck sweep), then
:class:`ChatProtocol` (one QUIC connection), :class:`Session` (one chat session), and at the
end :class:`ClientSession`, the Python side that chatlib.clients.WebTransportClient uses.
Every read of aioquic's private state is in chatlib.quicpath.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import hashlib
import ipaddress
import logging
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from functools import partial
from urllib.parse import parse_qsl, urlsplit

from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer
from aioquic.buffer import Buffer, BufferReadError, encode_uint_var
from aioquic.h3.connection import H3_ALPN, ErrorCode, H3Connection, Setting
from aioquic.h3.events import (
    DatagramReceived,
    DataReceived,
    H3Event,
    HeadersReceived,
    WebTransportStreamDataReceived,
)
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    ProtocolNegotiated,
    QuicEvent,
    StopSendingReceived,
    StreamDataReceived,
    StreamReset,
)
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from starlette.requests import Request
from starlette.responses import Response

from . import quicpath, wire
from .auth import GRANT, Grant, Pass, TokenGate
from .closecode import BUSY, CloseCode, close_reason
from .guard import Guard
from .hub import Batch, Hub, Resume
from .limits import Limits, SendBudget
from .outbox import Outbox
from .rooms import Rooms
from .store import StoreUnavailable
from .stuck import StuckWatch
from .validation import ChatError, room_name
from .web import JSONBody, latin1
from .ws import STORE_DOWN, Member, handle_frame

log = logging.getLogger("chatlib")

PATH = "/wt"
"""The path of the CONNECT request that opens a session."""
CERTIFICATE_DAYS = 13
"""Validity of the certificate: ``serverCertificateHashes`` accepts at most 14 days."""
CLOSE_SESSION = 0x2843
"""The CLOSE_WEBTRANSPORT_SESSION capsule (draft-ietf-webtrans-http3): u32 code, reason."""
DRAIN_SESSION = 0x78AE
"""The DRAIN_WEBTRANSPORT_SESSION capsule: the peer will not open new streams."""
MAX_REASON = 1024
"""A close capsule's reason is at most 1024 bytes."""
MAX_EXTRA_STREAMS = 16
"""Streams a client may open besides its one (each refused) before its session closes."""
MAX_QUEUED_LINES = 256
"""Lines received and not handled yet; a client that sends faster is closed (1008)."""
MAX_PENDING_DATAGRAMS = 64
"""Datagrams queued for a client (congestion control holds them); more are dropped."""
HIGH_WATER = 64 * 1024
"""Bytes written to a client's stream and not acknowledged, past which nothing more is
written: the hub's batches wait in its outbox (bounded: 1013 when full)."""
LOW_WATER = 16 * 1024
"""... and below which the writer writes again."""
IDLE_TIMEOUT = 30.0
"""QUIC idle timeout (seconds) the server offers: a connection silent this long ends."""
PING_EVERY = IDLE_TIMEOUT / 3
"""Seconds between keep-alive PINGs to each session's client (a quiet chat is silent)."""
TICKET_TTL = 30.0
"""Seconds a ticket (token mode) stays valid; each is good for one session."""
WT_STREAM_ERROR = 0x52E4A40FA8DB
"""WEBTRANSPORT_APPLICATION_ERROR base (error 0): the code of a refused stream."""


# -- the certificate ----------------------------------------------------------------------


@dataclass(frozen=True)
class Certificate:
    """A self-signed certificate and its key, made in memory (:func:`make_certificate`)."""

    certificate: x509.Certificate
    private_key: ec.EllipticCurvePrivateKey
    sha256: bytes
    """SHA-256 of the DER certificate: what a browser's ``serverCertificateHashes`` pins."""


def make_certificate(days: int = CERTIFICATE_DAYS) -> Certificate:
    """An ECDSA P-256 self-signed certificate for ``localhost``, 127.0.0.1 and ::1, valid
    ``days`` days from a minute ago (``serverCertificateHashes`` needs <= 14 in all)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "chatlib")])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([
            x509.DNSName("localhost"),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
            x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    der = certificate.public_bytes(Encoding.DER)
    return Certificate(certificate, key, hashlib.sha256(der).digest())


# -- capsules (aioquic does not parse them) -----------------------------------------------


def capsule(kind: int, payload: bytes) -> bytes:
    """One capsule (RFC 9297 section 3.2): type and length as QUIC varints, then payload."""
    return encode_uint_var(kind) + encode_uint_var(len(payload)) + payload


def close_capsule(code: int, reason: str) -> bytes:
    """CLOSE_WEBTRANSPORT_SESSION: the code (u32) and a reason of at most 1024 bytes."""
    raw = reason.encode()[:MAX_REASON].decode(errors="ignore").encode()
    return capsule(CLOSE_SESSION, int(code).to_bytes(4, "big") + raw)


def read_capsules(data: bytes) -> tuple[list[tuple[int, bytes]], bytes]:
    """The whole capsules at the start of ``data``, and what remains (an unfinished one)."""
    found = []
    buf = Buffer(data=data)
    for _ in range(len(data)):  # each turn takes one capsule, at least 2 bytes
        start = buf.tell()
        try:
            kind, length = buf.pull_uint_var(), buf.pull_uint_var()
            payload = buf.pull_bytes(length)
        except BufferReadError:
            return found, data[start:]
        found.append((kind, payload))
        if buf.eof():
            return found, b""
    return found, b""


def parse_close(payload: bytes) -> tuple[int, str]:
    """``(code, reason)`` of a CLOSE_WEBTRANSPORT_SESSION capsule's payload."""
    return int.from_bytes(payload[:4], "big"), payload[4:].decode(errors="replace")


# -- the session's outbox: typing by datagram ---------------------------------------------


TYPING_PREFIX = wire.ws_event("typing", {"user": ""})[:16]
"""How a typing event's payload starts (``{"type":"typing"``): sent as a datagram."""


class SessionOutbox(Outbox):
    """An :class:`Outbox` (WebSocket encoding: the same payloads, encoded once for both)
    whose lone typing events go as datagrams instead of on the stream."""

    __slots__ = ("datagram",)
    transport = "webtransport"
    """What ``GET /api/stats`` calls this client (chatlib.app.server_stats)."""

    def __init__(self, user: str, limit: int, datagram) -> None:
        super().__init__(wire.WEBSOCKET, user, limit)
        self.datagram = datagram

    def deliver(self, batch: Batch) -> bool:
        items = batch.items
        if len(items) == 1 and not items[0][0] and items[0][1].startswith(TYPING_PREFIX):
            if not self.closed:
                self.datagram(items[0][1])
            return True
        return super().deliver(batch)


_encoded: list = [None, b""]  # the last batch's payload tuple and its bytes (see lines)


def lines(payloads: tuple[str, ...]) -> bytes:
    """The stream bytes for ``payloads``: each a line. A fan-out hands every client the same
    tuple (chatlib.hub.Batch), so it is encoded once for all of them."""
    if _encoded[0] is payloads:
        return _encoded[1]
    data = ("\n".join(payloads) + "\n").encode()
    _encoded[:] = [payloads, data]
    return data


def text(line: bytes) -> str:
    """A line's text; ChatError (400) if it is not UTF-8."""
    try:
        return line.decode()
    except UnicodeDecodeError:
        raise ChatError(400, "a line must be UTF-8 text (JSON)") from None


# -- one session ---------------------------------------------------------------------------


class Session:
    """One WebTransport session: its chat stream, its outbox, its reader and writer."""

    def __init__(self, server: WebTransportServer, protocol: ChatProtocol,
                 session_id: int, address: str, grant: Grant | None = None) -> None:
        self.server, self.protocol, self.session_id = server, protocol, session_id
        self.address = address
        self.stream_id: int | None = None  # the client's bidirectional stream, once opened
        self.refused: set[int] = set()  # other streams it opened (refused)
        self.buffer = bytearray()  # an unfinished line
        self.capsule_rest = b""  # an unfinished capsule on the CONNECT stream
        self.closed_stream = False  # the client stopped the chat stream: nothing more to write
        self.early: bytes | None = None  # a datagram that came before the hello was handled
        self.lines: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.member: Member | None = None  # its rooms, once it said hello
        self.grant = grant  # its user token's chatlib.auth.Grant, if any (chatlib.rooms)
        self.closed = False
        self.drained = asyncio.Event()
        self.drained.set()
        self.datagram_notice = 0.0  # when a client was last told its datagrams are dropped
        self.acked, self.acked_at = 0, None  # the stuck watch's last look (None: none yet)
        self.task = asyncio.ensure_future(self.run())

    @property
    def h3(self) -> H3Connection:
        return self.protocol.h3

    # -- in ---------------------------------------------------------------------------

    def stream_data(self, stream_id: int, data: bytes, ended: bool) -> None:
        if self.closed:
            return
        if self.stream_id is None and stream_id % 4 == 0:  # client-initiated bidirectional
            self.stream_id = stream_id
        if stream_id != self.stream_id:
            self.refuse_stream(stream_id)
            return
        self.buffer += data
        limit = self.server.limits.max_frame
        start = 0
        for _ in range(len(self.buffer) + 1):  # one turn per line
            end = self.buffer.find(b"\n", start)
            if end < 0:
                break
            if end - start > limit:
                self.close(CloseCode.MESSAGE_TOO_BIG, f"a line is longer than {limit} bytes")
                return
            line = bytes(self.buffer[start:end]).strip()
            start = end + 1
            if line:
                self.lines.put_nowait(line)
        del self.buffer[:start]
        if len(self.buffer) > limit:
            self.close(CloseCode.MESSAGE_TOO_BIG, f"a line is longer than {limit} bytes")
        elif self.lines.qsize() > MAX_QUEUED_LINES:
            self.close(CloseCode.POLICY_VIOLATION, "sending too fast")
        elif ended:
            self.lines.put_nowait(None)  # the client finished sending: the session ends

    def refuse_stream(self, stream_id: int) -> None:
        """One stream per session: refuse the others, and close after too many."""
        if stream_id in self.refused:
            return
        self.refused.add(stream_id)
        if len(self.refused) > MAX_EXTRA_STREAMS:
            self.close(CloseCode.POLICY_VIOLATION, "too many streams: the chat uses one")
            return
        quic = self.protocol.quic
        with contextlib.suppress(Exception):  # a stream the peer already ended: nothing to do
            quic.stop_stream(stream_id, WT_STREAM_ERROR)
        if stream_id % 4 == 0:  # bidirectional: our side too
            with contextlib.suppress(Exception):
                quic.reset_stream(stream_id, WT_STREAM_ERROR)
        self.protocol.transmit_soon()

    @property
    def outboxes(self) -> list[SessionOutbox]:
        """The session's outboxes: one per room it is in."""
        member = self.member
        return [] if member is None else [outbox for _, outbox, _ in member.rooms.values()]

    def datagram(self, data: bytes) -> None:
        """A datagram from the client: a typing notice (in a room it is in: ``"room"``,
        as on the WebSocket), within its budget."""
        member = self.member
        if self.closed:
            return
        if member is None:  # the hello is not handled yet: keep the latest for then
            self.early = data
            return
        budget = self.server.budget
        if not budget.allow(self.address, self.rate):
            now = time.monotonic()
            if now - self.datagram_notice >= 1.0:  # told at most once a second
                self.datagram_notice = now
                member.error(ChatError(429, "too many datagrams: slow down",
                                       budget.retry_after(self.address, self.rate)), None)
            return
        room = None
        try:
            text = data.decode()
            kind, frame = wire.read_client_frame(text, self.server.limits)
            if kind != "typing":
                raise ChatError(400, "a datagram may only say typing")
            room = room_name(frame.get("room"), self.server.limits)
            hub, _ = member.room(room)
        except (ChatError, UnicodeDecodeError) as exc:
            member.error(exc if isinstance(exc, ChatError) else ChatError(400, "not UTF-8"),
                         room)
            return
        hub.typing(member.user)

    def capsules(self, data: bytes, ended: bool) -> None:
        """Data on the CONNECT stream: capsules (one may be split across DATA frames);
        the client's close ends the session."""
        found, self.capsule_rest = read_capsules(self.capsule_rest + data)
        if len(self.capsule_rest) > 2 * MAX_REASON:  # no capsule the server reads is longer
            self.capsule_rest = b""
        if ended or any(kind == CLOSE_SESSION for kind, _ in found):
            self.lines.put_nowait(None)

    def gone(self) -> None:
        """The connection ended (closed, reset, timed out)."""
        self.closed = True
        self.lines.put_nowait(None)
        self.drained.set()
        for outbox in self.outboxes:
            outbox.close(CloseCode.GOING_AWAY)

    # -- the session's life -----------------------------------------------------------

    async def run(self) -> None:
        """Hello, then handle lines until the client ends; meanwhile the writers write
        (one per room the session is in, chatlib.ws.Member)."""
        server, hub = self.server, self.server.hub
        limits = hub.limits
        rooms = server.rooms
        try:
            line = await asyncio.wait_for(self.lines.get(), limits.hello_timeout)
            if line is None:
                return
            user, after, room = wire.read_hello(text(line), limits)
            rooms.check(room, user, self.grant)
        except TimeoutError:
            self.close(CloseCode.POLICY_VIOLATION, f"no hello within {limits.hello_timeout:g} s")
            return
        except ChatError as exc:
            self.write((wire.ws_event("error", {"error": exc.error}),))
            self.close(CloseCode.POLICY_VIOLATION, exc.error[:120])
            return
        self.rate = server.budget.connection()
        member = Member(rooms, user, self.grant, self.send_now, lambda: self.new_outbox(user),
                        self.start_writer)
        try:
            await member.join(room, after, announce=False)
        except StoreUnavailable:
            member.leave_all()
            self.close(CloseCode.INTERNAL_ERROR, STORE_DOWN)
            return
        except ChatError as exc:  # the log holds as many rooms as it may
            member.leave_all()
            self.write((wire.ws_event("error", {"error": exc.error}),))
            self.close(CloseCode.POLICY_VIOLATION, exc.error[:120])
            return
        if self.closed:
            member.leave_all()
            return
        self.member = member
        if self.early is not None:  # a typing notice sent with the hello: shown, not lost
            self.datagram(self.early)
            self.early = None
        try:
            for _ in range(1 << 62):  # until the client ends (None)
                line = await self.lines.get()
                if line is None:
                    break
                try:
                    frame = text(line)
                except ChatError as exc:
                    member.error(exc, None)
                    continue
                await handle_frame(member, self.address, self.rate, server.budget, frame)
        finally:
            member.leave_all()
            self.close(CloseCode.NORMAL, "")

    def new_outbox(self, user: str) -> SessionOutbox:
        """The session's outbox in one more room."""
        outbox = SessionOutbox(user, self.server.limits.max_queue, self.send_datagram)
        outbox.on_close = self.outbox_closed
        return outbox

    def start_writer(self, hub: Hub, outbox: SessionOutbox, resume: Resume) -> asyncio.Task:
        return asyncio.ensure_future(self.write_all(hub, outbox, resume))

    async def send_now(self, payload: str) -> None:
        """A line written at once (``joined``, and what a session in no room is told)."""
        self.write((payload,))

    async def write_all(self, hub: Hub, outbox: SessionOutbox, resume: Resume) -> None:
        """A writer: one room's outbox's batches (history, then live) as lines on the
        stream.

        While it sleeps, the hub writes live lines itself through the outbox's sink, as
        long as the client's backlog is under :data:`HIGH_WATER`; past it batches queue in
        the outbox and this writer writes them once the client has acknowledged enough.
        """
        outbox.sink = self.sink
        try:
            async for batch in outbox.stream(hub, resume, address=self.address):
                if self.closed:
                    return
                await self.drained.wait()
                if self.closed:
                    return
                self.write(tuple(batch))
            code = outbox.close_code or CloseCode.GOING_AWAY
            self.close(code, STORE_DOWN if code == CloseCode.INTERNAL_ERROR
                       else hub.admission.closing(code))
        except StoreUnavailable:
            self.close(CloseCode.INTERNAL_ERROR, STORE_DOWN)

    def outbox_closed(self, code: int) -> None:
        """The hub gave up on this client (1013) or the server stops: the writer closes
        the session after what it was writing; nothing more is queued."""
        self.server.stuck.closes[code] += 1
        self.drained.set()

    # -- out --------------------------------------------------------------------------

    def sink(self, payloads: tuple[str, ...]) -> bool:
        """Write now if the client's backlog allows (chatlib.outbox.Outbox.sink)."""
        if self.closed or not self.drained.is_set():
            return False
        self.write(payloads)
        return True

    def write(self, payloads: tuple[str, ...]) -> None:
        """Write ``payloads`` as lines on the chat stream; never raises (the hub's fan-out
        calls it through the sink)."""
        if self.closed or self.closed_stream or self.stream_id is None or not payloads:
            return
        quic = self.protocol.quic
        try:
            quic.send_stream_data(self.stream_id, lines(payloads))
        except Exception:  # noqa: BLE001 (aioquic raises on a stream the peer stopped)
            # Called from the hub's fan-out: raising would stop it for everyone. The client
            # stopped (or reset) its stream: its session ends, on the next loop turn.
            asyncio.get_running_loop().call_soon(
                self.close, CloseCode.GOING_AWAY, "the chat stream was stopped")
            self.closed_stream = True
            return
        self.protocol.transmit_soon()
        if quicpath.stream_backlog(quic, self.stream_id)[0] > HIGH_WATER:
            self.drained.clear()

    def check_drained(self) -> None:
        """After the client acknowledged something: write again below :data:`LOW_WATER`."""
        if not self.drained.is_set() and self.stream_id is not None:
            waiting, _ = quicpath.stream_backlog(self.protocol.quic, self.stream_id)
            if waiting < LOW_WATER:
                self.drained.set()

    def send_datagram(self, payload: str) -> None:
        quic = self.protocol.quic
        if quicpath.datagrams_pending(quic) >= MAX_PENDING_DATAGRAMS:
            return  # a typing notice may be lost; a client that does not read loses them
        with contextlib.suppress(Exception):  # too big for a datagram, connection closing
            self.h3.send_datagram(self.session_id, payload.encode())
            self.protocol.transmit_soon()

    def close(self, code: int, reason: str) -> None:
        """End the session: the close capsule (``code``, ``reason``) and the end of the
        CONNECT stream; the client then ends the connection (else the server does, in
        ``stuck_timeout``)."""
        if self.closed:
            return
        self.closed = True
        self.lines.put_nowait(None)
        self.drained.set()
        for outbox in self.outboxes:
            outbox.close(code)
        quic = self.protocol.quic
        if self.stream_id is not None and not self.closed_stream:
            with contextlib.suppress(Exception):  # a stream the client stopped or reset
                quic.send_stream_data(self.stream_id, b"", end_stream=True)
        with contextlib.suppress(Exception):  # the connection may be closing already
            self.h3.send_data(self.session_id, close_capsule(code, reason), end_stream=True)
            self.protocol.transmit_soon()
        self.protocol.session_closed(self)

    def stuck(self, now: float) -> bool:
        """Has the client acknowledged nothing for ``stuck_timeout`` s while bytes wait?"""
        if self.stream_id is None:
            return False
        waiting, acked = quicpath.stream_backlog(self.protocol.quic, self.stream_id)
        # Progress, nothing waiting, or the first look (bytes may have been queued a moment
        # ago): the clock starts (again) now.
        if not waiting or acked != self.acked or self.acked_at is None:
            self.acked, self.acked_at = acked, now
            return False
        return now - self.acked_at >= self.server.limits.stuck_timeout


# -- one QUIC connection -------------------------------------------------------------------


class ChatProtocol(QuicConnectionProtocol):
    """One QUIC connection: HTTP/3 with WebTransport, at most one chat session."""

    def __init__(self, *args, server: WebTransportServer, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quic = self._quic  # the QuicConnection, for the session
        self.server = server
        self.h3: H3Connection | None = None
        self.session: Session | None = None
        self._transmit_due = False
        self.pinged = 0.0  # loop time of the last keep-alive PING (WebTransportServer._sweep)
        self.address = ""  # the client's IP address (its per-address budgets)
        server.protocols.add(self)

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, ProtocolNegotiated):
            self.h3 = H3Connection(self._quic, enable_webtransport=True)
        elif isinstance(event, ConnectionTerminated):
            self.server.protocols.discard(self)
            if self.session is not None:
                self.session.gone()
            return
        elif isinstance(event, (StreamReset, StopSendingReceived)) and self.session is not None:
            if event.stream_id in (self.session.stream_id, self.session.session_id):
                self.session.lines.put_nowait(None)  # the client dropped its stream
        if self.h3 is not None:
            try:
                h3_events = self.h3.handle_event(event)
            except Exception as exc:  # noqa: BLE001 (aioquic closes the connection itself)
                log.debug("HTTP/3 error: %s", exc)
                return
            for h3_event in h3_events:
                try:
                    self.h3_event(h3_event)
                except Exception:  # a bug here must cost this connection only, said aloud
                    log.exception("WebTransport: closing a connection after an error")
                    self.close(error_code=ErrorCode.H3_INTERNAL_ERROR, reason_phrase="error")
                    return

    def datagram_received(self, data, addr) -> None:
        if not self.address:
            self.address = str(addr[0])
        super().datagram_received(data, addr)
        if self.session is not None:  # acknowledgements may have drained its backlog
            self.session.check_drained()

    def h3_event(self, event: H3Event) -> None:
        session = self.session
        if isinstance(event, HeadersReceived):
            if session is None or event.stream_id != session.session_id:  # not trailers
                self.connect_request(event.stream_id, dict(event.headers))
        elif session is None:
            return
        elif isinstance(event, WebTransportStreamDataReceived):
            if event.session_id == session.session_id:
                session.stream_data(event.stream_id, event.data, event.stream_ended)
        elif isinstance(event, DatagramReceived):
            if event.stream_id == session.session_id:
                session.datagram(event.data)
        elif isinstance(event, DataReceived) and event.stream_id == session.session_id:
            session.capsules(event.data, event.stream_ended)

    def connect_request(self, stream_id: int, headers: dict[bytes, bytes]) -> None:
        """A request: a WebTransport CONNECT to :data:`PATH` passing every check opens the
        session; anything else gets its status (and no body)."""
        status, error = self.server.check(headers, self.session is not None)
        if status != 200:
            self.h3.send_headers(stream_id, [(b":status", str(status).encode()),
                                             (b"chatlib-error", error.encode()[:200])],
                                 end_stream=True)
            self.transmit_soon()
            return
        self.h3.send_headers(stream_id, [(b":status", b"200"),
                                         (b"sec-webtransport-http3-draft", b"draft02")])
        self.transmit_soon()
        self.session = Session(self.server, self, stream_id, self.address,
                               self.server.granted)
        # Admission control (chatlib.admission), as for a WebSocket: after the CONNECT's
        # 200, since a page reads a close code and reason but no refused CONNECT's status.
        wait = self.server.hub.admission.admit()
        if wait is not None:
            self.session.close(CloseCode.TRY_AGAIN_LATER, close_reason(BUSY, wait))

    def session_closed(self, session: Session) -> None:
        """The close capsule is on its way; a client that does not end the connection
        within ``stuck_timeout`` has it closed."""
        loop = asyncio.get_running_loop()
        loop.call_later(self.server.limits.stuck_timeout, self.close)

    def transmit_soon(self) -> None:
        """Send what was written, once per loop turn however many writes there were."""
        if not self._transmit_due:
            self._transmit_due = True
            asyncio.get_running_loop().call_soon(self._transmit)

    def _transmit(self) -> None:
        self._transmit_due = False
        self.transmit()


# -- the server ---------------------------------------------------------------------------


class WebTransportServer:
    """The UDP side of a :class:`~chatlib.server.ChatServer`: aioquic's server on
    ``host:port`` (and ``::1`` beside ``127.0.0.1``), sessions into ``hub``."""

    def __init__(self, hub: Hub, budget: SendBudget, stuck: StuckWatch,
                 front_door: tuple) -> None:
        """``front_door``: the app's (chatlib.app.ChatApp.front_door), whose checks a
        session's CONNECT passes, with the same options."""
        if quicpath.MISSING:
            raise RuntimeError("this aioquic lacks what chatlib.quicpath reads: "
                               + ", ".join(quicpath.MISSING))
        self.hub, self.budget = hub, budget
        self.rooms = Rooms.of(hub)
        self.limits: Limits = hub.limits
        options = dict(front_door)
        self.guard = Guard(None, **options[Guard])
        self.token_gate = TokenGate(None, **options[TokenGate]) if TokenGate in options else None
        self.stuck = stuck
        """The server's stuck-client watch: its counts (``closes``, ``resets``) include
        WebTransport sessions (``GET /api/stats``)."""
        self.certificate = make_certificate()
        self.protocols: set[ChatProtocol] = set()
        self.port = 0
        self._tickets: dict[str, tuple[float, Grant | None]] = {}  # expiry, grant
        self.granted: Grant | None = None
        """The user token's grant of the CONNECT :meth:`check` passed last (its session's)."""
        self._transports: list[asyncio.DatagramTransport] = []
        self._servers: list[QuicServer] = []
        self._sweeper: asyncio.Task | None = None

    @property
    def hash_hex(self) -> str:
        return self.certificate.sha256.hex()

    def configuration(self) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=False, alpn_protocols=H3_ALPN, max_datagram_frame_size=65536,
            idle_timeout=IDLE_TIMEOUT)
        configuration.certificate = self.certificate.certificate
        configuration.private_key = self.certificate.private_key
        return configuration

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve on ``sockets`` (bound UDP sockets: :func:`bind_udp`)."""
        loop = asyncio.get_running_loop()
        configuration = self.configuration()
        for sock in sockets:
            quic = QuicServer(configuration=configuration,
                              create_protocol=partial(ChatProtocol, server=self))
            transport, _ = await loop.create_datagram_endpoint(lambda q=quic: q, sock=sock)
            self._servers.append(quic)
            self._transports.append(transport)
        self.port = sockets[0].getsockname()[1]
        self._sweeper = asyncio.ensure_future(self._sweep())

    async def close(self, grace: float = 0.5) -> None:
        """Stop: sessions the hub closed have their capsules sent; then every connection
        is closed and the UDP port freed. ``grace``: seconds for clients to end theirs."""
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.protocols and loop.time() < deadline:  # bounded by the grace
            await asyncio.sleep(0.02)
        for protocol in list(self.protocols):
            if protocol.session is not None:
                protocol.session.close(CloseCode.GOING_AWAY, "server stopping")
            protocol.close()
        for server in self._servers:
            server.close()  # closes its transport: the port is free
        self._servers.clear()
        self._transports.clear()

    async def _sweep(self) -> None:
        """Every ``stuck_timeout / 4`` s (at most :data:`PING_EVERY`): the stuck-client rule
        (close the connection of a client that acknowledged nothing for ``stuck_timeout`` s
        while bytes waited), and a PING to each session's client every :data:`PING_EVERY`
        s, as the WebSocket pings: a quiet chat is not idle to QUIC (its idle timeout would
        end the connection), and a client that vanished stops answering and times out."""
        interval = max(min(self.limits.stuck_timeout / 4, PING_EVERY), 0.05)
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval)
            now = loop.time()
            for protocol in list(self.protocols):
                session = protocol.session
                if session is not None and now - protocol.pinged >= PING_EVERY:
                    protocol.pinged = now
                    protocol.quic.send_ping(0)
                    protocol.transmit_soon()
                if session is not None and session.stuck(now):
                    log.info("closing a WebTransport connection that stopped reading")
                    for outbox in session.outboxes:
                        outbox.close(CloseCode.TRY_AGAIN_LATER)
                    session.closed = True
                    self.stuck.resets += 1
                    protocol.close(error_code=0x0, reason_phrase="stopped reading")
                    self.protocols.discard(protocol)

    # -- admission -------------------------------------------------------------------

    def check(self, headers: dict[bytes, bytes], has_session: bool) -> tuple[int, str]:
        """``(status, error)`` for a request: 200 for a CONNECT that may open a session."""
        if headers.get(b":method") != b"CONNECT" or headers.get(b":protocol") != b"webtransport":
            return 405, "only WebTransport CONNECT requests are served here"
        path, _, query = headers.get(b":path", b"").partition(b"?")
        if path != PATH.encode():
            return 404, "not found: WebTransport sessions open at " + PATH
        if has_session:
            return 429, "one session per connection"
        if self.hub.closing.is_set():
            return 503, "server is stopping"

        # The front door's checks (chatlib.guard, chatlib.auth), as for a WebSocket handshake.
        refusal = self.guard.verdict("CONNECT", latin1(headers.get(b":authority", b"")),
                                     latin1(headers.get(b"origin")), scheme="https",
                                     handshake=True)
        if refusal is not None:
            return refusal.status, refusal.error
        self.granted = None
        if self.token_gate is not None:
            verdict = self.token_gate.verdict(latin1(headers.get(b"authorization")),
                                              query.decode("latin-1"),
                                              latin1(headers.get(b"cookie")), self.port)
            if isinstance(verdict, Pass):
                self.granted = verdict.grant
            else:
                tickets = [v for k, v in parse_qsl(query.decode("latin-1")) if k == "ticket"]
                for ticket in tickets:
                    valid, self.granted = self.redeem(ticket)
                    if valid:
                        break
                else:
                    return 401, "a token is required"
        return 200, ""

    def ticket(self, grant: Grant | None = None) -> str:
        """A single-use ticket for one session, valid :data:`TICKET_TTL` s (token mode),
        standing for the user token's ``grant`` that asked for it (None: the shared
        token)."""
        now = time.monotonic()
        if len(self._tickets) > 1000:
            self._tickets = {t: entry for t, entry in self._tickets.items() if entry[0] > now}
            while len(self._tickets) > 1000:  # still too many: drop the oldest
                self._tickets.pop(next(iter(self._tickets)))
        ticket = secrets.token_urlsafe(16)
        self._tickets[ticket] = (now + TICKET_TTL, grant)
        return ticket

    def info(self, request: Request) -> Response:
        """``GET /api/webtransport``: ``{"available": true, "url", "hash"}``: the URL to give
        ``new WebTransport``, on the host name the page used (so that its Origin matches
        the CONNECT's ``:authority``), and the certificate's SHA-256 in hex. In token mode
        the URL carries a single-use ``ticket``."""
        name = request.url.hostname or "127.0.0.1"
        if ":" in name:
            name = f"[{name}]"
        url = f"https://{name}:{self.port}{PATH}"
        if self.token_gate is not None:
            url += "?ticket=" + self.ticket(request.scope.get(GRANT))
        return JSONBody({"available": True, "url": url, "hash": self.hash_hex,
                         "hash_algorithm": "sha-256"}, headers={"Cache-Control": "no-store"})

    def redeem(self, ticket: str) -> tuple[bool, Grant | None]:
        """Whether ``ticket`` is valid (it is then spent), and the grant it stands for."""
        expires, grant = self._tickets.pop(ticket, (0.0, None))
        return expires > time.monotonic(), grant


def bind_udp(host: str, port: int) -> list[socket.socket]:
    """UDP sockets at ``port`` on ``host``, and on ``::1`` too when ``host`` is 127.0.0.1
    (Chromium tries ``::1`` first for ``localhost``); OSError if ``host`` cannot be bound.
    ``::1`` is skipped where IPv6 is off."""
    hosts = [host] + (["::1"] if host in ("127.0.0.1", "localhost") else [])
    sockets: list[socket.socket] = []
    try:
        for name in hosts:
            family = socket.AF_INET6 if ":" in name else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_DGRAM)
            try:
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind((name, port))
                sock.setblocking(False)
            except OSError:
                sock.close()
                if name == "::1" and sockets:
                    continue  # no IPv6 here: 127.0.0.1 alone
                raise
            sockets.append(sock)
    except OSError:
        for sock in sockets:
            sock.close()
        raise
    return sockets


# -- the client side (chatlib.clients.WebTransportClient) ----------------------------------


class ClientProtocol(QuicConnectionProtocol):
    """A client's QUIC connection: HTTP/3 with WebTransport; events go to its session."""

    def __init__(self, *args, session: ClientSession, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.quic = self._quic  # the QuicConnection, for the session
        self.h3 = H3Connection(self._quic, enable_webtransport=True)
        self.session = session
        self.settings = asyncio.Event()
        """Set once the server's SETTINGS arrived (RFC 9220 section 3: no extended CONNECT
        before SETTINGS_ENABLE_CONNECT_PROTOCOL = 1)."""

    def quic_event_received(self, event: QuicEvent) -> None:
        session = self.session
        if isinstance(event, ConnectionTerminated):
            session.end(session.close_code, session.close_reason or event.reason_phrase)
            return
        if isinstance(event, StreamDataReceived) and event.stream_id == session.stream_id:
            session.stream_data(event.data, event.end_stream)  # our stream: lines, raw
            return
        h3_events = self.h3.handle_event(event)
        if self.h3.received_settings is not None:
            self.settings.set()
        for h3_event in h3_events:
            if isinstance(h3_event, HeadersReceived) and h3_event.stream_id == session.session_id:
                session.response(dict(h3_event.headers))
            elif isinstance(h3_event, DataReceived) and h3_event.stream_id == session.session_id:
                session.capsules(h3_event.data, h3_event.stream_ended)
            elif isinstance(h3_event, DatagramReceived):
                session.on_datagram(h3_event.data)


class ClientSession:
    """One WebTransport session from Python: ``open()``, ``send(line)``, ``close()``; lines
    and datagrams from the server go to ``on_line`` and ``on_datagram``, the end (the
    server's close code and reason, or None) to ``on_end``."""

    def __init__(self, on_line, on_datagram, on_end) -> None:
        self.on_line, self.on_datagram, self.on_end = on_line, on_datagram, on_end
        self.protocol: ClientProtocol | None = None
        self.session_id = self.stream_id = -1
        self.ended = False
        self.close_code: int | None = None
        self.close_reason = ""
        self._buffer = bytearray()
        self._capsules = b""
        self._response: asyncio.Future | None = None
        self._transport: asyncio.DatagramTransport | None = None

    async def open(self, url: str, cert_hash: str, *, origin: str | None = None,
                   headers: dict[str, str] | None = None,
                   timeout: float = 10.0) -> tuple[int, str]:
        """Connect and send the CONNECT; ``(status, error)`` of the server's answer."""
        split = urlsplit(url)
        host, port = split.hostname or "127.0.0.1", split.port or 443
        path = split.path + (f"?{split.query}" if split.query else "")
        loop = asyncio.get_running_loop()
        configuration = QuicConfiguration(is_client=True, alpn_protocols=H3_ALPN,
                                          max_datagram_frame_size=65536,
                                          verify_mode=ssl.CERT_NONE, server_name=host)
        # The certificate is checked by its hash below, as serverCertificateHashes does.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        address = (await loop.getaddrinfo(host, port, family=family,
                                          type=socket.SOCK_DGRAM))[0][4]
        local = ("::1" if family == socket.AF_INET6 else "127.0.0.1", 0)
        self._transport, protocol = await loop.create_datagram_endpoint(
            lambda: ClientProtocol(QuicConnection(configuration=configuration), session=self),
            local_addr=local)
        self.protocol = protocol
        try:
            async with asyncio.timeout(timeout):
                protocol.connect(address)
                await protocol.wait_connected()
                der = quicpath.peer_certificate_der(protocol.quic)
                if der is None or hashlib.sha256(der).hexdigest() != cert_hash.lower():
                    raise ConnectionError("the server's certificate does not have the hash "
                                          "it announced")
                h3 = protocol.h3
                await protocol.settings.wait()
                settings = h3.received_settings
                if not (settings.get(Setting.ENABLE_CONNECT_PROTOCOL)
                        and settings.get(Setting.ENABLE_WEBTRANSPORT)):
                    raise ConnectionError("the server's HTTP/3 SETTINGS offer no WebTransport")
                self.session_id = protocol.quic.get_next_available_stream_id()
                authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
                request = [(b":method", b"CONNECT"), (b":protocol", b"webtransport"),
                           (b":scheme", b"https"), (b":authority", authority.encode()),
                           (b":path", path.encode()),
                           (b"sec-webtransport-http3-draft02", b"1")]
                if origin:
                    request.append((b"origin", origin.encode()))
                for name, value in (headers or {}).items():
                    request.append((name.lower().encode(), value.encode()))
                self._response = loop.create_future()
                h3.send_headers(self.session_id, request)
                protocol.transmit()
                answer = await self._response
        except BaseException:
            await self.close()
            raise
        status = int(answer.get(b":status", b"0"))
        if status != 200:
            await self.close()
            return status, answer.get(b"chatlib-error", b"").decode(errors="replace")
        self.stream_id = protocol.h3.create_webtransport_stream(self.session_id)
        protocol.transmit()
        return 200, ""

    def response(self, headers: dict[bytes, bytes]) -> None:
        if self._response is not None and not self._response.done():
            self._response.set_result(headers)

    def send(self, data: bytes) -> None:
        if self.ended:
            raise ConnectionError(f"the session ended ({self.close_code}: {self.close_reason})")
        self.protocol.quic.send_stream_data(self.stream_id, data)
        self.protocol.transmit()

    def send_datagram(self, data: bytes) -> None:
        if not self.ended:
            self.protocol.h3.send_datagram(self.session_id, data)
            self.protocol.transmit()

    def stream_data(self, data: bytes, ended: bool) -> None:
        self._buffer += data
        start = 0
        for _ in range(len(self._buffer) + 1):  # one turn per line
            end = self._buffer.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buffer[start:end])
            start = end + 1
            if line.strip():
                self.on_line(line)
        del self._buffer[:start]

    def capsules(self, data: bytes, ended: bool) -> None:
        found, self._capsules = read_capsules(self._capsules + data)
        for kind, payload in found:
            if kind == CLOSE_SESSION:
                self.close_code, self.close_reason = parse_close(payload)
        if ended or self.close_code is not None:
            self.end(self.close_code, self.close_reason)

    def end(self, code: int | None, reason: str) -> None:
        if not self.ended:
            self.ended = True
            self.close_code, self.close_reason = code, reason
            if self._response is not None and not self._response.done():
                self._response.set_exception(ConnectionError(f"connection closed: {reason}"))
            self.on_end(code, reason)

    async def close(self, code: int = CloseCode.NORMAL, reason: str = "") -> None:
        """Send our close capsule, close the connection, free the socket."""
        protocol, self.protocol = self.protocol, None
        if protocol is None:
            return
        if not self.ended and self.session_id >= 0:
            with contextlib.suppress(Exception):
                protocol.h3.send_data(self.session_id, close_capsule(code, reason),
                                      end_stream=True)
        self.ended = True
        protocol.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await protocol.wait_closed()
        self._transport.close()
