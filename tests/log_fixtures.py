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
