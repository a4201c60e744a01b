"""Reconnect storm: N WebSocket clients come back at once to a server, each with history
to catch up on, while a bystander chats on it.

``python bench/storm.py [-n 2000] [--catch-up 500] [--repeats 3] [--modes naive,jitter]
[--json results.json]`` runs every mode once per repeat, modes alternating, and prints (and
saves) each trial, the medians per mode, and issue 20's "Done when" figures per mode
(:func:`done_when`). ``storm.trial(...)`` runs one trial from a notebook (chapter 12).

One trial, three processes:

* **servers**: two :class:`chatlib.ChatServer` in this process (127.0.0.1, ephemeral ports,
  one ``MemoryLog``): the *old* one, which goes away, and the *measured* one, which takes
  its clients over (a failover; a restart is the same storm, and the bystander's would
  be cut too). ``time.process_time()`` here is the servers' CPU (the old one's only its
  1012 closes). Every client comes from 127.0.0.1, so the per-address budgets (sending,
  replay pages) are lifted: in real life 2,000 clients come from 2,000 addresses, and here
  they would share one address's budget.
* **the storm** (``storm.py clients``, one process): N raw WebSocket clients. Each checks
  that ids arrive one after the other (chatlib's ids count 1, 2, 3...): an id above
  ``last_id + 1`` counts the ids between as lost, one at or below ``last_id`` as duplicated.
* **a bystander** (``storm.py bystander``, one process): one WebSocket client of the
  measured server, connected before the storm and through it, that posts a live message
  every ``1 / live_rate`` s on a fixed schedule and measures when it gets each one back:
  latency = received - scheduled send time (so a late send counts). Its window is the
  storm's, t0 until every client is back, whatever the policy.
* **pinned** (``--no-pin`` to leave them to the OS; :func:`pins`): the servers and the
  bystander on one CPU, the storm's clients on the others, so that the load generator,
  which uses most of a core, does not take the servers' CPU from them (every policy
  alike; a notebook's ``trial`` pins nothing unless asked).

1. **Join** (not measured): the storm's clients connect to the old server, 1 ms apart; a
   ``sync`` message reaches all of them. The bystander joins the measured server.
2. **Missed**: ``catch_up`` messages are appended to the log (the measured server has
   them, the old one's clients do not).
3. **Storm** (``t0``): the old server stops with 1012 (service restart); each client
   reconnects, to the measured server, by its mode's policy (:func:`next_delay`) and
   sends its cursor; it is *back* once it has every message up to the newest at ``t0``.
   The bystander posts live messages until every client is back.
4. **Settle**: one last message; every client must reach it; then the counts.

Modes: ``naive`` reconnects at once, then retries every ``naive_delay`` s (the same instants
for everyone); ``jitter`` waits ``uniform(0, min(cap, base * 2**attempt))`` before every
attempt, the first included ("full jitter"); ``admission``: the clients reconnect at once
(the server alone shapes the arrivals) to a server with admission control
(``Limits.admit_rate``, chatlib.admission: at most ``admit_rate`` new sessions per second,
the rest closed 1013 ``busy: retry after S s``), and a client told "retry after S s" waits
exactly S (the server handed each refused client its own slot); ``spread`` is
``admission`` with a 1012 that announces each client's own delay
(``ChatServer.restarting()``: ``restart: retry after S s``, S uniform over
``n / admit_rate``, the time the server takes to admit everyone). The ``naive`` and
``jitter`` servers admit everyone (``admit_rate=0``).

Per trial: ``all_back_s`` (t0 until the last client is back), ``first_history_p50_s`` /
``p99`` (t0 until a client's first message), ``server_cpu_s`` (this process, t0 until all
back), ``lost``, ``duplicated``, ``attempts`` (connection attempts, all clients),
``failed`` (attempts refused or cut), ``admitted_per_s`` (from the clients' first messages:
after the first ``admit_burst``, admitted at once, and before the last 5 %, stragglers),
``server_admitted_per_s`` (the accept rate, timed at the server while refused clients
waited: :func:`admission_rate`), ``bystander_p50_ms`` / ``p99`` / ``max`` and
``bystander_received`` (how many samples), ``bystander_series`` (each sample: its scheduled
send time since the storm began, s, and its latency, ms) and ``pinned`` (the CPUs of each
process, or None).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import statistics
import sys
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from chatlib.clients import Backoff  # noqa: E402  (the repository's chatlib, installed or not)

MODES = ("naive", "jitter", "admission", "spread")
HINTED = ("admission", "spread")
"""The modes whose clients wait exactly the delay a server's close reason names."""
BASE, CAP, NAIVE_DELAY = 1.0, 30.0, 0.25
"""Full jitter's first window and its cap (s); the naive client's fixed retry delay (s)."""


RETRY_AFTER = re.compile(r"retry after ([0-9.]+) s")
"""A server's "come back in S seconds" in a close reason (chatlib.closecode)."""


def next_delay(mode: str, attempt: int, *, base: float = BASE, cap: float = CAP,
               naive_delay: float = NAIVE_DELAY, server_delay: float | None = None) -> float:
    """Seconds to wait before connection attempt ``attempt`` (0: the first after a close).

    ``naive``: none, then ``naive_delay`` every time. ``jitter``: chatlib's own
    :class:`chatlib.clients.Backoff` (full jitter). ``admission`` and ``spread``: the delay
    the server's close reason named (``server_delay``), waited exactly (the server spread the
    clients already); without one, at once the first time (as ``naive``: the server alone
    shapes the arrivals), then ``Backoff``."""
    if mode == "naive" or (mode in HINTED and server_delay is None and attempt == 0):
        return 0.0 if attempt == 0 else naive_delay  # hinted modes: at once, like naive
    backoff = Backoff(base=base, cap=cap, attempt=attempt)
    return backoff.delay(server_delay if mode in HINTED else None)


def percentile(values, p: float) -> float:
    """Nearest rank: the smallest value that at least ``p`` % of the values do not exceed."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[max(0, min(len(ordered) - 1, int(-(-len(ordered) * p // 100)) - 1))]


MESSAGE_ID = '{"type":"message","id":'
"""How chatlib.wire begins a message frame: its id is read without parsing the JSON (the
storm's process reads a million frames; it must not be the bottleneck)."""


def message_id(frame: str) -> int:
    """The id of a message frame."""
    if frame.startswith(MESSAGE_ID):
        return int(frame[len(MESSAGE_ID):frame.index(",", len(MESSAGE_ID))])
    return json.loads(frame)["id"]


# -- the storm's clients (their own process) ------------------------------------------------

class Swarm:
    """N clients, their counts, and a threshold: how many have reached a given id."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.url = f"ws://127.0.0.1:{a.port}/ws"
        self.failover_url = f"ws://127.0.0.1:{a.failover_port or a.port}/ws"
        random.seed(a.seed)  # Backoff draws from the module's generator
        n = a.n
        self.last = [a.after] * n
        self.lost = self.dup = self.attempts = self.failed = 0
        self.t_first = [0.0] * n  # first message after the restart (monotonic)
        self.t_back = [0.0] * n
        self.restarted = False  # the server was restarted: count firsts and backs
        self.closed_by_restart = False  # a connection closed: attempts from now on count
        self.cpu0 = 0.0  # this process's CPU time at the restart
        self.threshold = 0
        self.reached = 0
        self.reached_all = asyncio.Event()
        self.opened = 0
        self.all_open = asyncio.Event()
        self.stopping = False
        self.sockets: list = [None] * n
        self.phase = [""] * n  # what each client is doing now (for a report of the missing)
        self.closes: dict[str, int] = {}  # close code and reason -> connections
        self.failures: dict[str, int] = {}  # exception -> failed attempts

    def set_threshold(self, last_id: int) -> None:
        self.threshold = last_id
        self.reached = sum(x >= last_id for x in self.last)
        self.reached_all.clear()
        if self.reached == self.a.n:
            self.reached_all.set()

    def on_message(self, i: int, message_id: int) -> None:
        last = self.last[i]
        if message_id <= last:
            self.dup += 1
            return
        self.lost += message_id - last - 1
        self.last[i] = message_id
        now = time.monotonic()
        if self.restarted and not self.t_first[i]:
            self.t_first[i] = now
        if last < self.threshold <= message_id:
            if self.restarted and not self.t_back[i]:
                self.t_back[i] = now
            self.reached += 1
            if self.reached == self.a.n:
                self.reached_all.set()

    async def client(self, i: int) -> None:
        """Connect, read, and reconnect by the mode's policy until told to stop."""
        attempt = 0
        first = True
        server_delay = None
        while not self.stopping:  # bounded: the controller stops the swarm (or kills it)
            self.phase[i] = "wait"
            if not first:
                await asyncio.sleep(next_delay(self.a.mode, attempt, base=self.a.base,
                                               cap=self.a.cap, naive_delay=self.a.naive_delay,
                                               server_delay=server_delay))
                attempt += 1
            first = False
            if self.restarted or self.closed_by_restart:
                self.attempts += 1
            self.phase[i] = "connect"
            try:
                ws = await connect(self.url, ping_interval=None, compression=None,
                                   open_timeout=30, close_timeout=5)
            except (OSError, InvalidHandshake, TimeoutError) as exc:
                # Refused, reset, or closed during the handshake (the old server going
                # away answers nothing: InvalidMessage): try again, by the policy.
                self.failed += 1
                key = type(exc).__name__
                self.failures[key] = self.failures.get(key, 0) + 1
                continue
            self.sockets[i] = ws
            if not self.all_open.is_set():
                self.opened += 1
                if self.opened == self.a.n:
                    self.all_open.set()
            self.phase[i] = "read"
            try:
                await ws.send(json.dumps({"type": "hello", "user": f"storm{i}",
                                          "after": self.last[i]}))
                async for raw in ws:
                    if raw.startswith('{"type":"message"'):
                        if attempt:
                            attempt = 0  # admitted: the next close starts from the first window
                        self.on_message(i, message_id(raw))
            except ConnectionClosed:
                pass
            except OSError:
                self.failed += 1
            code = ws.close_code
            self.closed_by_restart = True
            self.url = self.failover_url  # the server that takes over
            hint = RETRY_AFTER.search(ws.close_reason or "")
            server_delay = float(hint.group(1)) if hint else None
            key = f"{code} {RETRY_AFTER.sub('retry after S s', ws.close_reason or '')}".strip()
            self.closes[key] = self.closes.get(key, 0) + 1
            self.sockets[i] = None

    def result(self, t0: float, burst: int = 0) -> dict:
        n = self.a.n
        firsts = [t - t0 for t in self.t_first if t]
        backs = [t - t0 for t in self.t_back if t]
        admitted = sorted(firsts)
        # The rate at which clients got in, from their first messages: after the first
        # ``burst`` (admitted at once) and before the last 5 % (stragglers).
        lo, hi = min(burst, len(admitted) // 2), len(admitted) - 1 - len(admitted) // 20
        span = admitted[hi] - admitted[lo] if hi > lo else 0.0
        cpu_share = (time.process_time() - self.cpu0) / max(1e-9, time.monotonic() - t0)
        return dict(n=n, back=len(backs), all_back_s=max(backs, default=float("nan")),
                    firsts=[round(t, 4) for t in admitted], clients_cpu_share=cpu_share,
                    back_p50_s=percentile(backs, 50),
                    first_history_p50_s=percentile(firsts, 50),
                    first_history_p99_s=percentile(firsts, 99),
                    lost=self.lost, duplicated=self.dup, attempts=self.attempts,
                    failed=self.failed,
                    admitted_per_s=(hi - lo) / span if span > 0 else 0.0,
                    closes=self.closes, failures=self.failures)


async def read_commands():
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


async def run_swarm(a: argparse.Namespace) -> None:
    """The storm's process: commands on stdin, one word per line on stdout, JSON at the end."""
    swarm = Swarm(a)
    commands = await read_commands()
    tasks = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    for i in range(a.n):  # paced: client i starts at start + i * spacing
        await asyncio.sleep(max(0.0, start + i * a.spacing - loop.time()))
        tasks.append(asyncio.ensure_future(swarm.client(i)))
    await asyncio.wait_for(swarm.all_open.wait(), a.timeout)
    print("connected", flush=True)
    t0 = 0.0
    while True:  # bounded: the controller sends "final" (or closes stdin: EOF ends it)
        line = (await commands.readline()).decode().split()
        if not line:
            break
        word, *args = line
        if word == "sync":
            swarm.set_threshold(int(args[0]))
            await asyncio.wait_for(swarm.reached_all.wait(), a.timeout)
            print("ready", flush=True)
        elif word == "target":
            t0 = float(args[1])
            swarm.restarted = True
            swarm.cpu0 = time.process_time()
            swarm.set_threshold(int(args[0]))
            for i in range(a.n):  # those already back (a client that was quick)
                if swarm.last[i] >= swarm.threshold and not swarm.t_back[i]:
                    swarm.t_back[i] = time.monotonic()
            try:
                await asyncio.wait_for(swarm.reached_all.wait(), a.timeout)
            except TimeoutError:
                pass  # the result says how many are back
            print("back", flush=True)
        elif word == "final":
            swarm.set_threshold(int(args[0]))
            try:
                await asyncio.wait_for(swarm.reached_all.wait(), a.timeout)
            except TimeoutError:
                pass
            result = swarm.result(t0, a.burst)
            missing = [i for i in range(a.n) if swarm.last[i] < swarm.threshold]
            result["final_missing"] = len(missing)
            result["missing"] = [dict(i=i, last_id=swarm.last[i],
                                      connected=swarm.sockets[i] is not None,
                                      phase=swarm.phase[i])
                                 for i in missing[:5]]
            swarm.stopping = True
            await asyncio.gather(*(ws.close() for ws in swarm.sockets if ws is not None),
                                 return_exceptions=True)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            print(json.dumps(result), flush=True)
            break


async def run_bystander(a: argparse.Namespace) -> None:
    """Post a live message every 1/rate s on a fixed schedule; time each one's return.

    It connects before the storm (says "ready"), starts at "go" and stops at "stop". Cut or
    refused, it reconnects after the server's delay (or 50 ms); the messages it had in
    flight then are dropped from the count (``reconnects`` and ``dropped`` say how many)."""
    commands = await read_commands()
    url = f"ws://127.0.0.1:{a.port}/ws"
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    series: list[tuple[float, float]] = []  # (scheduled send - go, latency ms), each one back
    sent: dict[str, float] = {}  # text -> scheduled send time, until it comes back
    all_back = asyncio.Event()  # set when no live message is in flight
    state = dict(k=0, start=0.0, dropped=0, reconnects=0)
    waiters: list[asyncio.Task] = []  # reading "stop"

    async def session(stop: asyncio.Event) -> None:
        async with connect(url, ping_interval=None, compression=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "hello", "user": "bystander", "after": a.after}))
            if not state["start"]:  # connected before the storm: wait for it
                print("ready", flush=True)
                await commands.readline()  # "go"
                state["start"] = loop.time()
                waiters.append(asyncio.ensure_future(wait_stop(stop)))

            async def reader() -> None:
                async for raw in ws:
                    if raw.startswith('{"type":"message"'):
                        data = json.loads(raw)
                        if data["user"] == "bystander" and data["text"] in sent:
                            due = sent.pop(data["text"])
                            latencies.append(loop.time() - due)
                            series.append((round(due - state["start"], 3),
                                           round(latencies[-1] * 1000, 1)))
                            if not sent:
                                all_back.set()

            reading = asyncio.ensure_future(reader())
            try:
                while not stop.is_set():  # bounded: the controller sends "stop"
                    due = state["start"] + state["k"] / a.live_rate
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), max(0.0, due - loop.time()))
                        break
                    if reading.done():
                        reading.result()  # the connection closed: raise why
                    text = f"live {state['k']}"
                    sent[text] = due  # from the scheduled time: a late send counts
                    state["k"] += 1
                    await ws.send(json.dumps({"type": "message", "text": text}))
                all_back.clear()
                if sent:  # wait for the last ones in flight (bounded)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(all_back.wait(), 10)
            finally:
                reading.cancel()

    async def wait_stop(stop: asyncio.Event) -> None:
        await commands.readline()
        stop.set()

    async def retrying(stop: asyncio.Event) -> None:
        for _ in range(1000):  # refused, cut, or the server not listening yet: bounded tries
            try:
                await session(stop)
                return
            except (OSError, InvalidHandshake, ConnectionClosed) as exc:
                state["reconnects"] += 1
                state["dropped"] += len(sent)
                sent.clear()
                reason = getattr(getattr(exc, "rcvd", None), "reason", "") or ""
                hint = RETRY_AFTER.search(reason)
                await asyncio.sleep(float(hint.group(1)) if hint else 0.05)

    await retrying(asyncio.Event())
    print(json.dumps(dict(sent=state["k"] - state["dropped"], received=len(latencies),
                          dropped=state["dropped"], reconnects=state["reconnects"],
                          series=series, p50_ms=percentile(latencies, 50) * 1000,
                          p99_ms=percentile(latencies, 99) * 1000,
                          max_ms=max(latencies, default=float("nan")) * 1000)), flush=True)


# -- the controller (the server's process) ---------------------------------------------------

LIVE_RATE = 20.0
"""The bystander's live messages per second: a storm of 2,000 lasts 10 to 50 s, so its p99
rests on 200 to 1,000 samples (a p99 of fewer than 100 would be its maximum)."""

ADMIT_RATE = 50.0
"""Sessions per second the ``admission`` and ``spread`` servers admit (``Limits.admit_rate``):
at 500 messages of history each, what one process can replay on this machine (bench/README.md,
"Reconnect storm"). Bursts of a tenth of a second's worth."""


def admit_burst(admit_rate: float) -> int:
    return max(1, int(admit_rate / 10))


def bench_limits(mode: str = "naive", admit_rate: float = ADMIT_RATE, **changes):
    """Default limits, with the per-address budgets lifted (every client is 127.0.0.1), and
    admission control on (at ``admit_rate``) in the ``admission`` mode only."""
    import chatlib
    options = dict(rate=1000, burst=1000, address_rate=1e6, address_burst=10**6,
                   replay_rate=1e6, replay_burst=10**6)
    if mode in HINTED:
        options.update(admit_rate=admit_rate, admit_burst=admit_burst(admit_rate))
    else:
        options.update(admit_rate=0)  # no control: the storm as it comes
    options.update(changes)
    return chatlib.Limits(**options)


class Child:
    """A ``storm.py`` role in its own process, spoken to by lines."""

    def __init__(self, role: str, process: asyncio.subprocess.Process) -> None:
        self.role, self.process = role, process

    @classmethod
    async def start(cls, role: str, *args: str) -> Child:
        return await cls.start_script(os.path.abspath(__file__), role, *args)

    @classmethod
    async def start_script(cls, script: str, role: str, *args: str) -> Child:
        """``python script role args...``, its stdin and stdout ours."""
        process = await asyncio.create_subprocess_exec(
            sys.executable, script, role, *args,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(role, process)

    def send(self, line: str) -> None:
        self.process.stdin.write(line.encode() + b"\n")

    async def expect(self, timeout: float) -> str:
        try:
            line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        except TimeoutError:
            raise TimeoutError(f"storm.py {self.role}: no answer within {timeout:g} s") from None
        if not line:
            raise RuntimeError(f"{self.process.pid} ended (exit {await self.process.wait()})")
        return line.decode().strip()

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()


async def trial(mode: str, n: int = 2000, catch_up: int = 500, *, live_rate: float = LIVE_RATE,
                base: float = BASE, cap: float = CAP, naive_delay: float = NAIVE_DELAY,
                admit_rate: float = ADMIT_RATE, seed: int = 1, timeout: float = 120.0,
                server_options: dict | None = None, spacing: float = 0.001,
                pin: bool = False) -> dict:
    """One storm, in the running event loop (this process serves); returns its results.

    ``pin``: run this process and the bystander on one CPU, the storm's clients on the
    others (:func:`pins`), for the trial; without it, wherever the OS puts them."""
    import chatlib
    from chatlib.closecode import CloseCode

    cpus = pins() if pin else None
    affinity = os.sched_getaffinity(0) if cpus else None
    if cpus:
        set_affinity(0, cpus["server"])
    log = chatlib.MemoryLog()
    options = dict(limits=bench_limits(mode, admit_rate), ws_ping_interval=None)
    options.update(server_options or {})
    old = await chatlib.ChatServer(port=0, log=log, limits=bench_limits("naive"),
                                   ws_ping_interval=None).start()
    server = await chatlib.ChatServer(port=0, log=log, **options).start()
    port = str(server.port)
    after = str(await log.last_id())
    children: list[Child] = []
    try:
        swarm = await Child.start("clients", "--port", str(old.port), "--failover-port", port,
                                  "-n", str(n), "--mode", mode,
                                  "--after", after, "--base", str(base), "--cap", str(cap),
                                  "--naive-delay", str(naive_delay), "--seed", str(seed),
                                  "--timeout", str(timeout), "--spacing", str(spacing),
                                  "--burst", str(admit_burst(admit_rate) if mode in HINTED else 0))
        children.append(swarm)
        bystander = await Child.start("bystander", "--port", port, "--after", after,
                                      "--live-rate", str(live_rate))
        children.append(bystander)
        if cpus:
            set_affinity(swarm.process.pid, cpus["clients"])
            set_affinity(bystander.process.pid, cpus["bystander"])
        assert await swarm.expect(timeout) == "connected"
        assert await bystander.expect(timeout) == "ready"
        message, _ = await old.hub.post("bench", "sync")
        swarm.send(f"sync {message.id}")
        assert await swarm.expect(timeout) == "ready"

        for k in range(catch_up):  # what the storm's clients will have missed
            await log.append("bench", f"while you were away: {k + 1} of {catch_up}")
        target = await log.last_id()
        await server.hub.catch_up()  # the server taking over has them (its bystander too)
        spread = old.restarting(n / admit_rate if mode == "spread" else 0)
        admissions = record_admissions(server)
        bystander.send("go")
        cpu0 = time.process_time()
        t0 = time.monotonic()
        swarm.send(f"target {target} {t0}")
        # The storm. The old server's closes run in this loop too (cheap next to the
        # replays, but not free): a failover elsewhere would not cost this process them.
        stopping = asyncio.ensure_future(old.stop(CloseCode.SERVICE_RESTART))
        # (the clients' process answers after at most `timeout`; on a loaded machine its
        # loop may be late by many seconds)
        assert await swarm.expect(timeout * 1.5) == "back"
        cpu_s = time.process_time() - cpu0
        wall_s = time.monotonic() - t0
        bystander.send("stop")
        live = json.loads(await bystander.expect(30))
        await stopping
        message, _ = await server.hub.post("bench", "the end")
        swarm.send(f"final {message.id}")
        result = json.loads(await swarm.expect(timeout * 1.5))
    finally:
        for child in children:
            await child.stop()
        await old.stop()
        await server.stop()
        if affinity:
            set_affinity(0, affinity)
    result.update(admission_rate(admissions, admit_rate, admit_burst(admit_rate))
                  if mode in HINTED else {})
    result.update(mode=mode, catch_up=catch_up,
                  admit_rate=admit_rate if mode in HINTED else None, restart_spread_s=spread,
                  server_cpu_s=cpu_s, storm_wall_s=wall_s, load_average=os.getloadavg()[0],
                  bystander_p50_ms=live["p50_ms"], bystander_p99_ms=live["p99_ms"],
                  bystander_max_ms=live["max_ms"], bystander_sent=live["sent"],
                  bystander_reconnects=live["reconnects"],
                  bystander_received=live["received"], bystander_series=live["series"],
                  pinned={role: sorted(c) for role, c in cpus.items()} if cpus else None)
    return result


def pins() -> dict[str, set[int]] | None:
    """The CPUs of a pinned trial, or None where there are fewer than two (or the OS pins
    nothing): the servers (this process) on the first CPU this process may use, the
    storm's clients on the others (they are the load, and it must not take the servers'
    CPU); the bystander with the servers, the CPU with the more idle time of the two, so
    that its own process waits least for a CPU when its echo comes back."""
    try:
        mine = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return None
    if len(mine) < 2:
        return None
    return dict(server={mine[0]}, clients=set(mine[1:]), bystander={mine[0]})


def set_affinity(pid: int, cpus: set[int]) -> None:
    """Run process ``pid`` (0: this one) on ``cpus`` only."""
    os.sched_setaffinity(pid, cpus)


def record_admissions(server) -> list[tuple[float, bool]]:
    """Each session ``server`` admits from now on: its monotonic time, and whether refused
    clients were waiting for a slot then (the server was busy: demand above its rate).
    (``hub.admission.admit()`` wrapped: the transports call it once per new session.)"""
    admission = server.hub.admission
    admit, times = admission.admit, []

    def recorded() -> float | None:
        busy = admission.stats()["slots"] > 0
        wait = admit()
        if wait is None:
            times.append((time.monotonic(), busy))
        return wait

    admission.admit = recorded
    return times


def admission_rate(admissions: list[tuple[float, bool]], rate: float, burst: int) -> dict:
    """The server's accept rate while it was busy (the sessions admitted while refused
    clients waited for their slots, over the time since the admission before each: the
    rate it holds a storm to; 0 if it was never busy), and the most admitted in any 1 s
    window, with the bound ``rate * 1.1 + burst`` (tests/test_admission.py checks the same)."""
    times = [t for t, _ in admissions]
    # the gaps before each admission made while clients waited: their number over their sum
    gaps = [t - before for (before, _), (t, waiting) in zip(admissions, admissions[1:],
                                                                   strict=False) if waiting]
    busy = [t for t, waiting in admissions if waiting]
    steady = len(gaps) / sum(gaps) if gaps and sum(gaps) > 0 else 0
    worst = max((sum(1 for u in times[i:] if u < t + 1.0) for i, t in enumerate(times)),
                default=0)
    return dict(server_admitted=len(times), server_admitted_per_s=steady,
                server_admitted_busy=len(busy),
                worst_1s=worst, worst_1s_bound=rate * 1.1 + burst)


SUMMARY_KEYS = ("all_back_s", "first_history_p50_s", "first_history_p99_s", "server_cpu_s",
                "attempts", "failed", "admitted_per_s", "bystander_p50_ms",
                "bystander_p99_ms", "bystander_received", "clients_cpu_share",
                "bystander_max_ms", "lost", "duplicated", "back")


ADMISSION_KEYS = ("server_admitted_per_s", "worst_1s", "worst_1s_bound")


def summarize(trials: list[dict]) -> dict:
    """Medians per mode (lost and duplicated: the sum over every trial, which must be 0)."""
    out = {}
    for mode in dict.fromkeys(t["mode"] for t in trials):
        mine = [t for t in trials if t["mode"] == mode]
        keys = [k for k in (*SUMMARY_KEYS, *ADMISSION_KEYS) if all(k in t for t in mine)]
        out[mode] = {key: (sum(t[key] for t in mine) if key in ("lost", "duplicated")
                           else statistics.median(t[key] for t in mine))
                     for key in keys}
        out[mode]["trials"] = len(mine)
    return out


def readme_table(results: dict) -> str:
    """bench/README.md's table of a saved run (tests/test_bench_storm.py checks that the
    README shows the saved JSON's figures)."""
    rows = ["| policy | storms | all back (s) | p50 / p99 first history (s) | server CPU (s) "
            "| clients' CPU share | attempts (failed) | accepted while busy (/s) "
            "| bystander p50 / p99 / max (ms), n | lost | duplicated |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results["summary"].items():
        admitted = (f"{r['server_admitted_per_s']:.0f}" if "server_admitted_per_s" in r
                    else "-")
        rows.append(f"| {mode} | {r['trials']} | {r['all_back_s']:.1f} "
                    f"| {r['first_history_p50_s']:.1f} / {r['first_history_p99_s']:.1f} "
                    f"| {r['server_cpu_s']:.1f} | {r['clients_cpu_share']:.2f} "
                    f"| {r['attempts']:.0f} ({r['failed']:.0f}) | {admitted} "
                    f"| {r['bystander_p50_ms']:.0f} / {r['bystander_p99_ms']:.0f} / "
                    f"{r['bystander_max_ms']:.0f}, {r['bystander_received']:.0f} "
                    f"| {r['lost']} | {r['duplicated']} |")
    return "\n".join(rows)


def done_when(results: dict) -> str:
    """Issue 20's "Done when" figures per policy, one line each: the accept rate past the
    burst against the configured one (admission control only), clients back of N, lost,
    duplicated, the bystander's live messages p50 / p99 / max (and how many), and each
    target met or not (accept rate within 10 %; p99 < 100 ms; max < 500 ms; 0 lost and
    0 duplicated; every client back)."""
    lines = [f"{results['n']} clients x {results['catch_up']} messages to catch up, "
             f"medians of {results['repeats']} (load average {results['load_average']:.1f}):"]
    for mode, r in results["summary"].items():
        if "server_admitted_per_s" in r:
            rate, configured = r["server_admitted_per_s"], results.get("admit_rate", ADMIT_RATE)
            off = rate / configured - 1
            accept = (f"accept {rate:.1f}/s vs {configured:g}/s ({off:+.0%}"
                      f"{', ok' if abs(off) <= 0.1 else ', MISSED'})")
        else:
            accept = "accept: no admission control"
        p99, worst = r["bystander_p99_ms"], r["bystander_max_ms"]
        whole = r["lost"] == 0 and r["duplicated"] == 0 and r["back"] == results["n"]
        lines.append(
            f"  {mode:9} {accept}; back {r['back']:.0f}/{results['n']} in "
            f"{r['all_back_s']:.1f} s; lost {r['lost']}, duplicated {r['duplicated']}"
            f"{'' if whole else ' MISSED'}; bystander p50 {r['bystander_p50_ms']:.0f} / "
            f"p99 {p99:.0f}{'' if p99 < 100 else ' MISSED'} / max {worst:.0f}"
            f"{'' if worst < 500 else ' MISSED'} ms (n={r['bystander_received']:.0f})")
    return "\n".join(lines)


async def bench(a: argparse.Namespace) -> dict:
    from chatlib import collector

    # The servers run in this process: set its collector as `python -m chatlib serve` sets
    # its own (chatlib.collector; a notebook's kernel, storm.trial's other caller, does not)
    collector.settle()
    trials = []
    for r in range(a.repeats):
        for mode in a.modes:
            result = await trial(mode, a.n, a.catch_up, live_rate=a.live_rate, seed=r + 1,
                                 timeout=a.timeout, pin=a.pin)
            result["repeat"] = r
            print(json.dumps(result), file=sys.stderr, flush=True)
            trials.append(result)
    return dict(n=a.n, catch_up=a.catch_up, live_rate=a.live_rate, repeats=a.repeats,
                admit_rate=ADMIT_RATE, cores=os.cpu_count(), pinned=trials[0]["pinned"],
                load_average=statistics.median(t["load_average"] for t in trials),
                trials=trials, summary=summarize(trials))


def common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of every role of storm.py and bench/capacity.py."""
    parser.add_argument("--port", type=int, help="the chat server's (a client role's)")
    parser.add_argument("--after", type=int, default=0, help="the clients' first cursor")
    parser.add_argument("--spacing", type=float, default=0.001, help="s between connects")
    parser.add_argument("--timeout", type=float, default=120.0)
    parser.add_argument("--json", help="also write the results here")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_arguments(parser)
    parser.add_argument("role", nargs="?", default="bench",
                        choices=("bench", "clients", "bystander"))
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--catch-up", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES))
    parser.add_argument("--mode", default="naive")
    parser.add_argument("--base", type=float, default=BASE)
    parser.add_argument("--cap", type=float, default=CAP)
    parser.add_argument("--naive-delay", type=float, default=NAIVE_DELAY)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--burst", type=int, default=0)
    parser.add_argument("--failover-port", type=int, help="clients: where to go once closed")
    parser.add_argument("--live-rate", type=float, default=LIVE_RATE)
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="leave the processes where the OS puts them (default: pinned; "
                             "see trial)")
    parser.set_defaults(timeout=300.0)  # 2,000 at 50/s take 40 s at best; a loaded machine more
    a = parser.parse_args()
    if a.role == "clients":
        asyncio.run(run_swarm(a))
    elif a.role == "bystander":
        asyncio.run(run_bystander(a))
    else:
        results = asyncio.run(bench(a))
        print(json.dumps(results["summary"], indent=1))
        print(done_when(results))
        if a.json:
            with open(a.json, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
