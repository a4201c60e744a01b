"""Network namespaces joined by veth pairs: peers that vanish without a FIN (issue 20).

:class:`Topology` makes one namespace for the server and one per client, each client's
joined to the server's by its own veth pair (``10.231.K.1`` on the server's side,
``10.231.K.2`` on the client's; the server binds ``10.231.0.1``, which every client
reaches through its own link). Taking a client's end of its link down (:meth:`cut`)
drops every packet between them: the server sees silence, not a close, as when a laptop
closes its lid or a phone leaves the network. Nothing outside the namespaces made here is
touched: no host interface, route or address.

Needs root (or CAP_NET_ADMIN / CAP_SYS_ADMIN) and ``ip`` (iproute2); :func:`unavailable`
says why not, for a skip. Cleanup (:meth:`Topology.remove`) deletes every veth and
namespace made, and is safe to call after a partial setup.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading

CLONE_NEWNET = 0x40000000
SERVER = "10.231.0.1"
"""The address the server binds, on its side of the first client's link."""


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10,
                          check=check)


def unavailable() -> str | None:
    """Why namespaces cannot be made here (a skip reason), or None if they can."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2): `apt-get install iproute2`"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    name = f"chatlib-probe-{os.getpid()}"
    try:
        made = _ip("netns", "add", name, check=False)
        if made.returncode != 0:
            return f"cannot create a network namespace: {made.stderr.strip()}"
    finally:
        _ip("netns", "delete", name, check=False)
    return None


class Topology:
    """A server namespace and ``clients`` client namespaces, one veth pair each."""

    def __init__(self, clients: int) -> None:
        tag = f"{os.getpid() % 100000}"
        self.server = f"chatlib-srv-{tag}"
        self.clients = [f"chatlib-cli{k}-{tag}" for k in range(clients)]
        self._links = [(f"vs{k}x{tag}", f"vc{k}x{tag}") for k in range(clients)]
        self._made: list[str] = []  # namespaces, for remove()

    def create(self) -> None:
        for ns in (self.server, *self.clients):
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        for k, (ns, (here, there)) in enumerate(zip(self.clients, self._links, strict=True)):
            # Made inside the server's namespace, the pair never appears in the host's.
            _ip("-n", self.server, "link", "add", here, "type", "veth", "peer", "name", there,
                "netns", ns)
            _ip("-n", self.server, "addr", "add", f"10.231.{k}.1/24", "dev", here)
            _ip("-n", ns, "addr", "add", f"10.231.{k}.2/24", "dev", there)
            _ip("-n", self.server, "link", "set", here, "up")
            _ip("-n", ns, "link", "set", there, "up")
            _ip("-n", ns, "route", "add", "default", "via", f"10.231.{k}.1")

    def client_address(self, k: int) -> str:
        return f"10.231.{k}.2"

    def run_in(self, ns: str, argv: list[str]) -> list[str]:
        """``argv`` run inside namespace ``ns`` (``ip netns exec`` execs it: same pid)."""
        return ["ip", "netns", "exec", ns, *argv]

    def cut(self, k: int) -> None:
        """Take client ``k``'s end of its link down: from now on nothing gets through."""
        _ip("-n", self.clients[k], "link", "set", self._links[k][1], "down")

    def socket_in(self, ns: str, address: tuple[str, int]) -> socket.socket:
        """A TCP socket made inside namespace ``ns`` and connected to ``address``
        (non-blocking, for asyncio). A socket stays in the namespace it was made in; only
        a helper thread enters ``ns``, never this process's own threads."""
        made: list = []

        def enter_and_connect() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                with open(f"/run/netns/{ns}") as handle:
                    if libc.setns(handle.fileno(), CLONE_NEWNET) != 0:
                        raise OSError(ctypes.get_errno(), f"setns into {ns}")
                sock = socket.create_connection(address, timeout=10)
                sock.setblocking(False)
                made.append(sock)
            except BaseException as exc:  # handed to the caller
                made.append(exc)

        thread = threading.Thread(target=enter_and_connect)
        thread.start()
        thread.join(20)
        if not made:
            raise TimeoutError(f"no connection to {address} from {ns}")
        if isinstance(made[0], BaseException):
            raise made[0]
        return made[0]

    def remove(self) -> None:
        """Delete every namespace made (their veth ends go with them). Processes still in
        a namespace keep it alive: stop them first."""
        for ns in reversed(self._made):
            with contextlib.suppress(subprocess.SubprocessError, OSError):
                _ip("netns", "delete", ns, check=False)
        self._made.clear()
