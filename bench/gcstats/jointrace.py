"""Bench only: when each connection's handshake, hello and first history passed the server.

Imported by this directory's ``sitecustomize`` when ``CHATLIB_JOIN_TRACE`` names a file
(``bench/compare.py --transport join --join-trace``). It wraps asyncio's socket transport
(the server's only: this runs in the server's process) and keeps, per connection, in
``time.monotonic_ns()`` (the load's clock too, on one machine):

* ``port``: the client's port (the load keeps its own, ``join_storm.py --clients``);
* ``accept``: the transport made (the connection accepted by the event loop);
* ``w101``: its first write (the handshake's 101 response);
* ``hello``: its first read after that (the hello frame, read by the event loop);
* ``hist``: its first write that holds a ``message`` frame (the first history).

At exit one JSON list goes to that file. :func:`join_storm.split` reads it.
"""

import atexit
import json
import os
import time
from asyncio import selector_events

_out = os.environ["CHATLIB_JOIN_TRACE"]
_now = time.monotonic_ns
_seen: dict[int, dict] = {}  # id(transport) -> its times
_Transport = selector_events._SelectorSocketTransport
_init, _write, _read = _Transport.__init__, _Transport.write, _Transport._read_ready__data_received


def _made(self, *args, **kwargs) -> None:
    _init(self, *args, **kwargs)
    peer = self.get_extra_info("peername")
    _seen[id(self)] = {"port": peer[1] if peer else None, "accept": _now()}


def _wrote(self, data) -> None:
    times = _seen.get(id(self))
    if times is not None:
        if "w101" not in times:
            times["w101"] = _now()
        elif "hist" not in times and b'"type":"message"' in bytes(data[:200]):
            times["hist"] = _now()
    _write(self, data)


def _got(self) -> None:
    times = _seen.get(id(self))
    if times is not None and "w101" in times and "hello" not in times:
        times["hello"] = _now()
    _read(self)


_Transport.__init__, _Transport.write, _Transport._read_ready__data_received = (
    _made, _wrote, _got)


@atexit.register
def _dump() -> None:
    with open(_out, "w") as f:
        json.dump(list(_seen.values()), f)
