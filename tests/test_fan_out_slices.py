"""Big fan-outs go in slices (hub.FANOUT_SLICE clients per event-loop step), so that a
kernel's cells are not kept waiting behind 5,000 deliveries; order must not change.

Here the slice is 3 clients and the room 10, with clients joining and leaving between
slices: every client still gets every message once, in id order (no sockets)."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatlib import Limits, MemoryLog
from chatlib import hub as hub_module
from chatlib.hub import Hub
from chatlib.outbox import Outbox
from chatlib.wire import WEBSOCKET

pytestmark = pytest.mark.timeout(60)


def message_ids(items) -> list[int]:
    return [json.loads(p)["id"] for _, p in items if json.loads(p)["type"] == "message"]


async def test_sliced_fan_outs_keep_every_clients_order(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 3)
    hub = Hub(MemoryLog(), Limits(presence_interval=0))
    await hub.start()
    room = [hub.subscribe(Outbox(WEBSOCKET, "")) for _ in range(10)]  # readers: no presence frames
    first, _ = await hub.post("u0", "one")  # slice 1 now, slices 2-4 on later loop steps
    # Before the first fan-out is done, one more message, a client leaves, one joins.
    assert sum(bool(o.queued) for o in room) < 10, "sent in slices"
    second, _ = await hub.post("u1", "two")
    hub.unsubscribe(room[9])
    room[9].close(1000)
    late = hub.subscribe(Outbox(WEBSOCKET, ""))
    third, _ = await hub.post("u2", "three")
    for _ in range(50):  # bounded: the slices run on the next loop steps
        await asyncio.sleep(0)
    for outbox in room[:9]:
        assert message_ids(await outbox.get(timeout=0)) == [first.id, second.id, third.id]
    # The late client was not in the first two snapshots: it reads those from the log
    # (Outbox.stream), and is sent the third live.
    assert message_ids(await late.get(timeout=0)) == [third.id]
    hub.close()


async def test_small_fan_outs_are_sent_at_once(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 3)
    hub = Hub(MemoryLog(), Limits(presence_interval=0))
    await hub.start()
    room = [hub.subscribe(Outbox(WEBSOCKET, "u")) for _ in range(3)]
    message, _ = await hub.post("u", "hi")
    for outbox in room:  # no loop step needed
        assert message.id in message_ids(await outbox.get(timeout=0))
    hub.close()
