"""Small helpers shared by test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from chatlib import browser
from chatlib.cluster import free_port  # noqa: F401 (the one free_port, for tests to import)


async def shut_down(things, method: str, timeout: float) -> None:
    """Call ``thing.<method>()`` on each, newest first; one failure never stops the rest."""
    for thing in reversed(things):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(getattr(thing, method)(), timeout)


async def end_process(process: asyncio.subprocess.Process, timeout: float = 10) -> None:
    """SIGTERM, then SIGKILL if it is still there after ``timeout`` s; always reaped."""
    with contextlib.suppress(ProcessLookupError):
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), timeout)
    except TimeoutError:
        process.kill()
        await process.wait()


def needs_chromium() -> pytest.MarkDecorator:
    """Skip unless a real Chromium starts here (``chatlib.browser.unavailable``'s reason).

    The check starts the browser once per test process, so call this only in modules that
    drive Chromium; they launch it with ``await chatlib.browser.launch(playwright)``.
    """
    reason = browser.unavailable()
    return pytest.mark.skipif(reason is not None, reason=reason or "")
