"""Run the chat server inside an already running asyncio loop (a Jupyter kernel's).

Three traps, each measured in a real ipykernel, shape this module:

1. **Port in use kills the kernel.** uvicorn calls ``sys.exit`` when it cannot bind. We
   bind the listening socket ourselves and hand it to ``uvicorn.Server.serve(sockets=...)``,
   so a busy port is an ordinary ``OSError`` in the cell.
2. **Signals.** ``uvicorn.Server`` installs its own SIGINT/SIGTERM handlers while it
   runs; inside a kernel that would steal the Interrupt button. :class:`KernelFriendlyServer`
   turns that off.
3. **Shutdown hangs on open streams.** uvicorn waits for open responses to finish, and an
   SSE stream never does. :meth:`ChatServer.stop` first ends every stream and long poll
   (``Hub.close``), and ``timeout_graceful_shutdown`` bounds the rest.

Re-running a notebook's start cell calls :func:`start_server` again: it stops the server it
started before (keeping its message log, so the history survives) and starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

import uvicorn

from .app import create_app
from .guard import host_policy
from .hub import GOING_AWAY, SERVICE_RESTART, Hub
from .limits import Limits
from .proxy import public_url
from .store import MemoryLog, MessageLog


class ClientMistakes(logging.Filter):
    """Drop uvicorn log records that report a *client's* mistake as a server error.

    In a notebook, uvicorn's log lands on the kernel's stderr, in the middle of a learner's
    output. These two say nothing the client wasn't already told (a 403, a close 1007):
    uvicorn 0.54 logs a refused handshake (``send_denial_response``) as an incomplete one,
    and a text frame with invalid UTF-8 with a full traceback.
    """

    NOISE = ("ASGI callable returned without completing handshake",
             "Invalid UTF-8 sequence received from client")

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in str(record.msg) for noise in self.NOISE)


def quiet_client_mistakes() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, ClientMistakes) for f in logger.filters):
        logger.addFilter(ClientMistakes())


class KernelFriendlyServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (the kernel)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket; ``port=0`` asks the OS for a free (ephemeral) port.

    ``SO_REUSEADDR`` lets a restarted server bind the port its predecessor just left, whose
    old connections may still sit in TIME_WAIT.

    The protocol must be named ``IPPROTO_TCP``: asyncio disables Nagle's algorithm
    (``TCP_NODELAY``) only on sockets that say so, and accepted sockets inherit it. With the
    default protocol 0, a response written as headers then body waits for the client's
    delayed ACK: 40 ms per HTTP request, measured.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(1024)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


class ChatServer:
    """The chat server: a :class:`Hub` behind a Starlette app behind uvicorn.

    >>> server = ChatServer(port=0)      # doctest: +SKIP
    >>> await server.start()             # returns as soon as it accepts connections
    >>> server.url
    'http://127.0.0.1:41235/'
    >>> await server.stop()              # frees the port
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        log: MessageLog | None = None,
        limits: Limits | None = None,
        compression: bool = False,
        ws_ping_interval: float | None = 20.0,
        shutdown_timeout: float = 2.0,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.log = log if log is not None else MemoryLog()
        self.limits = limits or Limits()
        self.compression = compression
        self.ws_ping_interval = ws_ping_interval
        self.shutdown_timeout = shutdown_timeout
        self.hub: Hub | None = None
        self.port: int | None = None
        self._server: KernelFriendlyServer | None = None
        self._socket: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "ws"

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, timeout: float = 10.0) -> ChatServer:
        if self.running:
            return self
        self.hub = Hub(self.log, self.limits)
        await self.hub.start()
        try:
            self._socket = bind_socket(self.host, self.requested_port)
        except OSError:
            self.hub.close()
            raise
        self.port = self._socket.getsockname()[1]
        hosts = host_policy(self.host, self.port, self.limits, public_url(self))
        config = uvicorn.Config(
            create_app(self.hub, hosts),
            ws="websockets-sansio",
            # permessage-deflate roughly doubles memory per connection for ~100-byte chat
            # messages that barely compress: off by default (see bench/README.md).
            ws_per_message_deflate=self.compression,
            ws_max_size=self.limits.max_frame,
            ws_ping_interval=self.ws_ping_interval,
            ws_ping_timeout=self.ws_ping_interval,
            lifespan="off",
            log_config=None,  # don't reconfigure the kernel's logging
            log_level="warning",
            access_log=False,
            timeout_graceful_shutdown=self.shutdown_timeout,
        )
        quiet_client_mistakes()
        self._server = KernelFriendlyServer(config)
        self._task = asyncio.ensure_future(self._server.serve(sockets=[self._socket]))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._server.started:  # bounded by the deadline
            if self._task.done():
                self._task.result()  # re-raise why it failed
                raise RuntimeError("uvicorn stopped during startup")
            if loop.time() > deadline:
                await self.stop()
                raise TimeoutError(f"server did not start within {timeout} s")
            await asyncio.sleep(0.005)
        self._sweeper = asyncio.ensure_future(self._sweep_presence())
        return self

    async def _sweep_presence(self) -> None:
        """Polling users leave by going quiet: re-check presence every few seconds."""
        while True:
            await asyncio.sleep(min(5.0, self.limits.presence_ttl / 3))
            self.hub.presence_changed()

    async def stop(self, code: int = GOING_AWAY) -> None:
        """Stop serving and free the port; every client is told (``code`` / end of stream).

        WebSockets get 1001 (going away) by default; :func:`start_server` restarting a server
        passes 1012 (service restart), so clients know to come back.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.hub is not None:
            self.hub.close(code)
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(self._task), self.shutdown_timeout + 3)
            except TimeoutError:
                self._server.force_exit = True
                with contextlib.suppress(BaseException):
                    await asyncio.wait_for(self._task, 5)
        if self._socket is not None:
            self._socket.close()
        self._task = None

    async def __aenter__(self) -> ChatServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<ChatServer {self.url if self.port else ''} {state}>"

    def _repr_html_(self) -> str:
        url = public_url(self)
        state = "running" if self.running else "stopped"
        return f'ChatServer {state} at <a href="{url}" target="_blank">{url}</a>'


_current: ChatServer | None = None


async def start_server(port: int = 0, host: str = "127.0.0.1", **options) -> ChatServer:
    """Start the chat server in the running loop and return it at once.

    Call it again (re-run the cell) and the previous server is stopped first; its message
    log is kept unless you pass ``log=``. ``port=0`` (the default) picks a free port.
    """
    global _current
    previous = _current
    if previous is not None:
        await previous.stop(SERVICE_RESTART)
        options.setdefault("log", previous.log)
        if port == 0 and previous.port:
            port = previous.port  # same URL for open browser tabs, when it is still free
    server = ChatServer(host, port, **options)
    try:
        await server.start()
    except OSError:
        if port == 0 or previous is None or port != previous.port:
            raise
        server = await ChatServer(host, 0, **options).start()
    _current = server
    return server


async def stop_server() -> None:
    """Stop the server :func:`start_server` started, if any."""
    global _current
    if _current is not None:
        await _current.stop()
        _current = None
