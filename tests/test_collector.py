"""A closed WebSocket connection is freed by reference counting, with the cyclic GC off:
``python -m chatlib serve`` makes full collections rare (chatlib.collector), so nothing of
a connection may wait for one (chatlib.protocols breaks the cycles it would leave)."""

from __future__ import annotations

import asyncio
import gc
import json
import weakref

import pytest
from websockets.asyncio.client import connect as ws_connect

from chatlib import collector, protocols
from chatlib.outbox import Outbox
from chatlib.ws import Writer


def server_side(cls: type, port: int) -> list:
    """The live objects of ``cls`` that belong to the server's side of a connection."""
    found = []
    for obj in gc.get_objects():
        if isinstance(obj, cls):
            transport = getattr(obj, "transport", None)
            sockname = transport.get_extra_info("sockname") if transport is not None else None
            if sockname and sockname[1] == port:
                found.append(obj)
    return found


@pytest.mark.skipif(protocols.MISSING is not None, reason="uvicorn's own protocols in use")
async def test_a_closed_websocket_is_freed_without_the_cyclic_gc(server):
    gc.collect()
    gc.disable()  # from here on only reference counting frees anything
    try:
        async with ws_connect(server.ws_url) as ws:
            await ws.send(json.dumps({"type": "hello", "user": "ada"}))
            await ws.send(json.dumps({"type": "message", "text": "hi", "client_id": "c1"}))
            while json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] != "ack":
                pass  # bounded by the server: presence, the message, then the ack
            [protocol] = server_side(protocols.BoundedWebSocketProtocol, server.port)
            gone = {"protocol": weakref.ref(protocol), "transport": weakref.ref(
                protocol.transport), "websockets": weakref.ref(protocol.conn)}
            del protocol
        for _ in range(500):  # <= 5 s: until the server has let go of all three
            if all(ref() is None for ref in gone.values()):
                break
            await asyncio.sleep(0.01)
        assert {name: ref() is None for name, ref in gone.items()} == {
            "protocol": True, "transport": True, "websockets": True}
        # ... and chatlib's own: its outbox and writer (no weak references: by type)
        assert [type(obj).__name__ for obj in gc.get_objects()
                if isinstance(obj, (Outbox, Writer)) and getattr(obj, "user", "ada") == "ada"
                ] == []
    finally:
        gc.enable()


def test_settle_freezes_and_spaces_out_full_collections():
    before = gc.get_threshold()
    try:
        collector.settle()
        assert gc.get_freeze_count() > 0
        assert gc.get_threshold() == (before[0], before[1], collector.FULL_EVERY)
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
