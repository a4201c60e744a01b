"""uvicorn's per-connection protocols, with the bounds a server open to strangers needs.

uvicorn's ``H11Protocol`` and ``WebSocketsSansIOProtocol`` (0.54 and later) are used as they
are, with three additions, each measured with raw sockets (tests/test_edge.py, bench/edge.py):

* **Header timeout** (:attr:`Limits.header_timeout`). uvicorn waits for a request's headers
  forever: a client that sends nothing, or half a request line, held its connection (and a
  file descriptor) for 300 s and more. Now it gets ``408`` (or, if it sent nothing at all,
  just the end of the connection) after the bound.
* **Body budget**. A request body may take :attr:`Limits.body_timeout` seconds and
  :attr:`Limits.max_body_chunks` chunks. h11 parses each chunk of a chunked body in
  Python, with the event loop busy for everyone else meanwhile: a body of 1-byte chunks
  costs far more than its bytes (bench/README.md, "The HTTP edge"). Past the budget the
  client gets ``413`` or ``408``.
* **Lingering close.** Closing a TCP socket whose receive buffer still holds unread bytes
  sends RST instead of FIN, and the peer's kernel then throws away whatever the peer had
  not read yet: the ``413`` we just wrote, or the WebSocket close frame saying 1009 (it
  happened to refused 1 MB POSTs and 1 MB frames, bench/edge.py). So, like nginx's
  ``lingering_close``, a refused connection is half-closed (FIN after our last bytes) and
  read and discarded for at most :data:`LINGER_SECONDS` and :data:`LINGER_BYTES` before it
  is closed.

A request uvicorn cannot parse already gets ``400`` at once; here the answer says why
(h11's reason), and a request cut off by the client's EOF gets ``400`` too.

One more path: with a chatlib.pollpath.PollPath, a plain ``GET /api/messages`` that
arrives whole on an idle connection is answered by it, without h11 and ASGI (that module
says why, and what it takes); everything else goes through h11 as above.

**Checked once, at import**, as chatlib.fastpath is: the subclasses override and call
uvicorn's methods and read its protocols' state (:data:`EXPECTED`, pinned by
tests/test_fastpath.py). If an upgrade moved any of it, :data:`MISSING` says what, a
warning is logged once, and the server runs uvicorn's own protocols
(:func:`http_protocol`, :func:`websocket_protocol`): correct, without the bounds above.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sys
from http import HTTPStatus

import h11

from .admission import FirstBytes
from .fastpath import (
    H11_MAX_INCOMPLETE_EVENT_SIZE,
    RAW_SEND,
    Expected,
    probe,
    reset_connection,
    unsent_bytes,
)
from .leanasync import LeanEvent, LeanQueue
from .limits import LINGER_BYTES, LINGER_SECONDS, MAX_FRAGMENTS, READ_SLICE, Limits
from .stuck import Progress

_HTTP = "uvicorn.protocols.http.h11_impl"
_WS = "uvicorn.protocols.websockets.websockets_sansio_impl"
EXPECTED: Expected = {
    f"{_HTTP}:H11Protocol": (
        ("config", "loop", "conn", "transport", "cycle", "flow", "server", "client", "scheme",
         "server_state", "tasks", "root_path", "timeout_keep_alive_task", "timeout_keep_alive"),
        ("connection_made", "connection_lost", "data_received", "eof_received",
         "on_response_complete", "handle_websocket_upgrade", "send_400_response", "shutdown",
         "pause_writing", "resume_writing", "_unset_keepalive_if_required")),
    "uvicorn.protocols.http.flow_control:FlowControl": ((), ("pause_reading", "resume_reading")),
    f"{_HTTP}:RequestResponseCycle": (
        ("disconnected", "message_event", "response_started", "response_complete"), ()),
    f"{_WS}:WebSocketsSansIOProtocol": (
        ("conn", "transport", "queue", "writable", "frames", "read_paused", "close_sent",
         "close_timer", "handshake_initiated", "handshake_complete"),
        ("connection_lost", "data_received", "handle_cont", "handle_parser_exception",
         "pause_writing", "resume_writing", "start_keepalive", "on_task_complete")),
    "websockets.protocol:Protocol": (("parser",), ()),
    "uvicorn.config:Config": (("h11_max_incomplete_event_size",), ()),
    "uvicorn.server:ServerState": (("default_headers",), ()),
}
"""What the subclasses below override, call and read of uvicorn's protocols."""

MISSING: str | None = probe(EXPECTED)
"""Why uvicorn's own protocols are used (what the installed uvicorn lacks), or None."""
if MISSING:
    logging.getLogger("chatlib").warning(
        "chatlib runs uvicorn's own protocols, without header timeout, body budget or "
        "lingering close (the installed uvicorn lacks %s)", MISSING)
    H11Protocol = WebSocketsSansIOProtocol = object  # the classes below are never used
else:
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol


def http_protocol(limits: Limits, poll_path=None):
    """uvicorn's ``http`` option: :class:`BoundedH11Protocol` with ``limits`` (and
    ``poll_path``, a chatlib.pollpath.PollPath, to answer plain long polls), or uvicorn's
    own ``"h11"`` when :data:`MISSING` (read when a server starts)."""
    if MISSING:
        return "h11"
    return functools.partial(BoundedH11Protocol, limits=limits, poll_path=poll_path,
                             first_bytes=FirstBytes())


def websocket_protocol():
    """uvicorn's ``ws`` option: :class:`BoundedWebSocketProtocol` (websockets' sans-I/O
    protocol, bounded), or uvicorn's own ``"websockets-sansio"`` when :data:`MISSING`."""
    return "websockets-sansio" if MISSING else BoundedWebSocketProtocol


class LingeringClose:
    """Mixin: :meth:`linger` half-closes the connection and drains it, within bounds."""

    lingering = False
    _linger_timer: asyncio.TimerHandle | None = None
    _drained = 0

    def linger(self, transport: asyncio.Transport) -> None:
        """Send FIN after what was written; close after EOF, LINGER_* or a second close."""
        if self.lingering or transport.is_closing() or not transport.can_write_eof():
            transport.close()
            return
        try:
            transport.write_eof()
        except OSError:  # the peer is gone already
            transport.close()
            return
        self.lingering = True
        transport.resume_reading()  # flow control may have paused it
        self._linger_timer = asyncio.get_running_loop().call_later(
            LINGER_SECONDS, self.linger_expired, transport)

    def linger_expired(self, transport: asyncio.Transport) -> None:
        transport.close()

    def drain(self, transport: asyncio.Transport, data: bytes) -> None:
        self._drained += len(data)
        if self._drained > LINGER_BYTES:
            transport.close()

    def stop_lingering(self) -> None:
        if self._linger_timer is not None:
            self._linger_timer.cancel()
            self._linger_timer = None


class LingeringTransport:
    """A connection's transport whose ``close()`` lingers (see :class:`LingeringClose`).

    uvicorn's HTTP protocol closes its transport in many places (after a response with
    ``Connection: close``, after a 400, ...); handing it this wrapper makes all of them
    linger. ``write`` is the real transport's own method (no indirection per write).
    """

    def __init__(self, transport: asyncio.Transport, protocol: LingeringClose) -> None:
        self._transport = transport
        self._protocol = protocol
        self.write = transport.write

    def __getattr__(self, name: str):
        return getattr(self._transport, name)

    def close(self) -> None:
        self._protocol.linger(self._transport)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()


class ChunkCountingConnection(h11.Connection):
    """An h11 server connection that refuses a body of more than ``max_chunks`` chunks."""

    def __init__(self, max_chunks: int, max_incomplete_event_size: int) -> None:
        super().__init__(h11.SERVER, max_incomplete_event_size)
        self.max_chunks = max_chunks
        self.chunks = 0

    def next_event(self):
        event = super().next_event()
        if type(event) is h11.Data and event.chunk_start:
            self.chunks += 1
            if self.chunks > self.max_chunks:
                raise h11.RemoteProtocolError(
                    f"request body has more than {self.max_chunks} chunks", 413)
        elif type(event) is h11.Request:
            self.chunks = 0
        return event


class BoundedH11Protocol(LingeringClose, H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a body budget, lingering close, and
    the stuck-client rule for every response (chatlib.stuck.Progress): a connection whose
    output waits, in asyncio's buffer (past its high-water mark) or, once a response is
    complete, in the kernel's, and whose client acknowledges nothing of it for
    ``limits.stuck_timeout`` seconds is reset. (100 sockets with a 4 KB receive buffer
    that asked for a 500-message page and never read held 115 MB of the server and 267 MB
    of kernel buffers for over 75 s; a page small enough for the kernel's buffers ended
    in a FIN stuck behind it in FIN-WAIT-1: issue 18.) A slow reader that makes progress
    is left alone, and a close waits until it has taken what we wrote (:meth:`linger`).

    With a ``poll_path`` (chatlib.pollpath.PollPath), a read that is one plain
    ``GET /api/messages`` on an idle connection is answered by it instead (:meth:`_poll`).
    Unless uvicorn rewrites scopes itself (``root_path``, proxy headers): then it would not
    see what the app sees, and everything goes through h11.

    Make one per server with ``functools.partial(BoundedH11Protocol, limits=...)``.
    """

    def __init__(self, *args, limits: Limits, poll_path=None,
                 first_bytes: FirstBytes | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self.first_bytes = first_bytes
        """The server's gate for new connections' first bytes (chatlib.admission), until
        this connection's have come."""
        plain = not self.root_path and not self.config.proxy_headers
        self.poll_path = poll_path if plain else None
        self.polling: asyncio.Task | None = None
        """The long poll the poll path answers now, if any."""
        self._piped = b""  # what came while it waited (pipelined): read after its answer
        self._close_after_poll = False
        self.conn = ChunkCountingConnection(
            limits.max_body_chunks,
            self.config.h11_max_incomplete_event_size or H11_MAX_INCOMPLETE_EVENT_SIZE)
        self.upgraded = False
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._output_timer: asyncio.TimerHandle | None = None
        self._progress: Progress | None = None
        self._close_when_taken = False  # a lingering close waits for our output (linger)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.raw_transport = transport
        self.transport = LingeringTransport(transport, self)
        self._watch()

    def connection_lost(self, exc) -> None:
        self.stop_lingering()
        self._cancel_timers()
        self._stop_output_timer()
        if self.polling is not None:  # the client hung up: nobody to answer
            self.polling.cancel()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._watch_output()

    def _watch_output(self) -> None:
        """Bytes wait for the client (asyncio's buffer or the kernel's): look at them a few
        times per ``stuck_timeout`` until the client took them all, or reset it."""
        if self._output_timer is None and not self.upgraded and unsent_bytes(
                self.raw_transport):
            self._progress = Progress(self.limits.stuck_timeout)
            self._check_output()

    def _stop_output_timer(self) -> None:
        if self._output_timer is not None:
            self._output_timer.cancel()
            self._output_timer = None

    def _check_output(self) -> None:
        self._output_timer = None
        stuck = self._progress.stuck(self.raw_transport, self.loop.time())
        if stuck is None:  # all taken
            if self._close_when_taken:
                self.raw_transport.close()
            return
        if not stuck:
            self._output_timer = self.loop.call_later(
                max(self.limits.stuck_timeout / 4, 0.05), self._check_output)
            return
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's send() and receive() see it gone
            self.cycle.message_event.set()
        reset_connection(self.raw_transport)

    def data_received(self, data: bytes) -> None:
        if self.first_bytes is not None:
            gate, self.first_bytes = self.first_bytes, None
            if gate.hold(self.raw_transport, self.data_received, data):
                return  # on a later step (a crowd arrived)
        if self.lingering:
            self.drain(self.raw_transport, data)
            return
        if self.polling is not None:  # pipelined behind a long poll: read after its answer
            self._piped += data
            self.flow.pause_reading()
            return
        if self.poll_path is not None and self._idle():
            scope = self.poll_path.take(data, self.server, self.client, self.scheme)
            if scope is not None:
                self._poll(scope)
                return
        super().data_received(data)
        self._watch()

    def _idle(self) -> bool:
        """Between requests: no response is being written, h11 waits for a new request
        (so it has sent nothing either) with nothing buffered, the connection is open."""
        return ((self.cycle is None or self.cycle.response_complete)
                and not self.conn.trailing_data[0] and self.conn.their_state is h11.IDLE
                and not self.upgraded and not self.raw_transport.is_closing())

    def _poll(self, scope) -> None:
        """Answer ``scope`` (a long poll) through the poll path, in a task of its own as
        uvicorn runs a request (the server's graceful shutdown waits for it)."""
        self._unset_keepalive_if_required()
        self._cancel_timers()  # the head is complete; there is no body
        self.polling = task = self.loop.create_task(self._answer_poll(scope))
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _answer_poll(self, scope) -> None:
        """The poll's task: write the poll path's answer to ``scope``, wait until the client
        takes it if asyncio's buffer is full, then close (if the answer or a stopping server
        says so) or go on as after any response (timers, stuck-client watch) and read what
        was piped meanwhile. While it runs, :attr:`polling` is set: reads are piped, reading
        is paused, no timer runs. Cancelled (or on any error), it closes the connection."""
        try:
            data, keep_alive = await self.poll_path.answer(
                scope, self.server_state.default_headers)
            if self.raw_transport.is_closing():  # nobody to answer
                return
            self.raw_transport.write(data)
            if keep_alive and not self._close_after_poll and self.flow.write_paused:
                # As uvicorn's send(): one answer waits for a client that does not read,
                # no more (issue 18). Until it is taken, what comes is piped, unread.
                await self.flow.drain()  # connection_lost resumes writing
                if self.raw_transport.is_closing():
                    return
        except BaseException:  # cancelled (the connection was lost, or the server stopped
            # waiting for it: uvicorn's graceful shutdown timed out), or a bug: no answer
            # follows, so nothing may keep the connection open
            if not self.raw_transport.is_closing():
                self.transport.close()
            raise
        finally:
            self.polling = None
        if not keep_alive or self._close_after_poll:
            self.transport.close()  # lingering, if need be
        self.on_response_complete()  # keep-alive timer, header timer, stuck-client watch
        if self._piped and not self.raw_transport.is_closing():
            data, self._piped = self._piped, b""
            self.data_received(data)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request
        self._watch_output()
        self._watch()

    def eof_received(self) -> bool | None:
        """The client half-closed: if it stopped mid-request, say so before closing.
        (While what we wrote waits for it, the connection stays: see :meth:`linger`.)"""
        state = self.conn.their_state
        partial = (state is h11.IDLE and self.conn.trailing_data[0]) or (
            state is h11.SEND_BODY and self.cycle is not None and not self.cycle.response_started)
        if partial and not self.lingering:
            self.refuse(400, "incomplete request")
        if self._output_timer is not None and self.lingering:
            self._close_when_taken = True  # _check_output closes (or resets) it
            return True
        return None  # asyncio closes the transport once our answer is written

    def linger(self, transport) -> None:
        """Linger if the client may still be sending (see the module docstring), or until
        it has taken what we wrote: closed now, the socket would keep those bytes and our
        FIN, in FIN-WAIT-1, for as long as the client keeps its window shut."""
        state = self.conn.their_state
        if (state in (h11.DONE, h11.MUST_CLOSE, h11.CLOSED) or (
                state is h11.IDLE and not self.conn.trailing_data[0])) and (
                self.upgraded or not unsent_bytes(transport)):
            transport.close()
        else:
            self._watch_output()
            super().linger(transport)

    def linger_expired(self, transport) -> None:
        if self._output_timer is None:
            transport.close()
        else:  # _check_output closes it once the client took our output (or resets it)
            self._close_when_taken = True

    def shutdown(self) -> None:
        """The server is stopping: nobody waits for a lingering or idle connection."""
        if self.polling is not None:  # answered as the hub closes, then closed
            self._close_after_poll = True
        elif self.lingering or self.cycle is None or self.cycle.response_complete:
            self._cancel_timers()
            self.raw_transport.close()
        else:
            super().shutdown()

    def handle_websocket_upgrade(self, event) -> None:
        self._cancel_timers()
        self._stop_output_timer()
        self.upgraded = True  # this connection is the WebSocket protocol's from now on
        self.transport = self.raw_transport  # ... which gets the real transport
        super().handle_websocket_upgrade(event)

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this when h11 cannot parse the request (inside ``except``)."""
        exc = sys.exc_info()[1]
        status = getattr(exc, "error_status_hint", 400)
        if not 400 <= status < 500:  # h11 says 501 for e.g. "Transfer-Encoding: gzip"; but
            status = 400  # whatever a client sends, it is the client's error, never a 5xx
        # h11's reason without the bytes it quotes ("illegal request line: b'...'").
        reason = str(exc).partition(":")[0] if exc is not None else ""
        self.refuse(status, reason or msg)

    def refuse(self, status: int, reason: str) -> None:
        """Answer ``status`` (unless a response has begun) and close, lingering.

        The app, if it is still reading the body, sees ``http.disconnect``; whatever it
        sends afterwards is dropped.
        """
        self._cancel_timers()
        # h11's state, not the cycle's: self.cycle may be the previous request's.
        if self.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = f"{status} {reason}\n".encode("latin-1", "replace")
            phrase = h11_reason(status)
            self.raw_transport.write(
                b"HTTP/1.1 %d %s\r\nContent-Type: text/plain; charset=utf-8\r\n"
                b"X-Content-Type-Options: nosniff\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                % (status, phrase, len(body), body))
        if self.cycle is not None:
            self.cycle.response_started = True
            self.cycle.disconnected = True
            self.cycle.message_event.set()
        self.transport.close()

    # -- timers --------------------------------------------------------------------------

    def _watch(self) -> None:
        """Arm or cancel the header and body timers for the state h11 is in now."""
        if self.lingering or self.upgraded or self.transport.is_closing():
            return
        if self.polling is not None:  # a request is being answered: no timer runs
            self._cancel_timers()
            return
        state = self.conn.their_state
        if state is h11.IDLE and self._header_timer is None and not self._keep_alive_first():
            self._header_timer = self.loop.call_later(
                self.limits.header_timeout, self._headers_too_slow)
        elif state is not h11.IDLE and self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        if state is h11.SEND_BODY and self._body_timer is None:
            self._body_timer = self.loop.call_later(
                self.limits.body_timeout, self._body_too_slow)
        elif state is not h11.SEND_BODY and self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _keep_alive_first(self) -> bool:
        """Between requests, with nothing received: uvicorn's keep-alive timer closes the
        connection no later than the header timer would (and is cancelled by the first
        byte that comes, after which the header timer runs)."""
        return (self.timeout_keep_alive_task is not None and not self.conn.trailing_data[0]
                and self.timeout_keep_alive <= self.limits.header_timeout)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:
            limit = self.limits.header_timeout
            self.refuse(408, f"request headers not complete within {limit:g} s")
        else:  # nothing sent: nobody to tell
            self.transport.close()

    def _body_too_slow(self) -> None:
        self._body_timer = None
        if self.conn.their_state is h11.SEND_BODY:
            self.refuse(408, f"request body not complete within {self.limits.body_timeout:g} s")


def drop_read_callback(transport) -> None:
    """asyncio's socket transport keeps its read callback, a bound method of itself, in
    ``_read_ready_cb``: a cycle that only the cyclic GC's full collection frees. Called
    when the connection is lost (no read follows), it leaves the transport to reference
    counting."""
    if getattr(transport, "_read_ready_cb", None) is not None:
        transport._read_ready_cb = None


def h11_reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Error"


class BoundedWebSocketProtocol(LingeringClose, WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol, with these additions:

    * a close it sends for a protocol error (1009 too big, 1007 bad UTF-8, 1002, ...) is
      followed by a lingering close, not an immediate one that would reset the connection
      before the peer reads the close frame;
    * a handshake that h11 accepted but websockets' stricter HTTP parser refuses (more than
      128 headers, ``Transfer-Encoding``, a version other than 1.1, an unusual method) gets
      ``400`` at once; uvicorn 0.54 answered nothing and held the connection forever;
    * a message may come in at most MAX_FRAGMENTS frames (1008 past that), and a read is
      parsed READ_SLICE bytes per event-loop step, so that one connection's 1-byte
      frames never hold the loop for long;
    * a peer that answers no ping within the ping timeout is reset, not closed with a FIN
      that would sit behind the bytes it never acknowledged (:meth:`keepalive_timeout`);
    * it stops reading from a client whose output waits past the transport's high-water
      mark (asyncio's ``pause_writing``), until that output drains: every ping a client
      sends makes a pong, and four sockets that sent pings and read no pongs grew the
      server by 207 MB in 8 s (issue 18). A client that does not read what it is sent
      gets nothing more read either; what it sent meanwhile waits in its kernel buffers;
    * it holds less per idle connection: its receive queue and ``writable`` flag are
      chatlib.leanasync's (no 760-byte deque each), and once the handshake is answered it
      lets go of the request's and the response's headers, which uvicorn (and websockets'
      parser) keep for the connection's life (the app has them in the ASGI scope), and
      compacts its own attribute dict;
    * a closed connection is freed at once by reference counting, not left in reference
      cycles for the cyclic GC's next full collection (which a server that makes those
      rare, chatlib.collector, may not run for a long while): the app's end drops the
      scope's server ``send`` (a method of this protocol, kept in the scope this protocol
      keeps), and the connection's end closes websockets' parser (a generator that refers
      to the sans-I/O protocol that refers to it) and drops asyncio's read callback
      (:func:`drop_read_callback`).
    """

    chatlib_sink = None
    """chatlib.fastpath.websocket_sink's sink for this connection, once made (fastpath.SINK)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.queue = LeanQueue()  # put_nowait, get, empty: all uvicorn uses
        self.writable = LeanEvent()
        self.writable.set()

    def start_keepalive(self) -> None:
        """uvicorn calls this once the handshake's response is written: the request and
        response (read only to write that response) are done with."""
        super().start_keepalive()
        request = getattr(self, "request", None)
        if request is not None:  # websockets' parser keeps it too (a local of its generator)
            request.headers.clear()
        self.request = self.response = None
        # The instance dict grew attribute by attribute past a resize (~40 keys in a table
        # sized for twice that): a copy is sized for what it holds, 1.6 -> 0.8 KB for the
        # connection's life, with room for the few attributes set later (chatlib_sink).
        self.__dict__ = dict(self.__dict__)

    output_paused = False
    """The transport's write buffer passed its high-water mark: reading is paused."""

    def pause_writing(self) -> None:
        super().pause_writing()
        self.output_paused = True
        if not self.lingering and not self.transport.is_closing():
            self.transport.pause_reading()

    backlog: memoryview | None = None
    """Bytes read and not parsed yet: websockets gets READ_SLICE of them per loop step."""

    def resume_writing(self) -> None:
        super().resume_writing()
        self.output_paused = False
        if self.backlog is not None:
            self.loop.call_soon(self._parse_backlog)  # it resumes reading when done
        elif not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()  # (uvicorn's own pause, for its queue, stays)

    def handle_cont(self, event) -> None:
        """A continuation frame: at most MAX_FRAGMENTS frames per message, else 1008."""
        if self.close_sent:
            return
        if len(self.frames) >= MAX_FRAGMENTS:
            self.frames = []
            self.conn.send_close(1008, f"more than {MAX_FRAGMENTS} frames in one message")
            self.handle_parser_exception()
            return
        super().handle_cont(event)

    def data_received(self, data: bytes) -> None:
        if self.lingering:
            self.drain(self.transport, data)
            return
        if self.backlog is not None:  # after what waits: the order is kept
            self.backlog = memoryview(bytes(self.backlog) + data)
            return
        self._parse(data)

    def _parse(self, data: bytes | memoryview) -> None:
        """Parse READ_SLICE bytes now and the rest in later loop steps, reading no more
        meanwhile: one connection's read never holds the loop for more than a slice."""
        if len(data) > READ_SLICE:
            self.backlog = memoryview(data)[READ_SLICE:]
            data = data[:READ_SLICE]
            self.loop.call_soon(self._parse_backlog)
        super().data_received(bytes(data))
        if (self.output_paused or self.backlog is not None) and not self.transport.is_closing():
            self.transport.pause_reading()  # uvicorn's receive() may have resumed it
        if (self.conn.handshake_exc is not None and not self.handshake_initiated
                and not self.close_sent):
            self.handle_handshake_exception()  # uvicorn < 0.55 does not call it itself

    def _parse_backlog(self) -> None:
        if self.backlog is None or self.output_paused:  # resume_writing() calls again
            return
        if self.lingering or self.transport.is_closing():
            self.backlog = None
            return
        data, self.backlog = self.backlog, None
        self._parse(data)
        if self.backlog is None and not (self.output_paused or self.read_paused
                                         or self.transport.is_closing()):
            self.transport.resume_reading()

    def handle_handshake_exception(self) -> None:
        """Answer a handshake websockets refused: ``400`` with its reason, then linger.
        (uvicorn >= 0.55 calls this; its own answers 400 without a reason and closes.)"""
        refused = self.conn.handshake_exc
        cause = refused.__cause__ or refused
        reason = str(cause).partition(":")[0] or "invalid WebSocket handshake"
        body = f"400 {reason}\n".encode("latin-1", "replace")
        self.transport.write(
            b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
            b"X-Content-Type-Options: nosniff\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (len(body), body))
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        self.linger(self.transport)

    def connection_lost(self, exc) -> None:
        self.stop_lingering()
        self.chatlib_sink = None  # no cycle (sink -> protocol) left for the cyclic GC
        super().connection_lost(exc)
        self.conn.parser.close()  # nothing is parsed after this; its frame let go of conn
        drop_read_callback(self.transport)

    def on_task_complete(self, task) -> None:
        """The app is done with this connection: its scope's server send (this protocol's
        bound method, chatlib.fastpath.RAW_SEND) would keep a cycle through self.scope."""
        super().on_task_complete(task)
        scope = getattr(self, "scope", None)
        if scope is not None:
            scope.pop(RAW_SEND, None)

    def keepalive_timeout(self) -> None:
        """No pong within the ping timeout: the peer vanished (or stopped reading). Its
        close frame and our FIN would wait behind the bytes it never acknowledged, in
        FIN-WAIT-1, for minutes of retransmissions: reset instead, if bytes wait."""
        transport = self.transport
        super().keepalive_timeout()  # 1011 to the app, a close frame, transport.close()
        if unsent_bytes(transport):
            reset_connection(transport)  # the socket closes with RST, not FIN

    def handle_parser_exception(self) -> None:
        close = self.conn.close_sent
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code,
                               "reason": close.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self.linger(self.transport)
        # uvicorn closes the transport when the app returns unless a close handshake is
        # pending (close_timer): the lingering deadline is that handshake's deadline.
        self.close_timer = self._linger_timer
