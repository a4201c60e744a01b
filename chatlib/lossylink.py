"""A real lossy link: two network namespaces joined by TUN devices and a relay in your loop.

:mod:`chatlib.netem` relays between two loopback TCP connections, so it cannot lose a TCP
segment: it *models* a loss by its effect. This module loses real IP packets, so the
kernel's own TCP (fast retransmit, RACK-TLP, the retransmission timeout) and any UDP
protocol (QUIC, with aioquic's recovery) recover from them as on a real network::

    async with lossylink.LossyLink(delay=0.05, loss=0.02, seed=1) as link:
        server = await link.spawn("b", sys.executable, "-m", "chatlib", "serve",
                                  "--host", link.b_host, "--port", "8765")
        with link.inside("a"):          # sockets created here live in namespace A
            reader, writer = await asyncio.open_connection(link.b_host, 8765)

The link (root only, Linux):

* two network namespaces, ``chatlib-lossy-<pid>-<n>-a`` and ``-b``, made by :meth:`start`
  and deleted by :meth:`stop` (and at exit, see below). Nothing outside them is touched:
  the host's interfaces, routes and sockets stay as they are;
* one TUN device in each, ``lossy0``, each namespace's only route to the other side. Side A
  is ``a_host`` (127.0.0.1), side B is ``b_host`` (127.0.0.2): loopback addresses, so that
  clients which bind 127.0.0.1 themselves (chatlib's WebTransport client does) and the
  server's Host/Origin checks work unchanged. Each namespace keeps only its own address on
  its ``lo`` and routes the other one through its TUN device (``route_localnet``);
* a relay in the caller's asyncio loop (``loop.add_reader`` on the two TUN descriptors): each
  IP packet read from one device is written to the other ``delay`` seconds later (plus a
  uniform ``jitter`` in ``[-jitter, +jitter]``), or dropped with probability ``loss``, or
  held ``reorder_gap`` seconds more with probability ``reorder``. Per packet and per
  direction, from one seeded random generator: a run is repeatable (given the same
  packets). Packets are at most the MTU (1500 bytes): a TUN device without a virtio header
  gets no segmentation offload, so a lost packet is one real segment or datagram.

Processes run inside a namespace with :meth:`spawn` (``ip netns exec``); sockets of this
process go into one with :meth:`inside`, which moves the *calling thread* into the namespace
until the block ends (sockets keep the namespace they were made in). The caller's own
sockets, made before, are not affected.

Cleanup: :meth:`stop` (or leaving ``async with``) kills what :meth:`spawn` started, stops the
relay, closes the TUN devices (they vanish with their descriptor) and deletes both
namespaces. An ``atexit`` hook does the same for links still up when the process exits, and
:meth:`start` deletes the namespaces left by links whose process was killed (SIGKILL skips
both): names ``chatlib-lossy-<pid>-...`` whose pid no longer runs.

The relay shares the caller's loop: a loop busy elsewhere (a long cell, a CPU-bound task)
holds packets longer than ``delay``, as it would hold any other callback.
:func:`available` says whether this machine can make a link (root, ``ip``, /dev/net/tun,
namespaces), and why not.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import fcntl
import functools
import itertools
import os
import random
import shutil
import struct
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass

__all__ = ["LinkStats", "LossyLink", "available"]

CLONE_NEWNET = 0x40000000
TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
DEVICE = "lossy0"
MTU = 1500
READ_BURST = 256
"""Packets read from one device per wake-up, at most (the rest wait for the next one)."""

SPAWN_KILL_TIMEOUT = 5.0
"""Seconds a spawned process gets to exit after SIGTERM, before SIGKILL."""

_counter = itertools.count()
_live: set[LossyLink] = set()
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass
class LinkStats:
    """Packets through the link since it started. ``ab`` is A -> B, ``ba`` is B -> A."""

    packets_ab: int = 0  # delivered
    packets_ba: int = 0
    dropped_ab: int = 0  # lost on purpose (``loss``)
    dropped_ba: int = 0
    reordered: int = 0  # held ``reorder_gap`` more, both directions
    bytes_ab: int = 0
    bytes_ba: int = 0

    @property
    def dropped(self) -> int:
        return self.dropped_ab + self.dropped_ba

    @property
    def packets(self) -> int:
        return self.packets_ab + self.packets_ba


def available() -> str | None:
    """None when a link can be made here, else the reason why not (for a skip message)."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "making network namespaces needs root"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    try:
        os.close(os.open("/dev/net/tun", os.O_RDWR))
    except OSError as exc:
        return f"/dev/net/tun cannot be opened ({exc.strerror})"
    if not os.path.exists("/proc/self/ns/net"):
        return "this kernel has no network namespaces"
    return _probe_namespace()


@functools.cache
def _probe_namespace() -> str | None:
    """Make and delete one namespace (root in a container may lack CAP_SYS_ADMIN)."""
    name = f"chatlib-lossy-{os.getpid()}-probe-a"  # a name _reap_stale() knows
    try:
        _ip("netns", "add", name)
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot make a network namespace: {exc}"
    with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
        _ip("netns", "del", name)
    return None


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"setns: {os.strerror(errno)}")


_inside = threading.local()  # .path: the namespace a thread is in, through _thread_in


@contextlib.contextmanager
def _thread_in(namespace_path: str) -> Iterator[None]:
    """Move the calling thread into the network namespace at ``namespace_path``, and back.

    Not re-entrant: blocks that overlap in one thread (two tasks of one loop, each in a
    block) would restore each other's namespace, so the second one raises RuntimeError.
    """
    if getattr(_inside, "path", None) is not None:
        raise RuntimeError(f"this thread is already inside {_inside.path}: blocks of "
                           "LossyLink.inside() must not overlap")
    home = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        target = os.open(namespace_path, os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        _inside.path = namespace_path
        try:
            yield
        finally:
            _inside.path = None
            _setns(home)
    finally:
        os.close(home)


def _run_in(namespace_path: str, action):
    """``action()``'s result, called in a new thread inside the namespace (so that the
    caller's thread never changes namespace); its exception is raised here."""
    result: list = []

    def run() -> None:
        try:
            with _thread_in(namespace_path):
                result.append((True, action()))
        except BaseException as exc:  # handed to the caller's thread
            result.append((False, exc))

    thread = threading.Thread(target=run, name="lossylink-setns")
    thread.start()
    thread.join(10)
    if not result:
        raise TimeoutError("a setup step in a namespace took more than 10 s")
    ok, value = result[0]
    if not ok:
        raise value
    return value


def _open_tun() -> int:
    """A TUN device named ``DEVICE`` in the calling thread's namespace; its descriptor
    (non-blocking). Not persistent: the device goes away when the descriptor is closed."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", DEVICE.encode(), IFF_TUN | IFF_NO_PI))
    except OSError:
        os.close(fd)
        raise
    return fd


def _sysctl(*settings: str) -> None:
    """Write ``name=value`` settings under /proc/sys/net (the calling thread's namespace)."""
    for setting in settings:
        name, value = setting.split("=")
        with open(f"/proc/sys/net/{name.replace('.', '/')}", "w") as file:
            file.write(value)


def _reap_stale() -> None:
    """Delete the namespaces of links whose process is gone (killed before its cleanup ran:
    SIGKILL, a kernel killed by Jupyter). Only names this module makes are touched."""
    with contextlib.suppress(OSError):
        for name in os.listdir("/run/netns"):
            parts = name.split("-")  # chatlib-lossy-PID-N-SIDE
            if len(parts) != 5 or parts[:2] != ["chatlib", "lossy"] or not parts[2].isdigit():
                continue
            pid = int(parts[2])
            if pid == os.getpid() or os.path.exists(f"/proc/{pid}"):
                continue
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ip("netns", "del", name)


def _ip(*args: str) -> None:
    """Run ``ip ARGS``; RuntimeError with its message if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


class LossyLink:
    """A point-to-point link with real packet loss between namespaces A and B.

    Args:
        delay: one-way delay in seconds, each direction (a round trip costs twice this).
        jitter: up to this many seconds more or less, uniformly at random, per packet
            (packets may then leave out of order, as on a real path with jitter).
        loss: probability (0 to 1) that a packet is dropped, each direction.
        reorder: probability (0 to 1) that a packet is held ``reorder_gap`` seconds more.
        reorder_gap: how long a reordered packet is held on top of its delay.
        seed: seed for the random numbers (jitter, loss, reordering).

    Settings are attributes, read per packet. Start with :meth:`start` or ``async with``;
    the relay runs in the loop that started it.
    """

    a_host = "127.0.0.1"
    """Side A's address, inside namespace A."""
    b_host = "127.0.0.2"
    """Side B's address, inside namespace B."""

    def __init__(self, *, delay: float = 0.0, jitter: float = 0.0, loss: float = 0.0,
                 reorder: float = 0.0, reorder_gap: float = 0.01,
                 seed: int | None = None) -> None:
        if delay < 0 or jitter < 0 or reorder_gap < 0:
            raise ValueError("delay, jitter and reorder_gap must be >= 0 seconds")
        for name, value in (("loss", loss), ("reorder", reorder)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a probability, from 0 to 1")
        self.delay, self.jitter, self.loss = delay, jitter, loss
        self.reorder, self.reorder_gap = reorder, reorder_gap
        self.stats = LinkStats()
        self._random = random.Random(seed)
        prefix = f"chatlib-lossy-{os.getpid()}-{next(_counter)}"
        self.namespaces = {"a": f"{prefix}-a", "b": f"{prefix}-b"}
        self._fds: dict[str, int] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pending: set[asyncio.TimerHandle] = set()
        self._processes: list[asyncio.subprocess.Process] = []

    def __repr__(self) -> str:
        state = "up" if self._fds else "down"
        return (f"<LossyLink {self.a_host} <-> {self.b_host} {state} "
                f"delay={self.delay * 1000:g} ms jitter={self.jitter * 1000:g} ms "
                f"loss={self.loss:g} reorder={self.reorder:g}>")

    def host(self, side: str) -> str:
        """The address of ``side`` ("a" or "b")."""
        return {"a": self.a_host, "b": self.b_host}[side]

    def namespace_path(self, side: str) -> str:
        return f"/run/netns/{self.namespaces[side]}"

    async def start(self) -> LossyLink:
        """Make the namespaces and devices and start relaying; RuntimeError if it cannot."""
        reason = available()
        if reason:
            raise RuntimeError(f"cannot make a lossy link: {reason}")
        self._loop = asyncio.get_running_loop()
        _reap_stale()
        _live.add(self)
        try:
            for side, other in (("a", "b"), ("b", "a")):
                name = self.namespaces[side]
                _ip("netns", "add", name)
                self._fds[side] = _run_in(self.namespace_path(side), _open_tun)
                self._configure(side, other)
            self._loop.add_reader(self._fds["a"], self._forward, "a", "b")
            self._loop.add_reader(self._fds["b"], self._forward, "b", "a")
        except BaseException:
            self._teardown()
            raise
        return self

    def _configure(self, side: str, other: str) -> None:
        """Addresses and routes in ``side``'s namespace (see the module's docstring)."""
        ns = self.namespaces[side]
        mine, theirs = self.host(side), self.host(other)
        # Loopback addresses may cross a real device, and come back on it.
        _run_in(self.namespace_path(side), lambda: _sysctl(*(
            f"ipv4.conf.{key}.{name}" for key in ("all", "default", "lo", DEVICE)
            for name in ("route_localnet=1", "rp_filter=0")),
            # No IPv6 on the link: nothing crosses it but what the caller sends.
            f"ipv6.conf.{DEVICE}.disable_ipv6=1"))
        _ip("-n", ns, "link", "set", "lo", "up")
        # lo owns all of 127.0.0.0/8 by default: keep only our own address local.
        _ip("-n", ns, "route", "del", "local", "127.0.0.0/8", "dev", "lo", "table", "local")
        _ip("-n", ns, "addr", "del", "127.0.0.1/8", "dev", "lo")
        _ip("-n", ns, "addr", "add", f"{mine}/32", "dev", "lo")
        _ip("-n", ns, "link", "set", DEVICE, "mtu", str(MTU), "up")
        _ip("-n", ns, "route", "add", f"{theirs}/32", "dev", DEVICE, "src", mine)

    def _forward(self, source: str, target: str) -> None:
        """Read what ``source``'s device has (bounded), schedule each packet to ``target``."""
        fd = self._fds.get(source)
        if fd is None:
            return
        ab = source == "a"
        for _ in range(READ_BURST):
            try:
                packet = os.read(fd, 65536)
            except BlockingIOError:
                return
            except OSError:
                return  # the device is going away (stop)
            self._schedule(packet, target, ab)

    def _schedule(self, packet: bytes, target: str, ab: bool) -> None:
        stats, rnd = self.stats, self._random
        if self.loss and rnd.random() < self.loss:
            if ab:
                stats.dropped_ab += 1
            else:
                stats.dropped_ba += 1
            return
        wait = self.delay
        if self.jitter:
            wait = max(0.0, wait + rnd.uniform(-self.jitter, self.jitter))
        if self.reorder and rnd.random() < self.reorder:
            wait += self.reorder_gap
            stats.reordered += 1
        if wait <= 0:
            self._deliver(packet, target, ab)
            return
        loop = self._loop

        def fire() -> None:
            self._pending.discard(handle)
            self._deliver(packet, target, ab)
        handle = loop.call_at(loop.time() + wait, fire)
        self._pending.add(handle)

    def _deliver(self, packet: bytes, target: str, ab: bool) -> None:
        fd = self._fds.get(target)
        if fd is None:
            return
        try:
            os.write(fd, packet)
        except OSError:
            return  # the kernel refused it (device down, queue full): lost, as on a wire
        if ab:
            self.stats.packets_ab += 1
            self.stats.bytes_ab += len(packet)
        else:
            self.stats.packets_ba += 1
            self.stats.bytes_ba += len(packet)

    @contextlib.contextmanager
    def inside(self, side: str) -> Iterator[None]:
        """Run the block with the calling thread in ``side``'s namespace.

        Sockets created in the block (``asyncio.open_connection``, a client's ``connect``)
        belong to that namespace for their whole life. Other tasks of the loop that run while
        the block awaits create theirs there too: keep the block to the connects.
        """
        if not self._fds:
            raise RuntimeError("the link is not up: start() it first")
        with _thread_in(self.namespace_path(side)):
            yield

    def command(self, side: str, *args: str) -> list[str]:
        """``args`` as a command line that runs inside ``side``'s namespace."""
        return ["ip", "netns", "exec", self.namespaces[side], *args]

    async def spawn(self, side: str, *args: str, **options) -> asyncio.subprocess.Process:
        """Start ``args`` inside ``side``'s namespace (``asyncio.create_subprocess_exec``
        options pass through). :meth:`stop` terminates it if it is still running."""
        if not self._fds:
            raise RuntimeError("the link is not up: start() it first")
        process = await asyncio.create_subprocess_exec(*self.command(side, *args), **options)
        self._processes.append(process)
        return process

    async def stop(self) -> None:
        """Terminate spawned processes, drop what is in flight, delete devices and namespaces."""
        for process in self._processes:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
                try:
                    await asyncio.wait_for(process.wait(), SPAWN_KILL_TIMEOUT)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        process.kill()
                    await asyncio.wait_for(process.wait(), SPAWN_KILL_TIMEOUT)
        self._processes.clear()
        self._teardown()

    def _teardown(self) -> None:
        """Synchronous and idempotent: what :meth:`stop` and the atexit hook share."""
        for handle in self._pending:
            handle.cancel()
        self._pending.clear()
        for process in self._processes:  # only left here on the atexit path
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
        for side, fd in list(self._fds.items()):
            if self._loop is not None and not self._loop.is_closed():
                with contextlib.suppress(Exception):
                    self._loop.remove_reader(fd)
            os.close(fd)
            del self._fds[side]
        for name in self.namespaces.values():
            if os.path.exists(f"/run/netns/{name}"):
                with contextlib.suppress(RuntimeError, OSError, subprocess.TimeoutExpired):
                    _ip("netns", "del", name)
        _live.discard(self)

    async def __aenter__(self) -> LossyLink:
        return await self.start()

    async def __aexit__(self, *exc) -> None:
        await self.stop()


@atexit.register
def _cleanup() -> None:
    for link in list(_live):
        link._teardown()
