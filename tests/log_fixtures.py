"""``every_log``: each message log in turn (memory, SQLite, Redis), for tests that must
hold on all of them. The Redis one gets a fresh redis-server of its own."""

from __future__ import annotations

import pytest
from redis_fixtures import require_programs

from chatlib import MemoryLog, SQLiteLog
from chatlib.cluster import RedisProcess

LOGS = ("memory", "sqlite", "redis")


async def open_log(kind: str, tmp_path, **options):
    """``(log, redis_process or None)``; options go to the log's constructor."""
    if kind == "memory":
        return MemoryLog(**options), None
    if kind == "sqlite":
        tmp_path.mkdir(parents=True, exist_ok=True)
        return SQLiteLog(tmp_path / "chat.db", **options), None
    require_programs("redis-server")
    from chatlib.redis_log import RedisLog

    redis = RedisProcess(tmp_path / "redis")
    await redis.start()
    return RedisLog(redis.url, **options), redis


@pytest.fixture(params=LOGS)
async def every_log(request, tmp_path):
    log, redis = await open_log(request.param, tmp_path)
    try:
        yield log
    finally:
        await log.close()
        if redis is not None:
            redis.kill()


@pytest.fixture
async def make_any_log(tmp_path):
    """A factory: ``await make_any_log(kind, **options)``, a log of that kind (options to its
    constructor); every one is closed, and its Redis stopped, at teardown."""
    opened = []

    async def make(kind: str, **options):
        log, redis = await open_log(kind, tmp_path / f"log-{len(opened)}", **options)
        opened.append((log, redis))
        return log

    try:
        yield make
    finally:
        for log, redis in opened:
            await log.close()
            if redis is not None:
                redis.kill()
