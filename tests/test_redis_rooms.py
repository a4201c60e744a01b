"""Rooms on Redis (issue 23): a stream per room, per-room ids, retention, dedupe and room
bound, one multiplexed follower per process, presence and typing per room on the bus.

Several RedisLogs in one test process stand for several server processes (each has its own
connections); tests/test_cluster_rooms.py runs real processes behind nginx.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis_fixtures import until

from chatlib.store import DEFAULT_ROOM, Message
from chatlib.validation import ChatError

pytestmark = pytest.mark.timeout(90)
T = 15.0


async def next_page(pages, timeout: float = T) -> list[Message]:
    async with asyncio.timeout(timeout):
        return await anext(pages)


@contextlib.asynccontextmanager
async def admin(redis_server):
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


async def stop(tasks: list[asyncio.Task], buses: list) -> None:
    """Cancel the buses' runs, then close the buses (they leave)."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for bus in buses:
        await bus.close()


async def test_each_room_is_a_stream_with_its_own_ids(make_log, redis_server):
    log, other = make_log(), make_log()  # two processes
    lab = log.room("lab-1")
    assert log.room(DEFAULT_ROOM) is log and lab.room(DEFAULT_ROOM) is log
    assert lab.room("lab-2") is log.room("lab-2") and log.room("lab-1") is lab
    assert (lab.name, log.name) == ("lab-1", DEFAULT_ROOM)
    await log.append("ada", "in the lobby")
    for i in range(3):
        message, _ = await other.room("lab-1").append("bob", f"lab {i}")
        assert (message.id, message.room) == (i + 1, "lab-1")
    await other.room("lab-2").append("cy", "lab two")
    assert [(m.id, m.text, m.room) for m in await lab.after(0)] == [
        (1, "lab 0", "lab-1"), (2, "lab 1", "lab-1"), (3, "lab 2", "lab-1")]
    assert [m.text for m in await log.after(0)] == ["in the lobby"]
    assert (await lab.last_id(), await log.last_id(), await log.room("lab-3").last_id()) \
        == (3, 1, 0)
    page = await lab.page(1, 1)
    assert ([m.text for m in page.messages], page.first_id, page.last_id) == (["lab 1"], 1, 3)
    assert [m.text for m in await lab.before(3, 5)] == ["lab 0", "lab 1"]
    assert await log.rooms() == {DEFAULT_ROOM: 1, "lab-1": 3, "lab-2": 1}
    # The default room keeps the keys it had before rooms: existing data is its log.
    async with admin(redis_server) as redis:
        assert await redis.xlen("chat:messages") == 1
        assert await redis.xlen("chat:room:lab-1:messages") == 3
        assert await redis.get("chat:room:lab-1:last_id") == "3"


async def test_retention_and_dedupe_are_per_room(make_log):
    log = make_log(max_len=10)
    busy, quiet = log.room("busy"), log.room("quiet")
    await quiet.append("ada", "keep me", client_id="c-1")
    for i in range(50):
        await busy.append("bob", str(i))
    kept = await busy.after(0, 100)
    assert 9 <= len(kept) <= 10 and kept[-1].id == 50
    assert await busy.first_id() == kept[0].id
    assert [m.text for m in await quiet.after(0)] == ["keep me"]  # not trimmed by busy's
    # The same (user, client_id) in another room is another message; in its room, a repeat.
    again, repeat = await quiet.append("ada", "keep me", client_id="c-1")
    elsewhere, repeat_elsewhere = await busy.append("ada", "keep me", client_id="c-1")
    assert (again.id, repeat) == (1, True)
    assert (elsewhere.id, elsewhere.room, repeat_elsewhere) == (51, "busy", False)
    with pytest.raises(ChatError) as refused:
        await quiet.append("ada", "another text", client_id="c-1")
    assert refused.value.status == 422


async def test_a_room_and_a_user_name_spelling_another_rooms_dedupe_key_do_not_collide(
        make_log):
    # Room "r", user "x:dedupe:y" and room "r:dedupe:x", user "y" share a dedupe key.
    log = make_log()
    first, _ = await log.room("r:dedupe:x").append("y", "one", client_id="c")
    second, repeat = await log.room("r").append("x:dedupe:y", "two", client_id="c")
    assert (second.text, second.room, repeat) == ("two", "r", False)
    assert [m.text for m in await log.room("r").after(0)] == ["two"]


async def test_rooms_beyond_max_rooms_are_refused_by_every_process(make_log):
    one, two = make_log(max_rooms=3), make_log(max_rooms=3)
    await one.room("a").append("ada", "a")  # the default room counts: 2 of 3
    await two.room("b").append("bob", "b")  # 3 of 3
    with pytest.raises(ChatError) as refused:
        await one.room("c").append("cy", "c")
    assert refused.value.status == 429 and "at most 3" in str(refused.value)
    assert await one.room("c").last_id() == 0  # nothing stored
    await two.room("a").append("bob", "still fine")  # existing rooms still take messages
    await one.append("ada", "and the default room")
    assert set(await two.rooms()) == {DEFAULT_ROOM, "a", "b"}


async def test_one_connection_follows_every_room_and_each_gets_only_its_own(
        make_log, redis_server):
    reader, writer = make_log(), make_log()
    names = [f"room-{i}" for i in range(20)]
    follows = {name: reader.room(name).follow(0) for name in names}
    async with admin(redis_server) as redis:
        firsts = [asyncio.ensure_future(next_page(pages)) for pages in follows.values()]
        for round_ in range(2):
            for name in reversed(names):
                await writer.room(name).append("ada", f"{name} #{round_ + 1}")
        got = {name: list(await first) for name, first in zip(names, firsts, strict=True)}
        for name in names:
            while len(got[name]) < 2:
                got[name] += await next_page(follows[name])
        # One pub/sub connection for 20 rooms' notices, not one per room.
        assert [c["name"] for c in await redis.client_list()].count("chatlib-follower") == 1
    for name in names:
        assert [(m.id, m.text, m.room) for m in got[name]] == [
            (1, f"{name} #1", name), (2, f"{name} #2", name)]
    for pages in follows.values():
        await pages.aclose()


async def test_a_room_followed_while_the_follower_waits_is_read_at_once(make_log):
    """The follower waits (up to 30 s) for a notice of room a when room b is followed: b is
    subscribed to and read at once, rather than waiting for that wait to end."""
    reader, writer = make_log(block=30.0), make_log()
    a_pages = reader.room("a").follow(0)
    a_first = asyncio.ensure_future(next_page(a_pages))
    await until(lambda: reader.room("a")._channel in reader._store.follower._sent)
    await asyncio.sleep(0.2)  # the follower waits for a notice by now
    b_pages = reader.room("b").follow(0)
    await writer.room("b").append("bob", "in b")
    [message] = await next_page(b_pages, timeout=10.0)  # < block
    assert (message.room, message.text) == ("b", "in b")
    await writer.room("a").append("ada", "in a")
    assert [m.text for m in await a_first] == ["in a"]
    await a_pages.aclose()
    await b_pages.aclose()


async def test_an_append_between_the_catch_up_read_and_the_notices_is_not_lost(make_log):
    """A room's notices are a wake-up, its stream the truth: the follower subscribes first,
    then reads after its cursor. A message appended right after that first read (had it
    read first, before its subscription was active) comes all the same, long before the
    30 s wait for a notice would end."""
    reader, writer = make_log(block=30.0), make_log()
    await writer.room("r").append("ada", "before")
    follower = reader._store.follower
    read = follower._read
    appended: list[int] = []

    async def read_then_append(due: set[str]) -> set[str]:
        more = await read(due)
        if not appended:  # once, just after the catch-up read
            appended.append((await writer.room("r").append("bob", "between"))[0].id)
        return more

    follower._read = read_then_append
    pages = reader.room("r").follow(0)
    got: list[str] = []
    async with asyncio.timeout(10.0):
        while len(got) < 2:
            got += [m.text for m in await anext(pages)]
    assert got == ["before", "between"] and appended == [2]
    await pages.aclose()


async def test_a_burst_over_rooms_followed_during_it_arrives_whole_and_in_order(make_log):
    """200 messages over 10 rooms, appended concurrently while the rooms are being
    followed (some before their first message, some in the middle): each follower gets
    its room's ids 1..20 once each, in order."""
    reader, writer = make_log(block=30.0), make_log()
    names = [f"burst-{i}" for i in range(10)]
    got: dict[str, list[int]] = {name: [] for name in names}

    async def follow(name: str) -> None:
        pages = reader.room(name).follow(0)
        try:
            while len(got[name]) < 20:
                got[name] += [m.id for m in await anext(pages)]
        finally:
            await pages.aclose()

    async def send(name: str) -> None:
        for i in range(20):
            await writer.room(name).append("ada", f"{name} {i}")

    senders = [asyncio.ensure_future(send(name)) for name in names]
    followers = []
    for name in names:
        followers.append(asyncio.ensure_future(follow(name)))
        await asyncio.sleep(0.005)
    async with asyncio.timeout(T):
        await asyncio.gather(*senders, *followers)
    assert got == {name: list(range(1, 21)) for name in names}


async def test_what_the_follower_sends_per_message_does_not_grow_with_its_rooms(
        make_log, redis_server):
    """A follower of 300 rooms, one of them busy: 20 messages (each delivered before the
    next is sent) cost its connections about the bytes sent that they cost with 1 room,
    counted by bench/rooms_cluster.py's relay. One XREAD naming every room each turn sent
    ~43 bytes per room per message."""
    sys.path.insert(0, str(Path(__file__).parent.parent / "bench"))
    from rooms_cluster import Relay

    async def sent_per_message(rooms: int) -> float:
        relay = await Relay(redis_server.port).start()
        try:
            reader, writer = make_log(relay.url, block=30.0), make_log()
            pages = [reader.room(f"n{rooms}-{i}").follow(0) for i in range(rooms)]
            busy = pages[0]
            for i in range(rooms):
                await writer.room(f"n{rooms}-{i}").append("ada", "first")
            async with asyncio.timeout(T):  # every room followed and read by now
                firsts = await asyncio.gather(*(anext(follow) for follow in pages))
            assert [len(page) for page in firsts] == [1] * rooms
            before = relay.counts["follower_sent"]
            for i in range(20):
                await writer.room(f"n{rooms}-0").append("ada", f"{i}")
                assert (await next_page(busy))[-1].text == f"{i}"
            sent = (relay.counts["follower_sent"] - before) / 20
            for follow in pages:
                await follow.aclose()
            await reader.close()
            return sent
        finally:
            await relay.stop()

    one, many = await sent_per_message(1), await sent_per_message(300)
    assert 0 < many < 2 * one + 100, (one, many)


async def test_a_late_follower_of_a_room_gets_what_it_missed_from_its_cursor(make_log):
    reader, writer = make_log(), make_log()
    ahead = reader.room("r").follow(0)
    for i in range(3):
        await writer.room("r").append("ada", str(i))
    assert [m.id for m in await next_page(ahead)] in ([1, 2, 3], [1], [1, 2])
    behind = reader.room("r").follow(1)  # a second hub of the room in the process, behind
    await writer.room("r").append("ada", "3")
    got: list[int] = []
    while got[-1:] != [4]:
        got += [m.id for m in await next_page(behind)]
    assert got == [2, 3, 4]
    await ahead.aclose()
    await behind.aclose()


async def test_every_room_resumes_after_redis_restarts_and_after_flushall(
        make_log, redis_server):
    reader = make_log(block=0.5)
    writer = make_log()
    pages = {name: reader.room(name).follow(0) for name in ("x", "y")}
    for name in pages:
        await writer.room(name).append("ada", f"{name} 1")
        assert [m.text for m in await next_page(pages[name])] == [f"{name} 1"]
    await redis_server.restart()  # appendonly: ids and history survive
    await until(lambda: reader.reconnects > 0, what="the follower noticed")
    for name in pages:
        async with asyncio.timeout(T):
            while True:  # the writer's first append may meet the dead connection
                with contextlib.suppress(Exception):
                    await writer.room(name).append("ada", f"{name} 2")
                    break
                await asyncio.sleep(0.05)
    for name in pages:
        [message] = await next_page(pages[name])
        assert (message.id, message.text, message.room) == (2, f"{name} 2", name)
    async with admin(redis_server) as redis:
        await redis.flushall()
    for name in pages:  # an empty page: the room's log went back; then from its start
        assert await next_page(pages[name]) == []
    await writer.room("y").append("bob", "y again")
    [message] = await next_page(pages["y"])
    assert (message.id, message.text, message.room) == (1, "y again", "y")
    for follow in pages.values():
        await follow.aclose()


async def test_presence_and_typing_travel_per_room_on_one_bus(make_log):
    one, two = make_log(), make_log()
    buses = [one.bus(), two.bus()]
    assert one.room("x").bus() is None  # a room's bus is a view of the default room's
    here = [{DEFAULT_ROOM: {"ann"}, "x": {"ada"}, "y": set()},
            {DEFAULT_ROOM: set(), "x": {"bob"}, "y": {"cy"}}]
    told: list[dict] = [{}, {}]
    typed: list[list] = [[], []]
    tasks = []
    for i, bus in enumerate(buses):
        for room in (DEFAULT_ROOM, "x", "y"):
            view = bus.room(room)
            assert view.name == room
            tasks.append(asyncio.ensure_future(view.run(
                lambda i=i, room=room: here[i][room],
                lambda user, i=i, room=room: typed[i].append((room, user)),
                lambda users, i=i, room=room: told[i].__setitem__(room, users))))
    try:
        await until(lambda: told[0] == {DEFAULT_ROOM: frozenset(), "x": {"bob"}, "y": {"cy"}}
                    and told[1] == {DEFAULT_ROOM: {"ann"}, "x": {"ada"}, "y": frozenset()},
                    what="each room's presence from the other process")
        buses[0].room("x").typing("ada")
        buses[1].typing("zed")  # the default room's
        await until(lambda: typed[1] == [("x", "ada")] and typed[0] == [(DEFAULT_ROOM, "zed")],
                    what="typing in its room only")
        here[0]["y"] = {"dee"}
        await until(lambda: told[1].get("y") == {"dee"}, what="a change in room y")
        tasks[1].cancel()  # room x's hub on process one goes: ada leaves x elsewhere
        await until(lambda: told[1].get("x") == frozenset(), what="room x left")
        assert told[1][DEFAULT_ROOM] == {"ann"}
    finally:
        await stop(tasks, buses)


async def test_a_direct_message_is_told_to_the_other_processes(make_log):
    one, two = make_log(), make_log()
    buses = [one.bus(), two.bus()]
    told: list[list] = [[], []]
    tasks = []
    for i, bus in enumerate(buses):
        bus.dm_elsewhere = lambda room, sender, i=i: told[i].append((room, sender))
        tasks.append(asyncio.ensure_future(bus.run(set, lambda user: None, lambda users: None)))
    try:
        async with asyncio.timeout(T):
            while not told[1]:  # bounded: until the other process has subscribed
                buses[0].dm("@ada+bob", "ada")
                await asyncio.sleep(0.05)
        assert set(told[1]) == {("@ada+bob", "ada")} and told[0] == []  # not to itself
    finally:
        await stop(tasks, buses)


async def test_room_logs_nobody_follows_are_not_held_forever(make_log):
    """Asking for rooms costs no Redis, but each view is an object: past 2 x max_rooms,
    the views of rooms this process does not follow are dropped (made again on demand)."""
    log = make_log(max_rooms=3)
    followed = log.room("followed")
    pages = followed.follow(0)
    first = asyncio.ensure_future(next_page(pages))
    await until(lambda: log._store.follower.followed() == {followed._stream})
    for i in range(20):
        log.room(f"asked-{i}")
    assert len(log._store.rooms) <= 2 * 3
    assert log.room("followed") is followed and log.room(DEFAULT_ROOM) is log
    await followed.append("ada", "still here")
    assert [m.text for m in await first] == ["still here"]
    await pages.aclose()
