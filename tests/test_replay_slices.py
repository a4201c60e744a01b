"""A client's replay (Hub.history with its address) goes out in slices of
limits.REPLAY_SLICE messages, the event loop running between two, and each slice waits for
the live fan-outs going out then (at most limits.LIVE_FIRST_STEPS loop steps): in a
reconnect storm, a live message waits behind one slice, not behind a page of every client
being replayed (bench/README.md, "Reconnect storm"). The hub's own catch-up reads whole
pages. No sockets."""

from __future__ import annotations

import asyncio

import pytest

from chatlib import Limits, MemoryLog
from chatlib import hub as hub_module
from chatlib.hub import Hub
from chatlib.limits import REPLAY_SLICE
from chatlib.outbox import Outbox
from chatlib.wire import WEBSOCKET

pytestmark = pytest.mark.timeout(60)

CLIENT = "127.0.0.1"


async def filled_hub(messages: int) -> Hub:
    log = MemoryLog()
    for k in range(messages):
        await log.append("u", f"m{k}")
    hub = Hub(log, Limits(history=500, presence_interval=0, replay_rate=1e6,
                          replay_burst=10**6))
    await hub.start()
    return hub


async def test_a_replay_comes_in_slices_with_the_loop_running_between():
    hub = await filled_hub(2 * REPLAY_SLICE + REPLAY_SLICE // 2)
    loop = asyncio.get_running_loop()
    steps = []  # for each slice after the first: did the loop run since the one before?
    ran = [False]
    sizes = []
    async for page in hub.history(0, CLIENT):
        if sizes:
            steps.append(ran[0])
        sizes.append(len(page))
        ran[0] = False
        loop.call_soon(ran.__setitem__, 0, True)
    assert sizes == [REPLAY_SLICE, REPLAY_SLICE, REPLAY_SLICE // 2]
    assert all(steps)
    hub.close()


async def test_the_hubs_own_catch_up_reads_whole_pages():
    hub = await filled_hub(2 * REPLAY_SLICE + REPLAY_SLICE // 2)
    assert [len(page) async for page in hub.history(0)] == [2 * REPLAY_SLICE + REPLAY_SLICE // 2]
    hub.close()


async def test_a_replay_waits_for_the_live_fan_out_going_out(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 3)
    hub = await filled_hub(10)
    room = [hub.subscribe(Outbox(WEBSOCKET, "")) for _ in range(12)]  # 4 slices
    live, _ = await hub.post("u", "live")
    assert hub.fanning_out
    replay = hub.history(0, CLIENT)
    first = await anext(replay)
    assert [m.id for m in first] == list(range(1, 12))
    assert not hub.fanning_out, "the replay's slice went before the live message"
    assert all(outbox.queued for outbox in room)
    await replay.aclose()
    hub.close()


async def test_a_replay_waits_a_bounded_number_of_loop_steps(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)
    monkeypatch.setattr(hub_module, "LIVE_FIRST_STEPS", 2)
    hub = await filled_hub(10)
    for _ in range(12):
        hub.subscribe(Outbox(WEBSOCKET, ""))
    await hub.post("u", "live")  # 12 loop steps to go out
    replay = hub.history(0, CLIENT)
    await anext(replay)
    assert hub.fanning_out, "a busy room does not hold a replay back for ever"
    await replay.aclose()
    hub.close()


async def test_a_replay_does_not_wait_for_events_going_out(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 3)
    hub = await filled_hub(10)
    for _ in range(12):
        hub.subscribe(Outbox(WEBSOCKET, ""))
    hub.typing("someone")  # an event to all 12: 4 slices, no message among them
    assert hub.fanning_out
    replay = hub.history(0, CLIENT)
    await anext(replay)
    assert hub.fanning_out, "the replay waited for an event that is not a message"
    await replay.aclose()
    hub.close()


async def test_a_replays_first_slice_comes_in_the_same_step_when_nothing_is_live():
    hub = await filled_hub(2 * REPLAY_SLICE)
    ran = []
    asyncio.get_running_loop().call_soon(ran.append, True)
    replay = hub.history(0, CLIENT)
    first = await anext(replay)
    assert len(first) == REPLAY_SLICE
    assert not ran, "the first slice waited for a loop step with nothing to let go first"
    await anext(replay)
    assert ran, "the next slice lets the loop run"
    await replay.aclose()
    hub.close()
