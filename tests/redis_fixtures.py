"""Fixtures for tests that need a real redis-server (and nginx): each test starts its own.

tests/conftest.py makes ``redis_server`` and ``make_log`` fixtures for every test; tests
import the helpers they use. ``make test`` installs redis-server and nginx from Debian;
without them these tests fail under CI and are skipped elsewhere, with the command that
installs them.
"""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from chatlib.cluster import RedisProcess, missing_programs
from chatlib.redis_log import RedisLog


def require_programs(*names: str) -> None:
    missing = [name for name in missing_programs() if name in names]
    if missing:
        reason = f"needs {' and '.join(missing)}: make test installs them (apt-get install)"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)


@pytest.fixture
async def redis_server(tmp_path):
    """A fresh redis-server on a free port, data in tmp_path (stopped at teardown)."""
    require_programs("redis-server")
    server = RedisProcess(tmp_path / "redis")
    await server.start()
    try:
        yield server
    finally:
        server.kill()


def recording(client) -> list[int]:
    """Every message id ``client`` receives from the wire, before its own dedupe."""
    seen: list[int] = []
    accept = client._accept

    def record(data: dict) -> None:
        seen.append(data["id"])
        accept(data)

    client._accept = record
    return seen


async def until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    """Wait (bounded) until ``predicate()`` is true; it may be a coroutine function."""
    async with asyncio.timeout(timeout):
        while True:  # bounded by the timeout
            value = predicate()
            if asyncio.iscoroutine(value):
                value = await value
            if value:
                return
            await asyncio.sleep(0.02)


async def until_client(client, predicate, timeout: float = 15.0) -> None:
    """Read ``client``'s events (bounded) until ``predicate()``: a client only learns of
    presence and typing events while it reads (messages read meanwhile stay in its inbox)."""
    async with asyncio.timeout(timeout):
        while not predicate():  # bounded by the timeout
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client._fetch(), 0.05)  # a WebSocket recv: cancel-safe


@pytest.fixture
async def make_log(redis_server):
    """``make_log(url=None, **options)``: a :class:`RedisLog` on ``redis_server`` (or ``url``),
    quick to notice a peer or a fault (short heartbeat, presence TTL, backoff and command
    timeout); every log is closed at teardown."""
    logs: list[RedisLog] = []

    def make(url: str | None = None, **options) -> RedisLog:
        log = RedisLog(url or redis_server.url,
                       **{"heartbeat": 0.2, "presence_ttl": 1.0, "backoff": (0.05, 0.5),
                          "timeout": 3.0, **options})
        logs.append(log)
        return log

    try:
        yield make
    finally:
        for log in reversed(logs):
            await log.close()
