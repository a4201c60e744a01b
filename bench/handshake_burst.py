"""The first second of a reconnect storm, alone: K WebSocket clients arrive at once at a
server with admission control and are refused (1013), while a bystander chats on it.

``python bench/handshake_burst.py [-k 2000] [--repeats 2] [--gates 0,8]`` prints, per trial,
the server's CPU for the burst, the bystander's latency (storm.py's bystander: a live
message every 50 ms, timed from its scheduled send) from one second before the burst until
one second after it, and the event-loop steps that took over 50 ms of wall time: their CPU
time (``time.thread_time``) and how many callbacks each ran. CPU per step, unlike wall time,
does not depend on what else the machine runs.

``--gates``: the sizes of chatlib's gate for new connections' first bytes to compare
(``chatlib.admission.FIRST_BYTES_PER_STEP``: at most N new connections' first bytes are
handled per event-loop step, the others wait for the next steps; 0: no gate, every one in
the step it arrives, as asyncio runs them), alternating. bench/README.md, "Reconnect storm",
has the figures.

One process serves (this one); the crowd (``websockets`` clients that connect and wait for
the close) and the bystander run in their own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from asyncio import base_events, events

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import storm  # noqa: E402

CROWD = r'''
import asyncio, collections, json, sys
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed
async def one(url, codes):
    try:
        async with connect(url, ping_interval=None, compression=None, open_timeout=60) as ws:
            await asyncio.wait_for(ws.recv(), 30)
    except ConnectionClosed as exc:
        codes.append(exc.rcvd.code if exc.rcvd else 0)
    except Exception as exc:
        codes.append(type(exc).__name__)
async def main():
    codes = []
    await asyncio.gather(*(one(sys.argv[1], codes) for _ in range(int(sys.argv[2]))))
    print(json.dumps(collections.Counter(str(code) for code in codes)))
asyncio.run(main())
'''
"""K clients that connect at once and wait (30 s at most) for the server to close them; it
prints ``{close code or exception: clients}`` as JSON."""

LONG_STEP = 0.05
"""Event-loop steps longer than this (wall, seconds) are reported."""


class Steps:
    """This process's event-loop steps over :data:`LONG_STEP`: (CPU s, callbacks run)."""

    def __init__(self) -> None:
        self.long: list[tuple[float, int]] = []
        self._callbacks = 0
        self._waiting = 0.0
        run_once, run = base_events.BaseEventLoop._run_once, events.Handle._run
        steps = self

        def timed_run_once(loop) -> None:
            steps._callbacks, steps._waiting = 0, 0.0
            selector = loop._selector
            if not getattr(selector, "_timed", False):
                original = selector.select

                def select(timeout=None):
                    t = time.monotonic()
                    try:
                        return original(timeout)
                    finally:
                        steps._waiting += time.monotonic() - t
                selector.select, selector._timed = select, True
            wall, cpu = time.monotonic(), time.thread_time()
            run_once(loop)
            if time.monotonic() - wall - steps._waiting > LONG_STEP:
                steps.long.append((time.thread_time() - cpu, steps._callbacks))

        def counted_run(handle) -> None:
            steps._callbacks += 1
            run(handle)

        base_events.BaseEventLoop._run_once = timed_run_once
        events.Handle._run = counted_run


async def burst(k: int = 2000, admit_rate: float = 50.0, steps: Steps | None = None) -> dict:
    """One trial in the running loop (this process serves): K refused at once."""
    import chatlib

    limits = storm.bench_limits("admission", admit_rate)
    server = await chatlib.ChatServer(port=0, limits=limits, ws_ping_interval=None).start()
    url = f"ws://127.0.0.1:{server.port}/ws"
    bystander = None
    try:
        bystander = await storm.Child.start("bystander", "--port", str(server.port),
                                            "--after", "0", "--live-rate", "20")
        assert await bystander.expect(60) == "ready"
        bystander.send("go")
        await asyncio.sleep(1.0)
        if steps is not None:
            steps.long.clear()
        cpu0, t0 = time.process_time(), time.monotonic()
        crowd = await asyncio.create_subprocess_exec(sys.executable, "-c", CROWD, url, str(k),
                                                     stdout=asyncio.subprocess.PIPE)
        out, _ = await crowd.communicate()
        cpu, wall = time.process_time() - cpu0, time.monotonic() - t0
        await asyncio.sleep(1.0)
        bystander.send("stop")
        live = json.loads(await bystander.expect(60))
    finally:
        if bystander is not None:
            await bystander.stop()
        await server.stop()
    long = list(steps.long) if steps is not None else []
    return dict(k=k, crowd=json.loads(out), server_cpu_s=cpu, crowd_wall_s=wall,
                bystander_p50_ms=live["p50_ms"], bystander_p99_ms=live["p99_ms"],
                bystander_max_ms=live["max_ms"], bystander_received=live["received"],
                over_70_ms=sum(ms > 70 for _, ms in live["series"]),
                long_steps=len(long), long_step_max_cpu_ms=max((c for c, _ in long),
                                                                default=0.0) * 1000,
                long_step_max_callbacks=max((n for _, n in long), default=0),
                load_average=os.getloadavg()[0])


async def main(a: argparse.Namespace) -> None:
    from chatlib import collector

    collector.settle()  # as `python -m chatlib serve` and bench/storm.py do
    from chatlib import admission

    steps = Steps()
    for _ in range(a.repeats):  # the gates alternate: side by side in one period
        for gate in a.gates:
            admission.FIRST_BYTES_PER_STEP = gate  # read by the server that burst() starts
            result = dict(gate=gate, **await burst(a.k, steps=steps))
            print(json.dumps(result), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--gates", type=lambda s: [int(x) for x in s.split(",")],
                        default=[0, 8], help="FIRST_BYTES_PER_STEP values, alternating")
    asyncio.run(main(parser.parse_args()))
