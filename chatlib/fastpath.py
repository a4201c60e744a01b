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
from collections.abc import Callable

import h11
from websockets.protocol import State

from . import frames
from .hub import Batch

try:  # Linux: how many bytes the kernel still holds for the peer (SIOCOUTQ = TIOCOUTQ)
    import fcntl
    import termios
    _OUTQ = termios.TIOCOUTQ
except (ImportError, AttributeError):  # elsewhere: only asyncio's own buffer is seen
    _OUTQ = None

Sink = Callable[[Batch], bool]
"""Writes a batch's payloads now (one write) and returns True, or returns False (not now)."""

RAW_SEND = "chatlib.raw_send"
"""The scope key under which :class:`chatlib.app.ChatApp` keeps the server's ASGI send."""

H11_MAX_INCOMPLETE_EVENT_SIZE: int = inspect.signature(h11.Connection).parameters[
    "max_incomplete_event_size"].default
"""h11's default bound on a request's head (uvicorn's, unless configured)."""

WS_OPEN = State.OPEN

# What the fast path reads, per class: attributes its __init__ sets (found in the names
# its code stores, so no instance is needed) and members of the class itself.
EXPECTED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uvicorn.protocols.http.h11_impl:RequestResponseCycle": (
        ("conn", "transport", "flow", "disconnected"), ("send",)),
    "uvicorn.protocols.http.flow_control:FlowControl": (("write_paused",), ()),
    "uvicorn.protocols.websockets.websockets_sansio_impl:WebSocketsSansIOProtocol": (
        ("conn", "transport", "writable", "close_sent"), ("send",)),
    "websockets.protocol:Protocol": (
        ("state", "extensions", "writes"), ("send_text", "data_to_send")),
    "h11:Connection": ((), ("our_state",)),
}


def probe() -> str | None:
    """None if every internal the fast path uses is there; else what is missing."""
    import importlib

    missing = []
    for where, (set_in_init, members) in EXPECTED.items():
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
    if not hasattr(h11, "SEND_BODY"):
        missing.append("h11.SEND_BODY")
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
    conn = getattr(protocol, "conn", None)
    transport = getattr(protocol, "transport", None)
    writable = getattr(protocol, "writable", None)
    if conn is None or transport is None or not isinstance(writable, asyncio.Event) or (
            getattr(conn, "state", None) is not WS_OPEN or not hasattr(protocol, "close_sent")):
        return None
    plain = not conn.extensions
    write, is_closing, is_writable = transport.write, transport.is_closing, writable.is_set

    def sink(batch: Batch) -> bool:
        if (not is_writable() or protocol.close_sent or conn.state is not WS_OPEN
                or conn.writes or is_closing()):
            return False
        if plain:
            write(text_frames(batch))
        else:
            for payload in batch.payloads:
                conn.send_text(payload.encode())
            write(b"".join(conn.data_to_send()))
        return True

    return sink


_last_frames: tuple[Batch | None, bytes] = (None, b"")  # None: no batch matches


def text_frames(batch: Batch) -> bytes:
    """Unmasked, unfragmented, uncompressed text frames (RFC 6455 5.2), one per payload,
    joined, the last ones kept: a fan-out asks with the same batch once per client, and
    gets one encoding for all (websockets' ``broadcast()`` serialises once per client)."""
    global _last_frames
    if batch is _last_frames[0]:
        return _last_frames[1]
    # the course's own encoder (chapter 6)
    data = b"".join(frames.text(payload, mask_key=None) for payload in batch.payloads)
    _last_frames = (batch, data)
    return data


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

    def sink(batch: Batch) -> bool:
        if (flow.write_paused or cycle.disconnected or conn.our_state is not h11.SEND_BODY
                or is_closing()):
            return False
        write(http_chunk(batch))
        return True

    return sink


_last_chunk: tuple[Batch | None, bytes] = (None, b"")  # None: no batch matches


def http_chunk(batch: Batch) -> bytes:
    """The events of ``batch`` as one chunk of a chunked HTTP/1.1 body (RFC 9112 7.1),
    the last one kept (as :func:`text_frames`)."""
    global _last_chunk
    if batch is _last_chunk[0]:
        return _last_chunk[1]
    data = "".join(batch.payloads).encode()
    chunk = b"%x\r\n%b\r\n" % (len(data), data)
    _last_chunk = (batch, chunk)
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
