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
import errno
import html
import json
import logging
import os
import resource
import socket
import time
from pathlib import Path

import uvicorn

from . import protocols
from .app import create_app, server_stats
from .auth import USER_TOKEN_TTL, checked_token, new_user_secret, user_token
from .closecode import CloseCode
from .colab import PAGE_UNREACHABLE, in_colab
from .guard import host_policy
from .hub import Hub
from .limits import FD_LIMIT_WANTED, Limits
from .pollpath import PollPath
from .proxy import public_url
from .rooms import Rooms
from .store import MemoryLog, MessageLog


class ClientMistakes(logging.Filter):
    """Drop uvicorn log records that report a *client's* mistake as a server error.

    In a notebook, uvicorn's log lands on the kernel's stderr, in the middle of a learner's
    output. These two say nothing the client wasn't already told (a 403, a close 1007):
    uvicorn 0.54 logs a refused handshake (``send_denial_response``) as an incomplete one,
    and a text frame with invalid UTF-8 with a full traceback. asyncio logs a traceback for
    every ``accept()`` that fails for lack of descriptors; :class:`Listener` logs one line
    per interval instead.
    """

    NOISE = ("ASGI callable returned without completing handshake",
             "Invalid UTF-8 sequence received from client",
             "socket.accept() out of system resource",
             "Invalid HTTP request received")  # the client got a 400 saying why

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(noise in str(record.msg) for noise in self.NOISE)


def quiet_client_mistakes() -> None:
    for name in ("uvicorn.error", "asyncio"):
        log = logging.getLogger(name)
        if not any(isinstance(f, ClientMistakes) for f in log.filters):
            log.addFilter(ClientMistakes())


class KernelFriendlyServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host (the kernel)."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield


ACCEPT_LOG_INTERVAL = 10.0
"""Seconds between two "out of file descriptors" log lines."""

logger = logging.getLogger("chatlib")


FD_FIX = ("raise it with `ulimit -n 65536` (the hard limit too: as root, or in "
          "/etc/security/limits.conf) before starting Jupyter or `python -m chatlib serve`")
"""The fix, as the open-files messages give it."""


class Listener(socket.socket):
    """A listening socket that lets asyncio back off when ``accept()`` runs out of descriptors.

    On EMFILE/ENFILE asyncio (3.11) logs a traceback, stops watching the socket for a second,
    and then *keeps looping* over its accept backlog (uvicorn's 2048), logging and
    scheduling a retry each time: 127,000 tracebacks in 20 s, 12 s of CPU. Here the
    first failure goes through (asyncio stops watching for 1 s) and the next call says
    "nothing to accept", which ends asyncio's loop. Instead of asyncio's tracebacks (see
    :class:`ClientMistakes`) one line with the fix is logged per :data:`ACCEPT_LOG_INTERVAL`;
    the clients wait in the listen backlog and get in as others leave.

    In a kernel that line goes to the stderr of the cell that started the server, which
    has long finished (JupyterLab may not show output arriving for a finished cell), so
    :attr:`exhausted` also keeps it for :class:`ChatServer`'s repr: evaluating ``server``
    in any cell shows it.
    """

    _failed = False
    _logged_at = float("-inf")
    exhausted: str | None = None
    """The last "open-files limit reached" line, if the limit was ever reached."""
    refusals = 0
    """Times ``accept()`` failed for lack of descriptors (each: at least one client waiting)."""

    def accept(self):
        if self._failed:
            self._failed = False
            raise BlockingIOError(errno.EAGAIN, "backing off after EMFILE")
        try:
            return super().accept()
        except OSError as exc:
            if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                raise
            self._failed = True
            self.refusals += 1
            now = time.monotonic()
            if now - self._logged_at >= ACCEPT_LOG_INTERVAL:
                self._logged_at = now
                soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
                self.exhausted = (f"chatlib: open-files limit {soft} reached ({exc.strerror}): "
                                  f"new clients wait until others leave; {FD_FIX}.")
                logger.warning(self.exhausted)
            raise


def raise_fd_limit(wanted: int = FD_LIMIT_WANTED) -> int:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit; warn if still < ``wanted``.

    Every connection is a file descriptor; a classroom of browsers with a few tabs each
    can pass the common default of 1024. Returns the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning("chatlib: this process may open only %d files (ulimit -n), so at most "
                       "~%d clients; %s.", soft, max(soft - open_descriptors() - 10, 0), FD_FIX)
    return soft


def open_descriptors() -> int:
    """Descriptors this process has open now (a kernel holds ~65 before any client)."""
    try:
        return len(os.listdir("/proc/self/fd"))
    except OSError:  # not Linux: a guess
        return 50


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
    sock = Listener(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
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
        token: str | bool | None = None,
        forwarded_allow_ips: str | list[str] | None = None,
        webtransport: bool = False,
        private_rooms=(),
        user_secret: str | None = None,
    ) -> None:
        self.host = host
        self.requested_port = port
        self.limits = limits or Limits()
        self.log = log if log is not None else MemoryLog(max_rooms=self.limits.max_rooms)
        self.compression = compression
        self.ws_ping_interval = ws_ping_interval
        self.shutdown_timeout = shutdown_timeout
        self.token = checked_token(token)
        """Token mode (chatlib.auth): every request must carry it. ``token=True`` makes one."""
        self.forwarded_allow_ips = forwarded_allow_ips
        """The proxies (addresses, networks, ``"*"``) whose ``X-Forwarded-For`` and
        ``X-Forwarded-Proto`` are believed; None (the default): nobody's. Every client
        comes from 127.0.0.1 when it runs on this machine, so trusting loopback (uvicorn's
        default) let any client pick its address per request and escape every per-address
        budget. Behind a reverse proxy, name the proxy's address (chatlib.cluster passes
        nginx's) and make the proxy *set* the header, not append to the client's."""
        self.webtransport = webtransport
        """Also serve WebTransport over HTTP/3, on UDP at the same port (chatlib.webtransport)."""
        self.private_rooms = frozenset(private_rooms)
        """Rooms only the user tokens that list them may join (token mode only:
        :meth:`user_token`; chatlib.rooms)."""
        self.user_secret = user_secret or (new_user_secret() if self.token else None)
        """What signs :meth:`user_token`'s tokens: random unless given (to share it with
        other processes); never the shared token, which every learner holds (chatlib.auth)."""
        if self.private_rooms and self.token is None:
            raise ValueError("private rooms need token mode (token=...): in open mode "
                             "anyone may join any room")
        self.hub: Hub | None = None
        """The default room's hub (every room's: :attr:`rooms`)."""
        self.rooms: Rooms | None = None
        self.port: int | None = None
        self._udp: list[socket.socket] = []
        self._webtransport = None  # chatlib.webtransport.WebTransportServer, if on
        self._server: KernelFriendlyServer | None = None
        self._socket: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._sweeper: asyncio.Task | None = None
        self._app = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://", 1) + "ws"

    @property
    def wt_url(self) -> str | None:
        """The WebTransport session URL (``https://127.0.0.1:PORT/wt``), None without it."""
        if self._webtransport is None:
            return None
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"https://{host}:{self.port}/wt"

    @property
    def wt_hash(self) -> str | None:
        """The SHA-256 (hex) of the WebTransport certificate (``serverCertificateHashes``)."""
        return None if self._webtransport is None else self._webtransport.hash_hex

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def start(self, timeout: float = 10.0) -> ChatServer:
        if self.running:
            return self
        # The bus carries presence and typing between processes sharing the log, if any.
        self.hub = Hub(self.log, self.limits, bus=self.log.bus())
        self.rooms = Rooms(self.hub, self.private_rooms, token_mode=self.token is not None)
        await self.hub.start()
        try:
            self._socket, self._udp = self._bind()
        except OSError:
            self.rooms.close()
            if self.hub.bus is not None:
                await self.hub.bus.close()
            raise
        self.port = self._socket.getsockname()[1]
        hosts = host_policy(self.host, self.port, self.limits, public_url(self))
        app = self._app = create_app(self.hub, hosts, self.token, self.user_secret)
        if self._udp:
            from .webtransport import WebTransportServer  # aioquic loads only when asked for

            self._webtransport = app.state.webtransport = WebTransportServer(
                self.hub, app.state.budget, app.state.stuck, app.front_door)
            await self._webtransport.start(self._udp)
        config = uvicorn.Config(
            app,
            # h11 (pure Python) pinned, not "auto": httptools is not a dependency, and the
            # header timeout, body budget and lingering close are written for h11.
            http=protocols.http_protocol(
                self.limits, PollPath.of(app)),
            ws=protocols.websocket_protocol(),  # websockets-sansio, closing without a reset
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
            proxy_headers=bool(self.forwarded_allow_ips),
            forwarded_allow_ips=self.forwarded_allow_ips or None,
            timeout_graceful_shutdown=self.shutdown_timeout,
        )
        quiet_client_mistakes()
        raise_fd_limit()
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

    def _bind(self) -> tuple[socket.socket, list[socket.socket]]:
        """The TCP socket and, with ``webtransport``, the UDP ones at the same port. With
        ``port=0`` a port whose UDP twin is taken is given back and another one tried."""
        for attempt in range(20):  # bounded: a free pair is found at once but for bad luck
            tcp = bind_socket(self.host, self.requested_port)
            if not self.webtransport:
                return tcp, []
            from .webtransport import bind_udp

            try:
                return tcp, bind_udp(self.host, tcp.getsockname()[1])
            except OSError:
                tcp.close()
                if self.requested_port or attempt == 19:
                    raise
        raise AssertionError("unreachable")

    async def _sweep_presence(self) -> None:
        """Polling users leave by going quiet: re-check presence every few seconds."""
        while True:
            await asyncio.sleep(min(5.0, self.limits.presence_ttl / 3))
            self.rooms.sweep()

    async def stop(self, code: int = CloseCode.GOING_AWAY) -> None:
        """Stop serving and free the port; every client is told (``code`` / end of stream).

        WebSockets get 1001 (going away) by default; :func:`start_server` restarting a server
        passes 1012 (service restart), so clients know to come back.
        """
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.rooms is not None:
            self.rooms.close(code)
        try:
            if self._server is not None and self._task is not None:
                self._server.should_exit = True
                # asyncio.wait neither raises the serve task's own error nor cancels it; a
                # CancelledError here is the caller's (Interrupt), and it propagates.
                done, _ = await asyncio.wait({self._task}, timeout=self.shutdown_timeout + 3)
                if not done:
                    self._server.force_exit = True
                    done, _ = await asyncio.wait({self._task}, timeout=5)
                if not done:
                    self._task.cancel()
        finally:
            # WebTransport after HTTP: a page that reconnects meanwhile finds no HTTP server
            # (and waits) rather than a WebTransport port that refuses it (and gives up on it).
            if self._webtransport is not None:
                await self._webtransport.close()  # the sessions' close capsules, then the port
                self._webtransport = None
            for sock in self._udp:
                sock.close()
            self._udp = []
            if self._socket is not None:
                self._socket.close()
            self._task = None
            if self.hub is not None and self.hub.bus is not None:
                await self.hub.bus.close()  # this process's users leave the others' presence

    async def restart(self, spread: float | None = None) -> ChatServer:
        """Stop and start again on the same port with the same log: a deploy, in one process.

        Every push client is closed with 1012 and told its own delay (:meth:`restarting`),
        so that reconnects spread over ``spread`` seconds instead of arriving at once;
        ``spread=0`` is the naive restart, for comparison.
        """
        self.restarting(spread)
        port = self.port
        await self.stop(CloseCode.SERVICE_RESTART)
        if port is not None:
            self.requested_port = port
        return await self.start()

    def restarting(self, spread: float | None = None) -> float:
        """Announce a restart: every push client closed with 1012 from now on (by
        ``stop(CloseCode.SERVICE_RESTART)``) is told, in its close reason (an SSE stream: its
        ``event: close`` and ``retry:``), its own random delay in ``[0, spread)`` seconds
        before it comes back (chatlib.closecode.CLOSES). None (the default): the time the
        server takes to admit them all, push clients / ``admit_rate``, at least 1 s.
        ``spread=0``: the naive restart, 1012 and no delay, every client back at once
        (admission control alone then bounds the storm). Returns the spread.
        """
        if spread is None:
            rate = self.limits.admit_rate
            clients = len(self.hub.subscribers) if self.hub is not None else 0
            spread = max(1.0, clients / rate) if rate > 0 else 1.0
        if self.hub is not None:
            self.hub.admission.restart_window = spread
        return spread

    def user_token(self, user: str, rooms=(), ttl: float = USER_TOKEN_TTL) -> str:
        """A token for ``user`` only (token mode; chatlib.auth.user_token): it fixes the
        nickname (another is refused, 403), lets its user into its direct messages and
        into the private ``rooms`` it lists, for ``ttl`` seconds. Carried like the shared
        token (``Authorization: Bearer``, ``?token=``, the cookie)."""
        if self.token is None:
            raise ValueError("user tokens need token mode (token=...)")
        return user_token(self.user_secret, user, rooms, ttl)

    def stats(self) -> dict:
        """Backpressure and admission now (chatlib.app.server_stats; ``GET /api/stats``)."""
        if self._app is None:
            raise RuntimeError("the server has not started")
        return server_stats(self._app.state)

    async def __aenter__(self) -> ChatServer:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    @property
    def exhausted(self) -> str | None:
        """The "open-files limit reached" line with its fix, if it was ever reached."""
        return getattr(self._socket, "exhausted", None)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        warning = f"; {self.exhausted}" if self.exhausted else ""
        return f"<ChatServer {self.url if self.port else ''} {state}{warning}>"

    def _repr_html_(self) -> str:
        state = "running" if self.running else "stopped"
        warning = f"<br><b>{html.escape(self.exhausted)}</b>" if self.exhausted else ""
        if in_colab():  # no link that cannot work: say why
            return f"ChatServer {state} on port {self.port}. {PAGE_UNREACHABLE}{warning}"
        url = public_url(self)
        return f'ChatServer {state} at <a href="{url}" target="_blank">{url}</a>{warning}'


_current: ChatServer | None = None

PORT_REUSE_OFF = "CHATLIB_NO_PORT_REUSE"
"""Set (to anything but "" or "0") to turn :func:`notebook_port` off: test runs that start
kernels in parallel set it, so that two of them never ask for the same port."""


def notebook_port(host: str, port: int | None = None) -> int:
    """The port this notebook's server had last time (0: none known), or, given ``port``,
    remember it.

    A kernel restart loses :func:`start_server`'s memory, and open chat tabs would keep
    knocking at the old port. So the port is remembered per user and notebook: in the user's
    Jupyter runtime directory, keyed by the notebook's path that Jupyter Server gives its
    kernels (``JPY_SESSION_NAME``; ipykernel's ``__session__``) and the host. Without a
    notebook (nbconvert, nbval, a script) or with ``CHATLIB_NO_PORT_REUSE`` set, nothing is
    remembered and 0 is returned.
    """
    session = os.environ.get("JPY_SESSION_NAME", "")
    if not session or os.environ.get(PORT_REUSE_OFF, "0") not in ("", "0"):
        return 0
    try:
        from jupyter_core.paths import jupyter_runtime_dir
        path = Path(jupyter_runtime_dir()) / "chatlib-ports.json"
        try:
            ports = json.loads(path.read_text())
        except (OSError, ValueError):
            ports = {}
        if not isinstance(ports, dict):
            ports = {}
        key = f"{host} {session}"
        if port is None:
            known = ports.get(key, 0)
            return known if isinstance(known, int) and 0 < known < 65536 else 0
        ports[key] = port
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(ports))
    except (ImportError, OSError):  # no Jupyter, a read-only runtime dir: no memory
        pass
    return 0


async def start_server(port: int = 0, host: str = "127.0.0.1", **options) -> ChatServer:
    """Start the chat server in the running loop and return it at once.

    Call it again (re-run the cell) and the previous server is stopped first; its message
    log is kept unless you pass ``log=``. ``port=0`` (the default) takes the previous
    server's port, or after a kernel restart this notebook's last one
    (:func:`notebook_port`), when it is free, else a free port.
    ``token=True`` makes a token (chatlib.auth); a re-run keeps the previous one, so open
    tabs keep working.
    """
    global _current
    previous = _current
    if previous is not None:
        await previous.stop(CloseCode.SERVICE_RESTART)
        options.setdefault("log", previous.log)
        if options.get("token") is True and previous.token:
            options["token"] = previous.token
        if previous.user_secret:  # the user tokens handed out stay good too
            options.setdefault("user_secret", previous.user_secret)
    # Same URL for open browser tabs when the port is still free: the previous server's
    # (a re-run), or this notebook's last one (a kernel restart).
    reused = port == 0 and ((previous.port if previous else 0) or notebook_port(host))
    server = ChatServer(host, reused or port, **options)
    try:
        await server.start()
    except OSError:
        if not reused:
            raise
        server = await ChatServer(host, 0, **options).start()
    if port == 0:
        notebook_port(host, server.port)
    _current = server
    return server


async def stop_server() -> None:
    """Stop the server :func:`start_server` started, if any."""
    global _current
    if _current is not None:
        await _current.stop()
        _current = None
