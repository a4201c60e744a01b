"""The torture suite's fixtures (shared code: torturekit.py).

* ``spawn``: ``await spawn(limits={...})`` starts ``launch.py`` (a ChatServer with those
  Limits overrides; ``options={...}``: ChatServer's; ``prefix=[...]``: a command to run it
  under, such as ``ip netns exec NS``) in a subprocess; ``await spawn(cli=["--db", path])`` starts
  ``python -m chatlib serve``. Every process is stopped at teardown, also on failure.
* ``bystander``: ``async with bystander(server.ws_url) as pair: ...; await pair.finish()``.
* ``figures``: ``figures(section, **numbers)`` records what a test measured; the session
  prints every figure at the end (and writes tests/artifacts/torture-figures.json).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys

import pytest
from torturekit import (
    ARTIFACTS,
    FIGURES,
    HERE,
    SEED,
    Bystander,
    ServerProcess,
    _fmt,
)


@pytest.fixture
def figures():
    def record(section: str, **numbers) -> None:
        FIGURES.setdefault(section, {}).update(numbers)

    return record


def pytest_terminal_summary(terminalreporter):
    if not FIGURES:
        return
    terminalreporter.section(f"torture figures (seed {SEED})")
    for section, numbers in FIGURES.items():
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in numbers.items())
        terminalreporter.write_line(f"{section}: {shown}")
    with contextlib.suppress(OSError):
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "torture-figures.json").write_text(
            json.dumps({"seed": SEED, **FIGURES}, indent=1, default=str))


@pytest.fixture
async def spawn(tmp_path):
    """Start chat servers in subprocesses; all are stopped (or killed) at teardown."""
    procs: list[ServerProcess] = []
    count = 0

    async def start(*, limits: dict | None = None, cli: list[str] | None = None,
                    options: dict | None = None, prefix: list[str] = (),
                    timeout: float = 30.0) -> ServerProcess:
        nonlocal count
        count += 1
        stderr_path = tmp_path / f"server-{count}.stderr"
        if cli is not None:
            argv = [sys.executable, "-m", "chatlib", "serve", "--port", "0", *cli]
        else:
            argv = [sys.executable, str(HERE / "launch.py"), json.dumps(limits or {}),
                    json.dumps(options or {})]
        with open(stderr_path, "wb") as stderr:
            proc = await asyncio.create_subprocess_exec(
                *prefix, *argv, stdout=asyncio.subprocess.PIPE, stderr=stderr,
                env={**os.environ, "PYTHONUNBUFFERED": "1"})
        try:
            async with asyncio.timeout(timeout):
                line = (await proc.stdout.readline()).decode()
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        if "PORT " in line:
            port = int(line.split()[-1])
        elif "serving on" in line:  # "chatlib serving on http://127.0.0.1:PORT/  (...)"
            port = int(line.split("serving on ")[1].split()[0].rstrip("/").rsplit(":", 1)[1])
        else:
            proc.kill()
            await proc.wait()
            raise RuntimeError(f"server did not start: {line!r} "
                               f"{stderr_path.read_text(errors='replace')[-2000:]}")
        server = ServerProcess(proc, port, stderr_path, (options or {}).get("host", "127.0.0.1"))
        procs.append(server)
        return server

    try:
        yield start
    finally:
        for server in reversed(procs):
            with contextlib.suppress(Exception):
                await server.stop()


@pytest.fixture
def bystander():
    """``async with bystander(server.ws_url) as b: ...; report = await b.finish()``."""
    return Bystander
