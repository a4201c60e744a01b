"""chatlib.stuck.StuckWatch's sweep: every watched client each pass, at most
FANOUT_SLICE of them per event-loop step (a pass over 19,500 clients in one step held a
kernel's cells up to ~100 ms), and none acted on once forgotten."""

from __future__ import annotations

import asyncio

from chatlib import stuck
from chatlib.limits import FANOUT_SLICE, Limits


class FakeOutbox:
    def __init__(self) -> None:
        self.closed_with = None

    def close(self, code: int) -> None:
        self.closed_with = code

    def get_extra_info(self, name: str):  # it stands for its transport too
        return None


async def test_a_sweep_looks_at_every_client_a_slice_per_step(monkeypatch):
    n = 3 * FANOUT_SLICE + 1
    step = 0
    looks: list[int] = []  # the loop step of each look

    def unsent_bytes(transport) -> int:
        looks.append(step)
        return 0  # nothing waits: never stuck

    monkeypatch.setattr(stuck, "unsent_bytes", unsent_bytes)
    watch = stuck.StuckWatch(Limits(stuck_timeout=0.2))
    for _ in range(n):
        watch._watched[FakeOutbox()] = (object(), stuck.Progress(0.2))

    loop = asyncio.get_running_loop()
    done = asyncio.Event()

    def tick() -> None:  # counts loop steps until the first pass is over
        nonlocal step
        step += 1
        if len(looks) >= n:
            done.set()
        else:
            loop.call_soon(tick)

    sweeper = asyncio.ensure_future(watch._sweep())
    loop.call_soon(tick)
    try:
        await asyncio.wait_for(done.wait(), 5)
    finally:
        sweeper.cancel()
    first_pass = looks[:n]
    per_step = {s: first_pass.count(s) for s in set(first_pass)}
    assert max(per_step.values()) <= FANOUT_SLICE
    assert len(per_step) >= 4  # 769 clients: four slices, four steps


async def test_a_client_forgotten_during_a_pass_is_left_alone(monkeypatch):
    stuck_outboxes = [FakeOutbox() for _ in range(2 * FANOUT_SLICE)]
    resets = []
    monkeypatch.setattr(stuck, "unsent_bytes", lambda transport: 1)
    monkeypatch.setattr(stuck, "bytes_acked", lambda transport: 0)
    monkeypatch.setattr(stuck, "reset_connection", resets.append)
    watch = stuck.StuckWatch(Limits(stuck_timeout=0.05))
    for outbox in stuck_outboxes:
        watch._watched[outbox] = (outbox, stuck.Progress(0.05))
    last = stuck_outboxes[-1]

    real_stuck = stuck.Progress.stuck

    def spy(progress, transport, now):
        if transport is stuck_outboxes[0] and progress._acked is not None:
            watch.forget(last)  # the pass that resets has begun: its list holds ``last``
        return real_stuck(progress, transport, now)

    monkeypatch.setattr(stuck.Progress, "stuck", spy)
    sweeper = asyncio.ensure_future(watch._sweep())
    try:
        await asyncio.wait_for(_until(lambda: stuck_outboxes[-2].closed_with), 5)
    finally:
        sweeper.cancel()
    assert last.closed_with is None and last not in resets
    assert stuck_outboxes[0].closed_with == 1013


async def _until(condition) -> None:
    while not condition():  # bounded by the caller's wait_for
        await asyncio.sleep(0.01)
