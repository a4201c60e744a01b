"""The fast path: every place chatlib reaches past ASGI into the server's own objects.

Everything else in chatlib speaks ASGI and the public APIs of Starlette, uvicorn,
websockets and h11. This module alone knows what uvicorn (``H11Protocol``'s request
cycle, ``WebSocketsSansIOProtocol``), websockets (its sans-I/O ``ServerProtocol``) and
h11 (``Connection``) keep inside, and uses it for three things:

* **Direct writes.** :func:`websocket_sink` and :func:`sse_sink` return a function that
  writes a fan-out's payloads straight to the connection's transport, while the
  connection could take them without waiting, instead of waking the connection's writer
  task (chatlib.outbox). Without them every payload goes through the writer and ASGI.
* **The server's own send.** :class:`ChatApp` keeps the server's ASGI ``send`` in the
  scope (:func:`server_send`), so that frames and chunks skip Starlette's per-message
  wrappers. This is plain ASGI, but the sinks find uvicorn's objects through it
  (``send.__self__``).
* **The socket under a connection.** :func:`transport_of`, :func:`unsent_bytes`,
  :func:`bytes_acked` and :func:`reset_connection`, for chatlib.stuck's watch on clients
  that stopped reading.

**Checked once, at import.** :func:`probe` looks for every attribute these functions use
on the installed uvicorn, websockets and h11 (tests/test_fastpath.py pins the list). If
one is missing (an upgrade renamed it) the fast path switches itself off
(:data:`MISSING` says why, and a warning is logged once): no direct writes, no stuck-client
watch, and every payload goes through the connection's writer and the server's public
ASGI ``send``, which is correct and measured slower (bench/README.md). Each function also
returns None when the connection in hand is not uvicorn's (another server, an HTTP/1.0
response).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import socket
import struct
from collections.abc import Awaitable, Callable

import h11
from websockets.protocol import State

try:  # Linux: how many bytes the kernel still holds for the peer (SIOCOUTQ = TIOCOUTQ)
    import fcntl
    import termios
    _OUTQ = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: only asyncio's own buffer is seen
    _OUTQ = None

Sink = Callable[[tuple[str, ...]], bool]
"""Writes payloads now (one write) and returns True, or returns False (not now). A fan-out
passes the same tuple to every client (its batch's ``payloads``): a cache key."""
Writer = Callable[[tuple[str, ...]], Awaitable[bool]]
"""Waits until the connection may be written to (flow control), then as :data:`Sink`."""

RAW_SEND = "chatlib.raw_send"
"""The scope key under which :class:`chatlib.app.ChatApp` keeps the server's ASGI send."""

H11_MAX_INCOMPLETE_EVENT_SIZE: int = inspect.signature(h11.Connection).parameters[
    "max_incomplete_event_size"].default
"""h11's default bound on a request's head (uvicorn's, unless configured)."""

WS_OPEN = State.OPEN

Expected = dict[str, tuple[tuple[str, ...], tuple[str, ...]]]
"""What code reads of other libraries, per ``"module:name"``: attributes the class's
``__init__`` sets (found in the names its code stores, so no instance is needed) and
members of the class itself. A name with neither need only exist (a constant)."""

EXPECTED: Expected = {
    "uvicorn.protocols.http.h11_impl:RequestResponseCycle": (
        ("conn", "transport", "flow", "disconnected"), ("send",)),
    "uvicorn.protocols.http.flow_control:FlowControl": (("write_paused",), ()),
    "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol": (
        ("conn", "transport", "writable", "close_sent"), ("send",)),
    "websockets.protocol:Protocol": (
        ("state", "extensions", "writes"), ("send_text", "data_to_send")),
    "h11:Connection": ((), ("our_state",)),
    "h11:SEND_BODY": ((), ()),
}
"""What the fast path reads (tests/test_fastpath.py checks the installed versions)."""


def probe(expected: Expected | None = None) -> str | None:
    """None if every internal in ``expected`` (default: :data:`EXPECTED`, the fast path's)
    is there; else what is missing. chatlib.protocols probes its own list with it."""
    import importlib

    missing = []
    for where, (set_in_init, members) in (EXPECTED if expected is None else expected).items():
        module_name, _, class_name = where.partition(":")
        try:
            cls = getattr(importlib.import_module(module_name), class_name)
        except (ImportError, AttributeError):
            missing.append(where)
            continue
        init = getattr(cls.__init__, "__code__", None)
        stored = set(init.co_names) if init is not None else set()
        missing += [f"{where}.{name}" for name in set_in_init if name not in stored]
        missing += [f"{where}.{name}" for name in members if not hasattr(cls, name)]
    return ", ".join(missing) or None


MISSING: str | None = probe()
"""Why the fast path is off (what the installed libraries lack), or None: it is on."""
if MISSING:
    logging.getLogger("chatlib").warning(
        "chatlib's fast path is off (the installed uvicorn/websockets/h11 lack %s): "
        "correct, but slower", MISSING)


def server_send(scope, send):
    """The server's own ASGI ``send`` for this connection (``send`` if not kept)."""
    return scope.get(RAW_SEND) or send


def _owner(scope):
    """The object uvicorn's ``send`` is a bound method of: the WebSocket protocol, or the
    HTTP request's cycle."""
    return getattr(scope.get(RAW_SEND), "__self__", None)


# -- WebSocket ----------------------------------------------------------------------------


def websocket_sink(scope) -> Sink | None:
    """A function that writes text frames (one per payload, in one ``write``) on this
    WebSocket at once and returns True, or returns False when it must not now; None for
    any other server (the writer then sends everything, through ASGI).

    It writes only while uvicorn's ``send`` would write without waiting: not paused by
    flow control (``writable``, cleared when asyncio's buffer passes its high-water mark),
    the connection open (websockets' state, no close sent or received, transport not
    closing) and nothing of websockets' own waiting to be written. Otherwise the payload
    is queued, and the writer's ``send`` waits for the transport as before: a client that
    stops reading still fills its queue (1013) or is reset by chatlib.stuck.

    Without an extension (no permessage-deflate) the frame is the same bytes for every
    client (a server's frames are not masked, RFC 6455 5.1): :func:`text_frames` builds
    them once per batch. With permessage-deflate each connection compresses with its own
    context, through websockets as uvicorn does.
    """
    if MISSING:
        return None
    protocol = _owner(scope)
    made = getattr(protocol, SINK, None)  # websocket_writer asks too: one per connection
    if made is not None:
        return made
    conn = getattr(protocol, "conn", None)
    transport = getattr(protocol, "transport", None)
    writable = getattr(protocol, "writable", None)
    if conn is None or transport is None or not isinstance(writable, asyncio.Event) or (
            getattr(conn, "state", None) is not WS_OPEN or not hasattr(protocol, "close_sent")):
        return None
    plain = not conn.extensions
    write, is_closing, is_writable = transport.write, transport.is_closing, writable.is_set
    last = _last_frames  # text_frames' cache, read here without a call per client

    def sink(payloads: tuple[str, ...]) -> bool:
        if (not is_writable() or protocol.close_sent or conn.state is not WS_OPEN
                or conn.writes or is_closing()):
            return False
        if plain:
            write(last[1] if payloads is last[0] else text_frames(payloads))
        else:
            for payload in payloads:
                conn.send_text(payload.encode())
            write(b"".join(conn.data_to_send()))
        return True

    if hasattr(protocol, SINK):
        setattr(protocol, SINK, sink)
    return sink


SINK = "chatlib_sink"
"""Where :func:`websocket_sink` keeps the sink it made, on a protocol that has this
attribute (chatlib.protocols'; it drops it when the connection is lost: the sink refers to
the protocol): the writer asks for one too, and a closure with its cells is ~0.8 KiB."""


def websocket_writer(scope) -> Writer | None:
    """The connection writer's way to write text frames: wait while uvicorn's flow control
    says the transport's buffer is full (as its ``send`` does), then :func:`websocket_sink`.
    False: the connection is closing (or websockets has bytes of its own to write first):
    send through ASGI instead. None on the public path. With it every frame, queued or
    not, is built by one encoder (:func:`text_frames`)."""
    sink = websocket_sink(scope)
    if sink is None:
        return None
    wait_writable = _owner(scope).writable.wait

    async def write(payloads: tuple[str, ...]) -> bool:
        await wait_writable()
        return sink(payloads)

    return write


_last_frames: list = [None, b""]  # the last payloads and their frames; None: no match


def text_frames(payloads: tuple[str, ...]) -> bytes:
    """Unmasked, unfragmented, uncompressed text frames (RFC 6455 5.2), one per payload,
    joined, the last ones kept: a fan-out asks with the same tuple once per client, and
    gets one encoding for all (websockets' ``broadcast()`` serialises once per client)."""
    if payloads is _last_frames[0]:
        return _last_frames[1]
    data = b"".join([text_frame(payload) for payload in payloads])
    _last_frames[:] = payloads, data
    return data


def text_frame(payload: str) -> bytes:
    """One server text frame: FIN and opcode 1, no mask, the payload's UTF-8 length in 7,
    7+16 or 7+64 bits (the fewest, RFC 6455 5.2), the payload. The same bytes as the
    course's ``chatlib.frames.text(payload, mask_key=None)`` (chapter 6), without its
    general checks: the writers call this once per frame of a backlog."""
    data = payload.encode()
    length = len(data)
    if length <= 125:
        return _HEADER_7(0x81, length) + data
    if length <= 0xFFFF:
        return _HEADER_16(0x81, 126, length) + data
    return _HEADER_64(0x81, 127, length) + data


_HEADER_7 = struct.Struct("!BB").pack
_HEADER_16 = struct.Struct("!BBH").pack
_HEADER_64 = struct.Struct("!BBQ").pack


# -- Server-Sent Events -------------------------------------------------------------------


def sse_sink(scope) -> Sink | None:
    """A function that writes SSE events (one or more, in one chunk) on this response at
    once and returns True, or returns False when it must not now; None for any other
    server, or a response that is not chunked (the stream then sends through ASGI).

    It writes only while uvicorn's ``send`` would write without waiting (not paused by
    flow control) and the response is still streaming: h11 in its body state, the client
    connected, the transport not closing. The bytes are exactly what h11 writes for a
    chunk of a chunked body (``SIZE CRLF DATA CRLF``), which keeps no state between
    chunks; only GET over HTTP/1.1 is chunked. Call it after the response started.
    """
    if MISSING or scope.get("method") != "GET" or scope.get("http_version") != "1.1":
        return None
    cycle = _owner(scope)
    conn = getattr(cycle, "conn", None)
    transport = getattr(cycle, "transport", None)
    flow = getattr(cycle, "flow", None)
    if conn is None or transport is None or not hasattr(flow, "write_paused") or (
            getattr(conn, "our_state", None) is not h11.SEND_BODY
            or not hasattr(cycle, "disconnected")):
        return None
    write, is_closing = transport.write, transport.is_closing
    last = _last_chunk  # http_chunk's cache, read here without a call per client

    def sink(payloads: tuple[str, ...]) -> bool:
        if (flow.write_paused or cycle.disconnected or conn.our_state is not h11.SEND_BODY
                or is_closing()):
            return False
        write(last[1] if payloads is last[0] else http_chunk(payloads))
        return True

    return sink


def sse_writer(scope) -> Writer | None:
    """The stream's way to write events: wait while uvicorn's flow control says the
    transport's buffer is full (as its ``send`` does), then :func:`sse_sink`. False: the
    response cannot take a chunk (the client is gone, the connection closing). None on
    the public path. With it every chunk of the stream but the last is built here."""
    sink = sse_sink(scope)
    if sink is None:
        return None
    flow = _owner(scope).flow

    async def write(payloads: tuple[str, ...]) -> bool:
        if flow.write_paused:
            await flow.drain()
        return sink(payloads)

    return write


_last_chunk: list = [None, b""]  # the last payloads and their chunk; None: no match


def http_chunk(payloads: tuple[str, ...]) -> bytes:
    """``payloads`` as one chunk of a chunked HTTP/1.1 body (RFC 9112 7.1), the last one
    kept (as :func:`text_frames`)."""
    if payloads is _last_chunk[0]:
        return _last_chunk[1]
    data = "".join(payloads).encode()
    chunk = b"%x\r\n%b\r\n" % (len(data), data)
    _last_chunk[:] = payloads, chunk
    return chunk


# -- the socket under a connection ----------------------------------------------------------


def transport_of(scope) -> asyncio.WriteTransport | None:
    """The TCP connection under an ASGI connection (uvicorn's ``send`` is a bound method
    of its protocol, for WebSockets, or of the request's cycle, for HTTP; both keep it;
    for HTTP it may be chatlib.protocols' LingeringTransport, which passes these on)."""
    if MISSING:
        return None
    transport = getattr(_owner(scope), "transport", None)
    needed = ("abort", "get_write_buffer_size", "get_extra_info")
    return transport if all(hasattr(transport, name) for name in needed) else None


def unsent_bytes(transport: asyncio.WriteTransport) -> int:
    """Bytes written but not yet taken by the peer: asyncio's buffer + the kernel's."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0 and _OUTQ is not None:
        with contextlib.suppress(OSError):
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), _OUTQ, b"\0" * 4))[0]
    return unsent


def reset_connection(transport: asyncio.WriteTransport) -> None:
    """Close at once and free everything: RST, not FIN (a FIN would wait behind the unsent
    bytes, in FIN-WAIT-1, for as long as the peer keeps its window shut)."""
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.fileno() >= 0:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


def bytes_acked(transport: asyncio.WriteTransport) -> int | None:
    """How many bytes the peer has acknowledged so far (Linux TCP_INFO), if known."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.fileno() < 0 or not hasattr(socket, "TCP_INFO"):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    # struct tcp_info: tcpi_bytes_acked is the u64 at offset 120 (Linux >= 4.1).
    return struct.unpack_from("Q", info, 120)[0] if len(info) >= 128 else None
