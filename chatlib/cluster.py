"""A whole chat cluster on one machine: Redis, several chat processes, nginx in front.

Each part is an ordinary child process on a free port, with its files in a temporary
directory (no systemd, no root-owned state), started and stopped from Python::

    cluster = await Cluster(processes=3).start()
    cluster.url                      # nginx: open the chat here
    cluster.servers[0].url           # one chat process, directly
    cluster.servers[1].kill()        # SIGKILL: its clients fail over to the others
    await cluster.stop()

    python -m chatlib.cluster        # the same from a shell (make cluster); Ctrl+C stops all

The parts are :class:`RedisProcess` (``redis-server``), :class:`ChatProcess`
(``python -m chatlib serve --redis ...``) and :class:`NginxProcess` (``nginx`` with
deploy/nginx.conf); tests and chapter 9 use them one by one.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from .auth import new_user_secret, user_token

NGINX_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
NGINX_FAIL_TIMEOUT = 10.0
"""nginx's ``fail_timeout`` (its default; deploy/nginx.conf keeps it): how long a chat process
that refused a connection is left out (:meth:`Cluster.rolling_restart`)."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_program(name: str) -> str | None:
    """``redis-server`` / ``nginx`` on PATH, or in /usr/sbin (Debian puts nginx there)."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/local/sbin")


def missing_programs() -> list[str]:
    return [name for name in ("redis-server", "nginx") if find_program(name) is None]


async def wait_listening(port: int, process: subprocess.Popen, timeout: float) -> None:
    """Wait until something accepts TCP connections on ``port`` (or the process died)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:  # bounded by the deadline
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with {process.returncode}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        if loop.time() > deadline:
            raise TimeoutError(f"nothing listens on port {port} after {timeout} s")
        await asyncio.sleep(0.02)


def _die_with_parent() -> None:
    """In the child, before exec: ask Linux to SIGTERM it when its parent ends, so that a
    kernel or a test run that exits (or crashes) leaves no redis-server or nginx behind."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class ChildProcess:
    """A child process on ``port``; ``stop()`` asks it to end (SIGTERM), ``kill()`` doesn't."""

    name = "process"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    async def start(self, timeout: float = 20.0):
        self.process = subprocess.Popen(
            self.command(), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            stderr=self.stderr(), preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        try:
            await wait_listening(self.port, self.process, timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def stderr(self):
        return subprocess.DEVNULL

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: the process gets no chance to clean up (a crash, an OOM kill)."""
        if self.running:
            self.process.kill()
            self.process.wait(10)

    async def stop(self, timeout: float = 10.0) -> None:
        if not self.running:
            return
        self.process.send_signal(signal.SIGTERM)
        for _ in range(int(timeout / 0.02)):  # bounded: then SIGKILL
            if self.process.poll() is not None:
                return
            await asyncio.sleep(0.02)
        self.kill()

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<{self.name} on port {self.port}, {state}>"


class RedisProcess(ChildProcess):
    """``redis-server`` with its data in ``directory``; every write is fsynced to the
    append-only file, so a restart (or a SIGKILL) keeps the history and the id counter."""

    name = "redis-server"

    def __init__(self, directory: str | Path, port: int | None = None) -> None:
        super().__init__(port)
        self.directory = Path(directory)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def command(self) -> list[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        return [find_program("redis-server") or "redis-server", "--port", str(self.port),
                "--bind", "127.0.0.1", "--dir", str(self.directory), "--save", "",
                "--appendonly", "yes", "--appendfsync", "always", "--daemonize", "no",
                "--logfile", str(self.directory / "redis.log")]

    async def start(self, timeout: float = 20.0) -> RedisProcess:
        await super().start(timeout)
        # Redis accepts connections while it still loads its append-only file, answering
        # "-LOADING" until done: ready means PING answers PONG.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:  # bounded by the deadline
            with contextlib.suppress(OSError):
                reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
                try:
                    writer.write(b"PING\r\n")
                    if (await asyncio.wait_for(reader.readline(), 5)).startswith(b"+PONG"):
                        return self
                finally:
                    writer.close()
            if loop.time() > deadline:
                self.kill()
                raise TimeoutError(f"redis-server on port {self.port} not ready")
            await asyncio.sleep(0.02)

    async def restart(self) -> None:
        await self.stop()
        await self.start()


class ChatProcess(ChildProcess):
    """``python -m chatlib serve --redis URL`` on its own port."""

    name = "chatlib serve"

    def __init__(self, redis_url: str, port: int | None = None, *, key: str = "chat",
                 args: tuple[str, ...] = ()) -> None:
        super().__init__(port)
        self.redis_url = redis_url
        self.key = key
        self.args = args

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def command(self) -> list[str]:
        # nginx (deploy/nginx.conf) connects from 127.0.0.1 and sets X-Forwarded-For to
        # the address its client connected from: the per-address budgets count that one.
        return [sys.executable, "-m", "chatlib", "serve", "--port", str(self.port),
                "--redis", self.redis_url, "--redis-key", self.key,
                "--forwarded-allow-ips", "127.0.0.1", *self.args]

    def stderr(self):
        return None  # a traceback belongs in the output of whoever started it


class NginxProcess(ChildProcess):
    """nginx with deploy/nginx.conf, in front of ``upstreams`` (ports on 127.0.0.1)."""

    name = "nginx"

    def __init__(self, directory: str | Path, upstreams: list[int], port: int | None = None,
                 *, read_timeout: str = "60s") -> None:
        super().__init__(port)
        self.directory = Path(directory)
        self.upstreams = upstreams
        self.read_timeout = read_timeout

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def config(self) -> str:
        servers = "\n".join(f"        server 127.0.0.1:{port};" for port in self.upstreams)
        # As root, nginx would run its worker as "nobody", who can't enter a private
        # temporary directory: keep the worker as the user who started it.
        user = "user root;" if os.geteuid() == 0 else ""
        values = {"prefix": str(self.directory), "port": str(self.port), "servers": servers,
                  "read_timeout": self.read_timeout, "user": user}
        # Only ${name} is ours: nginx's own $variables stay as they are.
        return re.sub(r"\$\{(\w+)\}", lambda m: values[m.group(1)], NGINX_TEMPLATE.read_text())

    def command(self) -> list[str]:
        self.directory.mkdir(parents=True, exist_ok=True)
        conf = self.directory / "nginx.conf"
        conf.write_text(self.config())
        return [find_program("nginx") or "nginx", "-p", str(self.directory), "-c", str(conf),
                "-e", str(self.directory / "error.log")]

    def stderr(self):
        return None


class Cluster:
    """Redis, ``processes`` chat processes and nginx, in one temporary directory."""

    def __init__(self, processes: int = 3, *, port: int | None = None,
                 read_timeout: str = "60s", args: tuple[str, ...] = (),
                 token: str | None = None, private_rooms: tuple[str, ...] = ()) -> None:
        self.token = token
        """Token mode: every process checks this one token."""
        self.user_secret = new_user_secret() if token else None
        """Every process signs and checks user tokens with this one secret, so a user token
        (:meth:`user_token`) is good on all of them."""
        rooms = [arg for room in private_rooms for arg in ("--private-room", room)]
        secret = ("--token", token, "--user-secret", self.user_secret) if token else ()
        args = (*args, *secret, *rooms)
        self.directory = Path(tempfile.mkdtemp(prefix="chatlib-cluster-"))
        self.redis = RedisProcess(self.directory / "redis")
        self.servers = [ChatProcess(self.redis.url, args=args) for _ in range(processes)]
        self.nginx = NginxProcess(self.directory / "nginx", [s.port for s in self.servers],
                                  port, read_timeout=read_timeout)

    @property
    def url(self) -> str:
        return self.nginx.url

    def user_token(self, user: str, rooms: tuple[str, ...] = ()) -> str:
        """A token for ``user`` only (its direct messages, and the private ``rooms``),
        accepted by every process (chatlib.auth.user_token)."""
        if not self.token:
            raise ValueError("user tokens need token mode: Cluster(token=...)")
        return user_token(self.user_secret, user, rooms)

    async def start(self) -> Cluster:
        try:
            await self.redis.start()
            await asyncio.gather(*(server.start() for server in self.servers))
            await self.nginx.start()
        except BaseException:
            await self.stop()
            raise
        return self

    async def rolling_restart(self, pause: float = NGINX_FAIL_TIMEOUT + 1) -> None:
        """Restart the chat processes one at a time, as a deploy does: SIGTERM, then the
        same command on the same port, then ``pause`` seconds before the next one.

        The pause must outlast nginx's ``fail_timeout``: nginx counts a process that refused
        a connection (while it restarted) as failed for that long, and stopping the next
        one meanwhile leaves it no live upstream (502 for everyone).

        On SIGTERM a process closes its push clients with 1012 and tells each its own delay
        (``chatlib serve --restart-spread``; default: its clients / its admit rate), so
        they come back spread out, through nginx, to whichever processes are up. The
        naive deploy, for comparison: ``Cluster(args=("--restart-spread", "0"))``.
        """
        for server in self.servers:
            await server.stop()
            await server.start()
            await asyncio.sleep(pause)

    async def stop(self) -> None:
        """nginx first (no new requests), then the chat processes, then Redis."""
        for part in [self.nginx, *self.servers, self.redis]:
            await part.stop()
        shutil.rmtree(self.directory, ignore_errors=True)

    async def __aenter__(self) -> Cluster:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


async def _main(args: argparse.Namespace) -> None:
    missing = missing_programs()
    if missing:
        sys.exit(f"needs {' and '.join(missing)}: sudo apt-get install redis-server nginx"
                 " (Debian/Ubuntu) or conda install -c conda-forge redis-server nginx")
    cluster = Cluster(args.processes, port=args.port)
    await cluster.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    restarts: set[asyncio.Task] = set()

    def rolling_restart() -> None:
        if not restarts:  # one at a time
            task = asyncio.ensure_future(cluster.rolling_restart())
            restarts.add(task)
            task.add_done_callback(restarts.discard)
            task.add_done_callback(lambda _: print("rolling restart done", flush=True))

    loop.add_signal_handler(signal.SIGHUP, rolling_restart)
    print(f"Redis on {cluster.redis.url}; chat processes on "
          + ", ".join(s.url for s in cluster.servers))
    print(f"The chat, through nginx: {cluster.url}  (Ctrl+C stops everything; "
          f"kill -HUP {os.getpid()}: a rolling restart)", flush=True)
    try:
        await stop.wait()
    finally:
        for task in restarts:
            task.cancel()
        print("stopping nginx, the chat processes and Redis ...", flush=True)
        await cluster.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m chatlib.cluster", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=3, help="chat processes (default 3)")
    parser.add_argument("--port", type=int, default=8080, help="nginx's port (default 8080)")
    asyncio.run(_main(parser.parse_args(argv)))


if __name__ == "__main__":
    main()
