"""Small helpers shared by test modules (tests/ is on sys.path under pytest)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

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


def server_side_states(server_port: int, client_ports: set[int]) -> dict[int, str]:
    """TCP state (/proc/net/tcp, hex: "01" ESTABLISHED, "04" FIN-WAIT-1, ...) of the
    server's end of each client connection still in the kernel; TIME-WAIT ("06") is the
    kernel's alone (no buffers, no descriptor) and left out."""
    found = {}
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote, state = fields[1], fields[2], fields[3]
            if int(local.split(":")[1], 16) == server_port:
                port = int(remote.split(":")[1], 16)
                if port in client_ports and state != "06":
                    found[port] = state
    return found


@contextlib.contextmanager
def serve_cli(*args: str) -> Iterator[str]:
    """``python -m chatlib serve --port 0 ARGS``, in a process group of its own, ended
    (SIGTERM, then SIGKILL) on exit; yields the line that says where it serves."""
    process = subprocess.Popen(
        [sys.executable, "-m", "chatlib", "serve", "--port", "0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        cwd=Path(__file__).parent.parent)
    try:
        line = ""
        for _ in range(50):  # a few lines of output at most before the link
            line = process.stdout.readline()
            if "serving on" in line or not line:
                break
        yield line
    finally:
        stop_group(process)
        process.stdout.close()


def stop_group(process: subprocess.Popen, wait: float = 10) -> None:
    """End a process started with ``start_new_session=True`` and all it started: SIGTERM
    to its group, then SIGKILL if it is still there after ``wait`` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(wait)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(wait)
