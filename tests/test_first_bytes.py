"""New connections' first bytes go through the server's gate (chatlib.admission.FirstBytes):
at most ``per_step`` handled per event-loop step, the others later, in arrival order, their
reading paused meanwhile. A crowd arriving at once then cannot fill one step with its
handshakes while the clients already connected wait (bench/README.md, "Reconnect storm")."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

import chatlib
from chatlib import admission
from chatlib.closecode import CloseCode

pytestmark = pytest.mark.timeout(60)


class Transport:
    """What the gate uses of a transport."""

    def __init__(self) -> None:
        self.paused = False
        self.closing = False

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing


async def test_a_step_handles_per_step_first_bytes_and_the_next_steps_the_rest():
    gate = admission.FirstBytes(per_step=2)
    handled: list[bytes] = []
    transports = [Transport() for _ in range(5)]
    held = [gate.hold(t, handled.append, b"%d" % i) for i, t in enumerate(transports)]
    assert held == [False, False, True, True, True]  # the first two: handled by the caller
    assert [t.paused for t in transports] == [False, False, True, True, True]
    transports[3].closing = True  # gone while it waited
    await asyncio.sleep(0)
    assert handled == [b"2", b"4"] and not transports[2].paused and not transports[4].paused
    assert gate.waiting == 0
    # a new arrival in this step is counted with them: it waits for the next one
    assert gate.hold(Transport(), handled.append, b"5") is True
    await asyncio.sleep(0)
    assert handled == [b"2", b"4", b"5"]
    await asyncio.sleep(0)
    assert gate.hold(Transport(), handled.append, b"6") is False  # a quiet step: at once


async def test_a_crowd_arriving_at_once_is_answered_in_full(monkeypatch):
    """Every client of a crowd gets its handshake and its close code through a gate of one
    connection per step: none is left waiting."""
    monkeypatch.setattr(admission, "FIRST_BYTES_PER_STEP", 1)
    server = await chatlib.ChatServer(port=0, limits=chatlib.Limits(
        admit_rate=1, admit_burst=1)).start()
    url = f"ws://127.0.0.1:{server.port}/ws"

    async def one() -> int:
        try:
            async with connect(url, ping_interval=None) as ws:
                await ws.send('{"type":"hello","user":"crowd","after":0}')
                await asyncio.wait_for(ws.recv(), 1.0)
                return 0  # admitted (it reads its first frame)
        except ConnectionClosed as exc:
            return exc.rcvd.code
        except TimeoutError:
            return 0  # admitted, nothing to read

    try:
        codes = await asyncio.gather(*(one() for _ in range(30)))
    finally:
        await server.stop()
    assert codes.count(CloseCode.TRY_AGAIN_LATER) >= 28, codes
