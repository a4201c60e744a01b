"""Shared pieces of the torture suite; conftest.py holds only its fixtures and hooks.

* :class:`ServerProcess`: a chat server in a subprocess: port, pid, RSS, descriptors.
* :class:`Bystander`: a WebSocket pair that keeps chatting while a test tortures the
  server, from its own loopback address (127.0.0.2), so that per-address budgets charged
  to the attacker (127.0.0.1) are not charged to it. It reports lost, duplicated and
  out-of-order messages and their latency.
* ``FIGURES``: what each test measured, printed at the end of the session.
* :func:`stored_messages`: every message a server keeps, read page by page.

Everything is seeded (``SEED``) so a failure reproduces; every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from pathlib import Path

import httpx
from websockets.asyncio.client import connect as ws_connect

from chatlib.limits import MAX_ID
from chatlib.server import raise_fd_limit

SEED = int(os.environ.get("TORTURE_SEED", "20261129"))
HERE = Path(__file__).resolve().parent
ARTIFACTS = HERE.parent / "artifacts"
BYSTANDER_ADDR = "127.0.0.2"
"""Source address of bystanders: all of 127.0.0.0/8 is the loopback interface on Linux."""


raise_fd_limit()  # this process holds thousands of client connections in the exhaustion tests

async def stored_messages(url: str) -> list[dict]:
    """Every message the server at ``url`` keeps, oldest first, each id once.

    A fresh read gets only the newest page (the resume protocol), so this walks back with
    ``GET /api/messages?before=ID`` until no ``before`` marker is left.
    """
    pages: list[list[dict]] = []
    before = MAX_ID
    async with httpx.AsyncClient(timeout=30) as http:
        for _ in range(10_000):  # bounded: pages of up to Limits.history
            page = (await http.get(f"{url}api/messages", params={"before": before})).json()
            pages.append(page["messages"])
            if "before" not in page:
                break
            before = page["before"]
    messages = [m for page in reversed(pages) for m in page]
    ids = [m["id"] for m in messages]
    assert ids == sorted(set(ids)), "a message twice, or out of order, in the history"
    return messages


# -- figures ------------------------------------------------------------------------------

FIGURES: dict[str, dict] = {}


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    return str(value)


def percentile(values, q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; nan for no values."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


# -- server processes ---------------------------------------------------------------------


class ServerProcess:
    """A chat server in a subprocess: its port, pid, RSS and open descriptors."""

    def __init__(self, proc: asyncio.subprocess.Process, port: int, stderr_path: Path,
                 host: str = "127.0.0.1"):
        self.proc, self.port, self.stderr_path = proc, port, stderr_path
        self.url = f"http://{host}:{port}/"
        self.ws_url = f"ws://{host}:{port}/ws"
        self._drain = asyncio.ensure_future(self._drain_stdout())

    async def _drain_stdout(self) -> None:
        with contextlib.suppress(Exception):
            while await self.proc.stdout.read(65536):  # ends at EOF (the process exited)
                pass

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None and Path(f"/proc/{self.pid}").exists()

    def rss_kib(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def stderr_tail(self, n: int = 3000) -> str:
        with contextlib.suppress(OSError):
            return self.stderr_path.read_text(errors="replace")[-n:]
        return ""

    def kill9(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)

    async def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.kill9()
                await asyncio.wait_for(self.proc.wait(), 10)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._drain, 5)
        return self.proc.returncode


# -- bystanders ---------------------------------------------------------------------------


async def ws_open(url: str, **kwargs):
    """A websockets client connection from the bystanders' own loopback address."""
    try:
        return await ws_connect(url, local_addr=(BYSTANDER_ADDR, 0), compression=None,
                                open_timeout=30, **kwargs)
    except OSError:  # a loopback without 127.0.0.2 (not Linux): share 127.0.0.1
        return await ws_connect(url, compression=None, open_timeout=30, **kwargs)


class Bystander:
    """Two WebSocket users who chat at a steady pace and check what reached the other.

    ``interval`` stays under the per-connection rate limit (5/s by default), so none of
    their messages may be refused. Each side records, for the other side's messages,
    which arrived, in which order, and how long after they were sent.
    """

    def __init__(self, ws_url: str, *, interval: float = 0.25, name: str = "bystander"):
        self.ws_url, self.interval, self.name = ws_url, interval, name
        self.sent: dict[str, list[str]] = {"a": [], "b": []}
        self.sent_at: dict[str, float] = {}
        self.got: dict[str, list[str]] = {"a": [], "b": []}  # the other side's texts
        self.ids: dict[str, list[int]] = {"a": [], "b": []}
        self.latencies: list[float] = []
        self.errors: list[str] = []
        self._conns = {}
        self._tasks: list[asyncio.Task] = []
        self._stop = asyncio.Event()

    async def __aenter__(self):
        for side in "ab":
            ws = await ws_open(self.ws_url)
            await ws.send(json.dumps({"type": "hello", "user": f"{self.name}-{side}",
                                      "after": 0}))
            self._conns[side] = ws
        for side in "ab":
            self._tasks.append(asyncio.ensure_future(self._read(side)))
        self._tasks.append(asyncio.ensure_future(self._chat()))
        return self

    async def __aexit__(self, *exc) -> None:
        self._stop.set()
        for task in self._tasks:
            task.cancel()
        for ws in self._conns.values():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 5)

    async def _chat(self) -> None:
        n = 0
        while not self._stop.is_set() and n < 100_000:  # bounded
            for side in "ab":
                text = f"{self.name}-{side}-{n}"
                self.sent_at[text] = time.monotonic()
                self.sent[side].append(text)
                await self._conns[side].send(json.dumps({"type": "message", "text": text}))
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), self.interval)

    async def _read(self, side: str) -> None:
        other = "b" if side == "a" else "a"
        prefix = f"{self.name}-{other}-"
        async for raw in self._conns[side]:
            event = json.loads(raw)
            kind = event.get("type")
            if kind == "error":
                self.errors.append(f"{side}: {event.get('error')}")
            elif kind == "message" and event.get("text", "").startswith(prefix):
                text = event["text"]
                self.got[side].append(text)
                self.ids[side].append(event["id"])
                if text in self.sent_at:
                    self.latencies.append(time.monotonic() - self.sent_at[text])

    async def finish(self, timeout: float = 60.0) -> dict:
        """Stop chatting, wait until everything sent has arrived (or ``timeout``), report."""
        self._stop.set()
        await self._tasks[-1]
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                while any(len(self.got[s]) < len(self.sent["b" if s == "a" else "a"])
                          for s in "ab"):  # bounded by the timeout
                    await asyncio.sleep(0.05)
        return self.report()

    def report(self) -> dict:
        lost = duplicated = out_of_order = 0
        for side in "ab":
            sent = self.sent["b" if side == "a" else "a"]
            got = self.got[side]
            lost += len(set(sent) - set(got))
            duplicated += len(got) - len(set(got))
            out_of_order += sum(1 for x, y in zip(got, got[1:], strict=False)
                                if int(x.rsplit("-", 1)[1]) >= int(y.rsplit("-", 1)[1]))
        return {"sent": sum(len(v) for v in self.sent.values()), "lost": lost,
                "duplicated": duplicated, "out_of_order": out_of_order,
                "errors": len(self.errors),
                "p50_ms": round(percentile(self.latencies, 50) * 1000, 1),
                "p99_ms": round(percentile(self.latencies, 99) * 1000, 1)}


