"""The message log: MemoryLog and SQLiteLog honour the same contract."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chatlib import MemoryLog, Message, SQLiteLog
from chatlib.store import DEFAULT_ROOM

pytestmark = pytest.mark.timeout(60)


async def test_empty_log(log):
    assert await log.last_id() == 0
    assert await log.after(0) == []


async def test_append_returns_the_stored_message(log):
    message, duplicate = await log.append("ada", "hello")
    assert duplicate is False
    assert isinstance(message, Message)
    assert (message.user, message.text) == ("ada", "hello")
    assert message.id >= 1
    assert isinstance(message.ts, float)
    assert message.to_dict() == {"id": message.id, "ts": message.ts, "user": "ada",
                                 "text": "hello"}
    assert await log.after(0) == [message]


def test_a_message_is_turned_into_json_once():
    """Every encoding of a message in a row (frame, event, poll answer, ack) gets the one
    dict its first to_dict() built; another message gets its own."""
    one, two = Message(1, 1.0, "ada", "hi"), Message(2, 2.0, "bob", "yo", "c-1")
    first = one.to_dict()
    assert one.to_dict() is first
    assert two.to_dict() == {"id": 2, "ts": 2.0, "user": "bob", "text": "yo", "client_id": "c-1"}
    assert one.to_dict() == first


async def test_ids_strictly_increase(log):
    messages = [(await log.append("ada", f"m{i}"))[0] for i in range(20)]
    ids = [m.id for m in messages]
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False))
    assert [m.text for m in await log.after(0)] == [f"m{i}" for i in range(20)]
    assert all(a.ts <= b.ts for a, b in zip(messages, messages[1:], strict=False))


async def test_concurrent_appends_get_distinct_increasing_ids(log):
    messages = await asyncio.gather(*(log.append(f"u{i}", f"t{i}") for i in range(50)))
    ids = [m.id for m, _ in messages]
    assert len(set(ids)) == 50
    stored = await log.after(0)
    assert [m.id for m in stored] == sorted(ids)
    assert {m.text for m in stored} == {f"t{i}" for i in range(50)}


async def test_after_and_limit(log):
    messages = [(await log.append("ada", str(i)))[0] for i in range(10)]
    ids = [m.id for m in messages]
    assert await log.after(ids[4]) == messages[5:]
    assert await log.after(ids[4], limit=3) == messages[5:8]
    assert await log.after(0, limit=1) == messages[:1]
    assert await log.after(ids[-1]) == []
    assert await log.after(ids[-1] + 100) == []
    assert await log.after(-5) == messages
    # Paging with the limit visits every message exactly once.
    seen, cursor = [], 0
    while page := await log.after(cursor, limit=4):
        seen += page
        cursor = page[-1].id
    assert seen == messages


async def test_last_id(log):
    assert await log.last_id() == 0
    first, _ = await log.append("ada", "one")
    assert await log.last_id() == first.id
    second, _ = await log.append("bob", "two")
    assert await log.last_id() == second.id > first.id


async def test_text_is_stored_verbatim(log):
    texts = ["<script>alert(1)</script>", "a\nb\r\nc\t", "naïve ☃ 🎉", "'; DROP TABLE x; --",
             "\u0000nul", " padded  "]
    for text in texts:
        await log.append("ada", text)
    assert [m.text for m in await log.after(0)] == texts


async def test_sqlite_log_persists_across_reopen(tmp_path):
    path = tmp_path / "history.db"
    first = SQLiteLog(path)
    try:
        written = [(await first.append("ada", f"m{i}"))[0] for i in range(5)]
    finally:
        await first.close()

    second = SQLiteLog(path)
    try:
        assert await second.last_id() == written[-1].id
        assert await second.after(0) == written
        assert await second.after(written[1].id, limit=2) == written[2:4]
        newer, _ = await second.append("bob", "after restart")
        assert newer.id > written[-1].id
    finally:
        await second.close()

    third = SQLiteLog(path)
    try:
        assert [m.text for m in await third.after(0)] == [f"m{i}" for i in range(5)] + [
            "after restart"]
    finally:
        await third.close()


async def test_sqlite_ids_are_never_reused(tmp_path):
    path = tmp_path / "ids.db"
    log = SQLiteLog(path)
    try:
        ids = [(await log.append("ada", str(i)))[0].id for i in range(3)]
        await log._run(log._db.execute, "DELETE FROM messages WHERE id = ?", (ids[-1],))
        again, _ = await log.append("ada", "x")
        assert again.id > ids[-1]
    finally:
        await log.close()


async def test_memory_log_trims_oldest_and_keeps_ids():
    log = MemoryLog(max_messages=10)
    messages = [(await log.append("ada", str(i)))[0] for i in range(25)]
    kept = await log.after(0)
    assert 0 < len(kept) <= 10
    assert kept == messages[-len(kept):]  # a suffix: the newest survive
    assert await log.last_id() == messages[-1].id  # trimming never changes ids
    # A client resuming from before the window gets what is left, in order.
    assert await log.after(messages[2].id) == kept
    assert await log.after(messages[-3].id) == messages[-2:]
    nxt, _ = await log.append("ada", "next")
    assert nxt.id == messages[-1].id + 1


@settings(max_examples=60, deadline=None)
@given(
    max_messages=st.integers(min_value=1, max_value=30),
    count=st.integers(min_value=0, max_value=80),
    cursor=st.integers(min_value=-2, max_value=90),
    limit=st.integers(min_value=1, max_value=40),
)
def test_memory_log_matches_a_simple_model(max_messages, count, cursor, limit):
    async def scenario():
        log = MemoryLog(max_messages=max_messages)
        appended = [(await log.append("u", str(i)))[0] for i in range(count)]
        kept = await log.after(0, limit=10**9)
        assert len(kept) <= max_messages
        assert kept == appended[len(appended) - len(kept):]
        if appended:
            assert kept, "the newest message is always kept"
        assert await log.last_id() == count
        expected = [m for m in kept if m.id > cursor][:limit]
        assert await log.after(cursor, limit) == expected

    asyncio.run(scenario())


# -- client ids: a repeat of (user, client_id) is stored once ----------------------------


async def test_a_repeated_client_id_returns_the_original(log):
    first, duplicate = await log.append("ada", "hello", "c-1")
    assert duplicate is False
    assert first.client_id == "c-1"
    assert first.to_dict() == {"id": first.id, "ts": first.ts, "user": "ada", "text": "hello",
                               "client_id": "c-1"}
    again, duplicate = await log.append("ada", "hello", "c-1")  # another text: 422
    assert duplicate is True
    assert again == first
    assert await log.after(0) == [first]
    assert await log.last_id() == first.id


async def test_client_ids_are_per_user_and_optional(log):
    ada, _ = await log.append("ada", "one", "same")
    bob, duplicate = await log.append("bob", "two", "same")  # another user's id space
    assert duplicate is False and bob.id > ada.id
    plain = [(await log.append("ada", "no id"))[0] for _ in range(3)]  # never deduplicated
    assert len({m.id for m in plain}) == 3
    assert all(m.client_id is None and "client_id" not in m.to_dict() for m in plain)
    assert [m.client_id for m in await log.after(0)] == ["same", "same", None, None, None]


async def test_concurrent_repeats_store_one(log):
    results = await asyncio.gather(*(log.append("ada", "x", "race") for _ in range(20)))
    assert len({m.id for m, _ in results}) == 1
    assert sorted(duplicate for _, duplicate in results) == [False] + [True] * 19
    assert len(await log.after(0)) == 1


async def test_memory_log_dedupe_window_is_the_message_window():
    log = MemoryLog(max_messages=10)
    first, _ = await log.append("ada", "old", "c-old")
    assert (await log.append("ada", "old", "c-old"))[1] is True
    for i in range(30):
        await log.append("ada", str(i), f"c{i}")
    assert len(log._by_client_id) <= 10  # bounded: one entry per message still held
    again, duplicate = await log.append("ada", "old", "c-old")
    assert duplicate is False and again.id > first.id  # trimmed away: stored anew
    newest = (await log.after(0))[-2]
    assert await log.append("ada", newest.text, newest.client_id) == (newest, True)


async def test_sqlite_dedupe_survives_a_restart(tmp_path):
    path = tmp_path / "chat.db"
    first_log = SQLiteLog(path)
    try:
        original, _ = await first_log.append("ada", "before the restart", "c-1")
    finally:
        await first_log.close()
    second_log = SQLiteLog(path)
    try:
        assert await second_log.append("ada", "before the restart", "c-1") == (original, True)
        assert await second_log.after(0) == [original]
    finally:
        await second_log.close()


async def test_sqlite_migrates_a_database_from_before_client_ids(tmp_path):
    import sqlite3

    path = tmp_path / "old.db"
    db = sqlite3.connect(path)  # the schema of chatlib before client ids
    db.execute("CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, ts REAL NOT NULL,"
               " user TEXT NOT NULL, text TEXT NOT NULL)")
    db.executemany("INSERT INTO messages (ts, user, text) VALUES (?, ?, ?)",
                   [(1.0, "ada", "old one"), (2.0, "bob", "old two")])
    db.commit()
    db.close()
    log = SQLiteLog(path)
    try:
        assert await log.after(0) == [Message(1, 1.0, "ada", "old one"),
                                      Message(2, 2.0, "bob", "old two")]
        new, _ = await log.append("ada", "new", "c-1")
        assert new.id == 3 and await log.append("ada", "new", "c-1") == (new, True)
    finally:
        await log.close()
    reopened = SQLiteLog(path)  # opening a migrated file again changes nothing
    try:
        assert [m.client_id for m in await reopened.after(0)] == [None, None, "c-1"]
    finally:
        await reopened.close()


@pytest.mark.parametrize("room", [None, "lab"])
async def test_a_page_is_after_first_id_and_last_id_in_one_read(every_log, room):
    """MessageLog.page: what a poll needs, in one read; trimmed by retention too. A room's
    page is its own (issue 23): another room's messages change none of its bounds."""
    log = every_log.room(room) if room else every_log
    if room:
        await every_log.append("bob", "in the default room")
    assert await log.page(0, 10) == ([], 1, 0)
    for i in range(5):
        await log.append("ada", f"m{i}")
    assert await log.page(2, 2) == (await log.after(2, 2), 1, 5)
    assert await log.page(5, 10) == ([], 1, 5)
    assert await log.page(0, 0) == ([], 1, 5)
    assert {m.room for m in (await log.page(0, 10)).messages} == {room or DEFAULT_ROOM}


async def test_a_page_says_where_retention_starts(tmp_path):
    log = MemoryLog(max_messages=4)
    for i in range(6):
        await log.append("ada", f"m{i}")
    page = await log.page(0, 10)
    assert page.first_id == await log.first_id() > 1
    assert page.messages == await log.after(0, 10) and page.last_id == 6
