"""Retention is explicit and bounded on every log: messages and bytes (issue 18).

Before, the memory log counted messages only (100,000 messages of 2,000 emoji held
848 MB), SQLite kept everything and Redis trimmed by count only.
"""

from __future__ import annotations

import pytest
from log_fixtures import LOGS

from chatlib import MemoryLog


async def kept(log) -> list:
    return await log.after(0, 1_000_000)


@pytest.mark.parametrize("kind", LOGS)
async def test_every_log_keeps_at_most_max_messages(make_any_log, kind):
    caps = {"max_len": 100} if kind == "redis" else {"max_messages": 100}
    log = await make_any_log(kind, **caps)
    for i in range(350):
        await log.append("ann", f"message {i}")
    messages = await kept(log)
    assert 90 <= len(messages) <= 100
    assert [m.id for m in messages] == list(range(351 - len(messages), 351))  # the newest
    assert await log.first_id() == messages[0].id and await log.last_id() == 350


@pytest.mark.parametrize("kind", LOGS)
async def test_every_log_keeps_at_most_max_bytes(make_any_log, kind):
    log = await make_any_log(kind, max_bytes=50_000)
    for i in range(300):
        await log.append("ann", f"{i:04d}" + "x" * 996)
    messages = await kept(log)
    held = sum(len(m.text.encode()) + len(m.user) for m in messages)
    assert 30 <= len(messages) and held <= 50_000
    assert messages[-1].id == 300 and await log.first_id() == messages[0].id


async def test_the_memory_log_counts_what_a_text_holds_in_memory():
    # 2,000 emoji are 8 KB in a Python str (4 bytes per character), not 2,000 "characters".
    log = MemoryLog(max_bytes=1_000_000)
    for _ in range(500):
        await log.append("ann", "\U0001f600" * 2000, None)
    messages = await kept(log)
    assert log.bytes <= 1_000_000 and len(messages) * 8000 <= 1_000_000
    assert len(messages) >= 100


@pytest.mark.parametrize("kind", LOGS)
async def test_an_empty_log_has_no_first_id_before_its_next(make_any_log, kind):
    log = await make_any_log(kind)
    assert await log.first_id() == 1
