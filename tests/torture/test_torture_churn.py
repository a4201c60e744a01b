"""Churn: 10,000 messages from 4 senders while 24 receivers on all four transports drop
their connections and resume at random. Every receiver must get every message exactly
once, in id order: nothing lost, nothing duplicated, across any number of reconnects.

Every receiver starts with a cursor: the id of a first message, sent before any receiver
exists. A receiver starting at 0 would be a *fresh join* (the newest page only, and
``history`` for the older ones: Hub.Resume), so one whose first request the server takes
after 500 messages (a loaded machine, the admission gate's 8 new connections per loop
step) would rightly not be sent the earlier ones; nor would one dropped before its first.

Duplicates are counted on the wire: each receiver records every message the server hands
it *before* the client's own ``id > last_id`` filter, which would otherwise hide them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time

import httpx
from torturekit import SEED, stored_messages, ws_open
from websockets.exceptions import ConnectionClosed

from chatlib import LongPollClient, PollingClient, SSEClient, WebSocketClient

MESSAGES = int(os.environ.get("TORTURE_CHURN_MESSAGES", "10000"))
SENDERS = 4
RECEIVERS_PER_TRANSPORT = 5
BATCH = 100
"""A sender waits for its own batch to come back before sending the next (back-pressure)."""
DEADLINE = 240.0

CLASSES = {"poll": (PollingClient, {"interval": 0.05}), "longpoll": (LongPollClient,
           {"wait": 5.0}), "sse": (SSEClient, {}), "ws": (WebSocketClient, {})}


async def sender(url: str, index: int, count: int, acked: dict[str, int]) -> None:
    ws = await ws_open(url)
    try:
        await ws.send(json.dumps({"type": "hello", "user": f"sender{index}", "after": 2**40}))
        prefix = f"s{index}-"
        sent = 0
        while sent < count:  # bounded: count messages in batches
            batch = [f"{prefix}{n}" for n in range(sent, min(count, sent + BATCH))]
            for text in batch:
                await ws.send(json.dumps({"type": "message", "text": text}))
            waiting = set(batch)
            async with asyncio.timeout(60):
                while waiting:  # bounded by the timeout
                    event = json.loads(await ws.recv())
                    if event.get("type") == "error":
                        raise AssertionError(f"sender {index}: {event}")
                    if event.get("type") == "message" and event["text"] in waiting:
                        waiting.discard(event["text"])
                        acked[event["text"]] = event["id"]
            sent += len(batch)
    finally:
        await ws.close()


async def first_message(url: str) -> int:
    """Send a message before any receiver exists: its id is every receiver's cursor."""
    ws = await ws_open(url)
    try:
        await ws.send(json.dumps({"type": "hello", "user": "starter", "after": 2**40}))
        await ws.send(json.dumps({"type": "message", "text": "start"}))
        async with asyncio.timeout(30):
            for _ in range(1000):  # bounded: the echo comes within a few events
                event = json.loads(await ws.recv())
                if event.get("type") == "message" and event["text"] == "start":
                    return event["id"]
        raise AssertionError("the first message never came back")
    finally:
        await ws.close()


class Receiver:
    def __init__(self, url: str, transport: str, index: int, rng: random.Random, after: int):
        cls, options = CLASSES[transport]
        self.transport, self.rng = transport, rng
        self.client = cls(url, f"{transport}{index}", after=after, **options)
        self.wire: list[int] = []  # every message id as the server sent it
        accept = self.client._accept

        def record(data: dict) -> None:
            self.wire.append(data["id"])
            accept(data)

        self.client._accept = record
        self.reconnects = 0
        self.dropped = 0

    async def run(self, done: asyncio.Event, final: list[int]) -> None:
        client = self.client
        await client.connect()
        next_drop = self.rng.randrange(50, 1200)
        received = 0
        try:
            while not (done.is_set() and client.last_id >= final[0]):  # bounded: DEADLINE
                try:
                    await client.receive(timeout=0.5)
                    received += 1
                except TimeoutError:
                    continue
                except (ConnectionError, ConnectionClosed, httpx.HTTPError):
                    # The server closed us (a slow client's outbox overflowed: 1013 / end of
                    # stream): the documented answer is to resume from our last id.
                    self.dropped += 1
                    await client.reconnect()
                    continue
                if received >= next_drop:
                    await client.reconnect()
                    self.reconnects += 1
                    next_drop = received + self.rng.randrange(50, 1200)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.close(), 5)


async def test_churn(spawn, figures):
    # Rate budgets off: one address plays every client, and reconnecting HTTP clients join
    # again and again (each join of a name no longer present spends a new-name token).
    server = await spawn(limits={"rate": 1e9, "burst": 10**9,
                                 "new_names_rate": 1e9, "new_names_burst": 10**9})
    rng = random.Random(SEED)
    start_id = await first_message(server.ws_url)
    receivers = [Receiver(server.url, t, i, random.Random(rng.random()), start_id)
                 for t in CLASSES for i in range(RECEIVERS_PER_TRANSPORT)]
    done, final = asyncio.Event(), [0]
    acked: dict[str, int] = {}
    start = time.monotonic()
    async with asyncio.timeout(DEADLINE):
        tasks = [asyncio.ensure_future(r.run(done, final)) for r in receivers]
        try:
            per = MESSAGES // SENDERS
            await asyncio.gather(*(sender(server.ws_url, i, per, acked)
                                   for i in range(SENDERS)))
            log = [m["id"] for m in await stored_messages(server.url) if m["id"] > start_id]
            final[0] = log[-1]
            done.set()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
    seconds = time.monotonic() - start
    server_cpu = server.cpu_seconds()
    own_cpu = time.process_time()
    lost = {r.client.user: len(set(log) - set(r.wire)) for r in receivers}
    duplicated = {r.client.user: len(r.wire) - len(set(r.wire)) for r in receivers}
    disordered = {r.client.user: sum(1 for a, b in zip(r.wire, r.wire[1:], strict=False)
                                     if a >= b) for r in receivers}
    figures("churn", messages=len(acked), receivers=len(receivers),
            reconnects=sum(r.reconnects for r in receivers),
            closed_by_server=sum(r.dropped for r in receivers), seconds=round(seconds, 1),
            server_cpu_s=round(server_cpu, 1), test_cpu_s=round(own_cpu, 1),
            lost=sum(lost.values()), duplicated=sum(duplicated.values()),
            out_of_order=sum(disordered.values()))
    assert len(acked) == MESSAGES and sorted(acked.values()) == sorted(set(acked.values()))
    assert set(acked.values()) <= set(log)
    assert not any(lost.values()), lost
    assert not any(duplicated.values()), duplicated
    assert not any(disordered.values()), disordered
    assert all(r.reconnects > 0 for r in receivers)
    assert server.alive
