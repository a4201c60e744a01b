"""The hub: bounded outboxes, fan-out, long-poll wake-ups and presence (no sockets)."""

from __future__ import annotations

import asyncio
import json

import pytest

from chatlib import Limits, MemoryLog, Message, wire
from chatlib import hub as hub_module
from chatlib.hub import Hub, Resume
from chatlib.outbox import Outbox
from chatlib.presence import Presence
from chatlib.wire import SSE, WEBSOCKET, SSEParser

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def hub_limits() -> Limits:
    # Presence broadcasts at once (coalescing is tested on its own below).
    return Limits(presence_interval=0)


@pytest.fixture
def hub(log, hub_limits) -> Hub:
    return Hub(log, hub_limits)


def ws_events(items):
    return [json.loads(payload) for _, payload in items]


def sse_fields(payload: str) -> dict:
    """One SSE event as wire.SSEParser reads it: {"event": ..., "id": ..., "data": ...}."""
    assert payload.endswith("\n\n"), payload
    [event] = SSEParser().feed(payload)
    return {"event": event.event, "id": event.last_event_id, "data": event.data}


def join(hub: Hub, encoding, user: str) -> Outbox:
    """A push client subscribed as the transports subscribe theirs."""
    return hub.subscribe(Outbox(encoding, user, hub.limits.max_queue))


async def drain(outbox: Outbox):
    """Everything already queued in ``outbox``, without waiting."""
    return await outbox.get(timeout=0)


# -- Outbox -----------------------------------------------------------------------------


async def test_outbox_keeps_order_and_gets_everything_queued():
    outbox = Outbox(WEBSOCKET, "ada", limit=10)
    for i in range(1, 6):
        outbox.put(i, f"p{i}")
    assert await outbox.get(timeout=1) == [(i, f"p{i}") for i in range(1, 6)]
    assert await outbox.get(timeout=0.01) == []  # empty now: times out with []
    assert not outbox.closed


async def test_outbox_get_waits_for_a_put():
    outbox = Outbox(SSE, "", limit=10)
    getter = asyncio.create_task(outbox.get(timeout=30))
    await asyncio.sleep(0)  # let the getter start waiting
    assert not getter.done()
    outbox.put(7, "seven")
    async with asyncio.timeout(5):
        assert await getter == [(7, "seven")]


async def test_outbox_overflow_closes_with_1013():
    outbox = Outbox(WEBSOCKET, "slow", limit=3)
    for i in range(1, 4):
        outbox.put(i, str(i))
    assert not outbox.closed
    outbox.put(4, "4")  # one more than the limit
    assert outbox.closed
    assert outbox.close_code == 1013
    async with asyncio.timeout(5):
        assert await outbox.get() == []  # a closed outbox answers at once
    outbox.put(5, "5")  # ignored once closed
    assert await outbox.get(timeout=0) == []
    outbox.close(1001)  # the first close code wins
    assert outbox.close_code == 1013


async def test_outbox_close_wakes_a_waiting_getter():
    outbox = Outbox(WEBSOCKET, "ada", limit=3)
    getter = asyncio.create_task(outbox.get())
    await asyncio.sleep(0)
    outbox.close(1001)
    async with asyncio.timeout(5):
        assert await getter == []
    assert outbox.close_code == 1001


# -- fan-out ----------------------------------------------------------------------------


async def test_publish_reaches_every_push_client(hub):
    ws = [join(hub, WEBSOCKET, f"w{i}") for i in range(3)]
    sse = [join(hub, SSE, f"s{i}") for i in range(2)] + [join(hub, SSE, "")]
    for outbox in ws + sse:
        await drain(outbox)  # presence notices
    message, _ = await hub.post("ada", "hello")
    assert isinstance(message, Message)
    for outbox in ws:
        assert ws_events(await drain(outbox)) == [{"type": "message", **message.to_dict()}]
    for outbox in sse:
        [(message_id, payload)] = await drain(outbox)
        assert message_id == message.id
        fields = sse_fields(payload)
        assert fields["id"] == str(message.id)
        assert fields["event"] == "message"
        assert json.loads(fields["data"]) == message.to_dict()


async def test_publish_encodes_once_per_transport(hub, monkeypatch):
    calls = []
    original = Message.to_dict
    monkeypatch.setattr(Message, "to_dict", lambda self: calls.append(self.id) or original(self))
    ws = [join(hub, WEBSOCKET, "") for _ in range(20)]
    sse = [join(hub, SSE, "") for _ in range(20)]
    message, _ = await hub.post("ada", "once")
    calls_for_message = calls.count(message.id)
    assert 1 <= calls_for_message <= 2  # once per transport at most, not once per client
    ws_payloads = [(await drain(o))[0][1] for o in ws]
    sse_payloads = [(await drain(o))[0][1] for o in sse]
    assert all(p is ws_payloads[0] for p in ws_payloads)  # the very same encoded object
    assert all(p is sse_payloads[0] for p in sse_payloads)


async def test_slow_outbox_is_closed_and_others_get_everything():
    hub = Hub(MemoryLog(), Limits(max_queue=5))
    slow = join(hub, WEBSOCKET, "slow")
    fast = join(hub, WEBSOCKET, "fast")
    sse = join(hub, SSE, "reader")
    received = {"fast": [], "sse": []}
    for i in range(20):
        await hub.post("ada", str(i))
        for name, outbox in (("fast", fast), ("sse", sse)):
            received[name] += [mid for mid, _ in await drain(outbox) if mid]
    assert slow.closed and slow.close_code == 1013
    assert not fast.closed and not sse.closed
    assert received["fast"] == received["sse"] == list(range(1, 21))
    # The slow client can resume from the log after the last id it got.
    assert [m.text for m in await hub.log.after(3)] == [str(i) for i in range(3, 20)]


# -- direct writes (Outbox.sink) ---------------------------------------------------------


class FakeConnection:
    """A push client's connection as the hub sees it: ``sink`` writes at once while
    ``writable`` (flow control), the writer's writes wait for ``gate`` (a slow socket).
    ``wire`` is what the client receives, in order; ``direct`` the payloads the sink wrote.
    With ``wake`` its writer ends while idle and the outbox starts another for a backlog
    (``on_backlog``, as chatlib.ws.Writer); ``started`` counts those."""

    def __init__(self, hub: Hub, outbox: Outbox, cursor: int = 0, wake: bool = False) -> None:
        self.outbox, self.wire, self.direct = outbox, [], []
        self.writable = True
        self.gate = asyncio.Event()
        self.gate.set()
        self.in_flight: list[str] = []
        self.writes = 0  # sink calls
        self.started = 0
        outbox.sink = self.sink
        self.writer = asyncio.create_task(self.write(
            outbox.stream(hub, Resume(cursor), wake=self.wake if wake else None)))

    def wake(self) -> None:
        assert self.writer.done(), "two writers at once"
        self.started += 1
        self.writer = asyncio.create_task(self.write(self.outbox.backlog(self.wake)))

    def sink(self, payloads: tuple[str, ...]) -> bool:
        if not self.writable:
            return False
        self.direct += payloads
        self.wire += payloads
        self.writes += 1
        return True

    async def write(self, batches) -> None:
        async for batch in batches:
            self.in_flight = list(batch)
            await self.gate.wait()
            self.wire += batch
            self.in_flight = []

    def texts(self) -> list[str]:
        return [json.loads(p).get("text") for p in self.wire if '"message"' in p]


async def until(predicate) -> None:
    """Let the writer task run until ``predicate()`` holds (bounded: 5 s)."""
    async with asyncio.timeout(5):
        while not predicate():
            await asyncio.sleep(0.001)


async def idle(*clients: FakeConnection) -> None:
    """Until every writer is asleep in Outbox.get (its sink armed: nothing in flight)."""
    await until(lambda: all(c.outbox.direct is not None and not c.outbox.queued
                            for c in clients))


@pytest.mark.parametrize("wake", [False, True], ids=["writer-sleeps", "writer-ends"])
async def test_direct_writes_happen_only_while_the_writer_is_idle_and_keep_order(log, wake):
    hub = Hub(log, Limits(presence_interval=0, max_queue=100))
    client = FakeConnection(hub, join(hub, WEBSOCKET, ""), wake=wake)
    await idle(client)
    await hub.post("ada", "1")  # idle writer, writable: written at once, no wake-up
    assert client.texts() == ["1"] and len(client.direct) == 1
    client.writable = False  # flow control: the transport's buffer is full
    client.gate.clear()  # ... and the writer's send will wait
    await hub.post("ada", "2")
    assert client.texts() == ["1"]  # queued, not written
    await until(lambda: client.in_flight)
    assert [json.loads(p)["text"] for p in client.in_flight] == ["2"]  # the writer has it
    client.writable = True  # writable again while "2" is still in flight:
    await hub.post("ada", "3")  # must not overtake it
    await hub.post("ada", "4")
    assert client.texts() == ["1"], "a direct write overtook a frame in flight"
    assert len(client.direct) == 1
    client.gate.set()
    await idle(client)
    assert client.texts() == ["1", "2", "3", "4"]  # the writer sent the backlog, in order
    await hub.post("ada", "5")  # idle again: direct again
    assert client.texts() == ["1", "2", "3", "4", "5"]
    assert [json.loads(p)["text"] for p in client.direct] == ["1", "5"]
    if wake:  # one writer for the history, one for the backlog "2" began; none now
        await until(lambda: client.writer.done())
        assert client.started == 1 and client.outbox.on_backlog is not None
    client.writer.cancel()


async def test_an_ended_writer_is_started_again_for_a_backlog_and_for_a_close(log):
    hub = Hub(log, Limits(presence_interval=0, max_queue=100))
    client = FakeConnection(hub, join(hub, WEBSOCKET, ""), wake=True)
    await idle(client)
    await until(lambda: client.writer.done())  # history sent, nothing queued: it ended
    await hub.post("ada", "1")
    assert client.started == 0 and client.texts() == ["1"]  # written directly: no task
    client.writable = False  # flow control: "2" is queued, and a writer started for it
    client.gate.clear()  # ... whose write waits
    await hub.post("ada", "2")
    await until(lambda: client.in_flight)
    await hub.post("ada", "3")  # queued behind it: no second writer
    assert client.started == 1 and client.texts() == ["1"]
    client.writable = True
    client.gate.set()
    await until(lambda: client.writer.done())
    assert client.texts() == ["1", "2", "3"] and client.outbox.on_backlog is not None
    client.outbox.close(1013)
    assert client.started == 2 and client.outbox.on_backlog is None  # it sees the close
    await until(lambda: client.writer.done())
    client.outbox.put(0, "late")  # closed: nothing queued, no writer
    assert client.started == 2 and client.outbox.queued == 0


@pytest.mark.parametrize("wake", [False, True], ids=["writer-sleeps", "writer-ends"])
async def test_direct_writes_never_repeat_what_the_history_sent(log, wake):
    hub = Hub(log, Limits(presence_interval=0))
    await hub.start()
    outbox = join(hub, WEBSOCKET, "")
    # Appended but not yet fanned out when the history is read (a post in progress, or
    # another process's message): the history sends it, the fan-out must not send it again.
    await log.append("ada", "in the log first")
    client = FakeConnection(hub, outbox, wake=wake)
    await idle(client)
    assert client.texts() == ["in the log first"]
    await hub.catch_up()  # now the hub fans it out: queued, for the writer to skip
    await idle(client)
    assert client.texts() == ["in the log first"]
    await hub.post("ada", "after")
    assert client.texts() == ["in the log first", "after"]
    assert [json.loads(p)["text"] for p in client.direct] == ["after"]
    client.writer.cancel()


@pytest.mark.parametrize("wake", [False, True], ids=["writer-sleeps", "writer-ends"])
async def test_a_client_that_cannot_take_writes_still_overflows_with_1013(log, wake):
    hub = Hub(log, Limits(presence_interval=0, max_queue=5))
    stuck = FakeConnection(hub, join(hub, WEBSOCKET, ""), wake=wake)
    fine = FakeConnection(hub, join(hub, WEBSOCKET, ""), wake=wake)
    await idle(stuck, fine)
    stuck.writable = False
    stuck.gate.clear()
    for i in range(10):
        await hub.post("ada", str(i))
        await asyncio.sleep(0)  # the stuck writer may take what it can (and block)
    assert stuck.outbox.closed and stuck.outbox.close_code == 1013
    assert fine.texts() == [str(i) for i in range(10)]  # all written at once, in order
    assert len(fine.direct) == len(fine.wire)
    assert not fine.outbox.closed
    fine.writer.cancel()
    stuck.writer.cancel()


async def test_an_ack_never_overtakes_its_message_in_a_sliced_fan_out(monkeypatch):
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 1)  # one client per loop step
    hub = Hub(MemoryLog(), Limits(presence_interval=0))
    await hub.start()
    room = [join(hub, WEBSOCKET, "") for _ in range(5)]
    message, _ = await hub.post("ada", "hi")  # only the first slice has gone out yet
    for outbox in room:  # as if each had sent it (ws.handle_frame acks with hub.tell)
        hub.tell(outbox, wire.ws_event("ack", message.to_dict()))
    await until(lambda: not hub.fanning_out)
    for outbox in room:
        assert [json.loads(p)["type"] for _, p in await drain(outbox)] == ["message", "ack"]
    hub.close()


@pytest.mark.parametrize("wake", [False, True], ids=["writer-sleeps", "writer-ends"])
async def test_a_burst_to_a_sliced_room_goes_out_client_by_client(monkeypatch, wake):
    """Messages published while a sliced fan-out is still going out go out together
    (as one batch): each idle client gets them in one write, in order; a stuck client
    still overflows (1013) without holding the others; an ack still comes after them."""
    monkeypatch.setattr(hub_module, "FANOUT_SLICE", 3)
    hub = Hub(MemoryLog(), Limits(presence_interval=0, max_queue=3))
    await hub.start()
    room = [FakeConnection(hub, join(hub, WEBSOCKET, ""), wake=wake) for _ in range(10)]
    await idle(*room)
    stuck = room[4]
    stuck.writable = False
    stuck.gate.clear()
    for i in range(6):  # one loop step: "0" starts going out (one slice), 1-5 wait for it
        await hub.post("ada", str(i))
    hub.tell(room[0].outbox, wire.ws_event("ack", {"id": 6}))
    await until(lambda: not hub.fanning_out)
    for client in room:
        if client is not stuck:
            assert client.texts() == [str(i) for i in range(6)]
            assert client.writes == 2 + (client is room[0])  # "0", then 1-5 (then the ack)
    assert json.loads(room[0].wire[-1])["type"] == "ack"
    assert stuck.outbox.closed and stuck.outbox.close_code == 1013
    for client in room:
        client.writer.cancel()
    hub.close()


async def test_typing_is_broadcast_to_both_push_transports(hub):
    ws = join(hub, WEBSOCKET, "")
    sse = join(hub, SSE, "")
    hub.typing("ada")
    assert ws_events(await drain(ws)) == [{"type": "typing", "user": "ada"}]
    [(message_id, payload)] = await drain(sse)
    assert message_id == 0
    fields = sse_fields(payload)
    assert fields["event"] == "typing"
    assert json.loads(fields["data"]) == {"user": "ada"}


async def test_typing_is_not_stored(hub):
    hub.typing("ada")
    assert await hub.log.last_id() == 0


# -- long polling -----------------------------------------------------------------------


async def messages_after(hub, after, timeout=0):
    """A long poll's messages (Hub.poll's answer)."""
    return (await hub.poll(after, timeout)).messages


async def test_a_poll_answers_at_once_when_messages_exist(hub):
    first, _ = await hub.post("ada", "one")
    second, _ = await hub.post("bob", "two")
    async with asyncio.timeout(5):  # would hang for 60 s if it waited
        assert await messages_after(hub, 0, timeout=60) == [first, second]
        assert await hub.poll(first.id, timeout=60) == (Resume(first.id), [second], second.id)


async def test_a_long_poll_waits_for_the_next_post(hub):
    await hub.post("ada", "old")
    waiter = asyncio.create_task(hub.poll(1, timeout=60))
    for _ in range(5):
        await asyncio.sleep(0)
    assert not waiter.done()
    message, _ = await hub.post("bob", "new")
    async with asyncio.timeout(5):
        assert await waiter == (Resume(1), [message], message.id)


async def test_a_long_poll_times_out_with_nothing(hub):
    await hub.post("ada", "old")
    async with asyncio.timeout(10):
        assert await hub.poll(1, timeout=0.2) == (Resume(1), [], 1)
        assert await hub.poll(1, timeout=0) == (Resume(1), [], 1)


async def test_a_long_poll_ends_when_the_hub_closes(hub):
    waiter = asyncio.create_task(hub.poll(0, timeout=60))
    await asyncio.sleep(0)
    hub.close()
    async with asyncio.timeout(5):
        assert await messages_after(hub, 0) == []
        assert (await waiter).messages == []
    async with asyncio.timeout(5):  # and a new long poll does not wait at all
        assert await messages_after(hub, 0, timeout=60) == []


class CountingLog(MemoryLog):
    """A MemoryLog that records which task read it, and how."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[tuple[asyncio.Task, str]] = []

    def _read(self, how: str) -> None:
        self.reads.append((asyncio.current_task(), how))

    def reads_by(self, task) -> list[str]:
        return [how for reader, how in self.reads if reader is task]

    async def page(self, after_id, limit):
        self._read("page")
        return await super().page(after_id, limit)

    async def after(self, after_id, limit=1000):
        self._read("after")
        return await super().after(after_id, limit)

    async def first_id(self):
        self._read("first_id")
        return await super().first_id()

    async def last_id(self):
        self._read("last_id")
        return await super().last_id()


async def test_a_long_poll_reads_the_log_once_per_answer():
    """Its page and the log's bounds in one read; woken by a post, the messages that post
    published (it used to make four or five calls: last and first id, after, after again,
    last id)."""
    log = CountingLog()
    hub = Hub(log, Limits())
    await hub.start()
    await hub.post("ada", "old")
    async with asyncio.timeout(5):
        at_once = asyncio.create_task(hub.poll(0, timeout=60))
        assert (await at_once).messages[0].text == "old"
        waiter = asyncio.create_task(hub.poll(1, timeout=60))
        while not log.reads_by(waiter):  # bounded by the timeout
            await asyncio.sleep(0)
        await hub.post("bob", "new")
        assert (await waiter).messages[0].text == "new"
    assert log.reads_by(at_once) == ["page"]
    assert log.reads_by(waiter) == ["page"]
    hub.close()


class GatedLog:
    """A log whose first ``page()`` pauses after reading, so a post can slip in."""

    def __init__(self, inner) -> None:
        self.inner = inner
        self.read_done = asyncio.Event()
        self.gate = asyncio.Event()
        self.reads = 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    async def page(self, after_id, limit):
        result = await self.inner.page(after_id, limit)
        self.reads += 1
        if self.reads == 1:
            self.read_done.set()
            await self.gate.wait()
        return result


async def test_no_message_lost_when_a_post_races_a_long_poll(log):
    gated = GatedLog(log)
    hub = Hub(gated, Limits())
    waiter = asyncio.create_task(messages_after(hub, 0, timeout=60))
    async with asyncio.timeout(5):
        await gated.read_done.wait()  # the long poll read the (empty) log ...
        message, _ = await hub.post("ada", "in the gap")  # ... a post lands before it waits
        gated.gate.set()
        # It must not sleep through the post (60 s here, a hang guard of 5 s above).
        assert await waiter == [message]


async def test_many_long_polls_and_posts_interleaved_lose_nothing(hub):
    count = 30

    async def follower():
        cursor, got = 0, []
        while len(got) < count:
            page = await messages_after(hub, cursor, timeout=60)
            got += page
            cursor = page[-1].id if page else cursor
        return [m.text for m in got]

    async def poster():
        for i in range(count):
            await hub.post("ada", str(i))
            if i % 3 == 0:
                await asyncio.sleep(0)

    async with asyncio.timeout(20):
        results = await asyncio.gather(*(follower() for _ in range(5)), poster())
    for texts in results[:5]:
        assert texts == [str(i) for i in range(count)]


async def test_resolve_cursor(hub):
    assert await hub.resolve_cursor(0) == Resume(0)
    assert await hub.resolve_cursor(-3) == Resume(0)
    assert await hub.resolve_cursor(5) == Resume(0, reset=True)  # past the end of an empty log
    for i in range(3):
        await hub.post("ada", str(i))
    assert await hub.resolve_cursor(2) == Resume(2)
    assert await hub.resolve_cursor(3) == Resume(3)
    assert await hub.resolve_cursor(4) == Resume(0, reset=True)


# -- presence ---------------------------------------------------------------------------


async def test_presence_from_every_transport(hub):
    ws = join(hub, WEBSOCKET, "ada")
    sse = join(hub, SSE, "bob")
    reader = join(hub, SSE, "")  # an anonymous reader is not in the chat
    hub.presence.touch("carol")  # an HTTP (polling) user
    assert hub.presence.users() == ["ada", "bob", "carol"]
    hub.unsubscribe(ws)
    hub.unsubscribe(sse)
    hub.unsubscribe(reader)
    assert hub.presence.users() == ["carol"]
    hub.unsubscribe(ws)  # twice is harmless
    assert hub.presence.users() == ["carol"]


async def test_presence_counts_connections_per_user(hub):
    first = join(hub, WEBSOCKET, "ada")
    second = join(hub, SSE, "ada")
    assert hub.presence.users() == ["ada"]
    hub.unsubscribe(first)
    assert hub.presence.users() == ["ada"]  # still connected over SSE
    hub.unsubscribe(second)
    assert hub.presence.users() == []


async def test_presence_changes_are_broadcast_once(hub):
    watcher = join(hub, WEBSOCKET, "")
    sse_watcher = join(hub, SSE, "")
    ada = join(hub, WEBSOCKET, "ada")
    assert ws_events(await drain(watcher)) == [{"type": "presence", "users": ["ada"], "count": 1}]
    [(_, payload)] = await drain(sse_watcher)
    assert sse_fields(payload)["event"] == "presence"
    assert json.loads(sse_fields(payload)["data"]) == {"users": ["ada"], "count": 1}
    again = join(hub, SSE, "ada")  # same set of users: nothing to tell
    assert await drain(watcher) == []
    hub.presence.touch("bob")
    assert ws_events(await drain(watcher)) == [
        {"type": "presence", "users": ["ada", "bob"], "count": 2}]
    hub.presence.touch("bob")  # already present
    assert await drain(watcher) == []
    hub.unsubscribe(ada)
    assert await drain(watcher) == []  # ada is still connected over SSE
    hub.unsubscribe(again)
    assert ws_events(await drain(watcher)) == [{"type": "presence", "users": ["bob"], "count": 1}]


async def test_polling_users_expire_after_the_ttl():
    hub = Hub(MemoryLog(), Limits(presence_ttl=0.05, presence_interval=0))
    watcher = join(hub, WEBSOCKET, "")
    hub.presence.touch("carol")
    join(hub, WEBSOCKET, "ada")
    assert hub.presence.users() == ["ada", "carol"]
    await drain(watcher)
    async with asyncio.timeout(5):
        while "carol" in hub.presence.users():  # bounded by the timeout
            await asyncio.sleep(0.01)
    assert hub.presence.users() == ["ada"]  # push users never expire while connected
    hub.presence.changed()  # what the server's sweeper calls
    assert ws_events(await drain(watcher)) == [{"type": "presence", "users": ["ada"], "count": 1}]
    hub.presence.touch("carol")  # back again
    assert hub.presence.users() == ["ada", "carol"]


async def test_close_closes_every_outbox_with_1001(hub):
    outboxes = [join(hub, WEBSOCKET, "ada"), join(hub, SSE, "bob")]
    hub.close()
    assert hub.closing.is_set()
    for outbox in outboxes:
        assert outbox.closed and outbox.close_code == 1001


async def test_presence_broadcasts_are_coalesced_when_many_join_at_once():
    hub = Hub(MemoryLog(), Limits(presence_interval=0.2))
    watcher = join(hub, WEBSOCKET, "watcher")
    assert ws_events(await drain(watcher)) == [
        {"type": "presence", "users": ["watcher"], "count": 1}]
    joined = [join(hub, WEBSOCKET, f"user{i:03}") for i in range(300)]
    assert await drain(watcher) == []  # within the interval: told together, later
    async with asyncio.timeout(5):
        events = ws_events(await watcher.get())
    everyone = sorted(["watcher"] + [f"user{i:03}" for i in range(300)])
    # The first presence_names (100) of them, and how many there are.
    assert events == [{"type": "presence", "users": everyone[:100], "count": 301}]
    # Each newcomer got that one list, not up to 300 of them (301 clients: two fan-out
    # slices of hub.FANOUT_SLICE, the second on the next loop step).
    for _ in range(3):
        await asyncio.sleep(0)
    for outbox in joined:
        assert ws_events(await drain(outbox)) == events


async def test_a_second_tab_of_a_present_user_is_told_who_is_here(hub):
    first = join(hub, WEBSOCKET, "ada")
    assert ws_events(await drain(first)) == [{"type": "presence", "users": ["ada"], "count": 1}]
    second = join(hub, SSE, "ada")  # nobody new: no broadcast, yet it must know
    [(_, payload)] = await drain(second)
    assert json.loads(sse_fields(payload)["data"]) == {"users": ["ada"], "count": 1}
    assert await drain(first) == []


async def test_presence_broadcasts_space_out_in_proportion_with_many_listeners():
    loop = asyncio.get_running_loop()
    told: list[tuple[float, int]] = []  # (loop time, count) of each broadcast
    third = asyncio.Event()

    def broadcast(event: str, data: dict) -> None:
        told.append((loop.time(), data["count"]))
        if len(told) == 3:
            third.set()

    presence = Presence(Limits(presence_interval=0.05, presence_audience=2), broadcast)
    for k in range(8):  # told at once (1), then the other 7 together one interval later
        presence.connected(f"user{k}")
    assert presence.interval() == pytest.approx(0.05 * 8 / 2)
    async with asyncio.timeout(5):
        while len(told) < 2:  # bounded by the timeout
            await asyncio.sleep(0.01)
        presence.connected("user8")  # 9 listeners: 4.5 intervals after the last broadcast
        await third.wait()
    assert [count for _, count in told] == [1, 8, 9]
    assert told[2][0] - told[1][0] >= 0.05 * 9 / 2 - 0.01
    assert Presence(Limits(presence_interval=0.05, presence_audience=0), broadcast
                    ).interval() == 0.05
    capped = Presence(Limits(presence_interval=0.05, presence_audience=2,
                             presence_interval_max=0.1), broadcast)
    for k in range(100):
        capped.connected(f"user{k}")
    assert capped.interval() == 0.1  # not 2.5 s: a list that old is not one users trust
