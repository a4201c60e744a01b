"""Crash durability: ``python -m chatlib serve --db FILE`` is killed with SIGKILL in the
middle of a burst, five times. Every message the server acknowledged (a 201 to a POST, or
its echo to the WebSocket that sent it) must be in the history afterwards with the same
id, user and text, and no id may ever be given to two messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random

import httpx
from torturekit import SEED, stored_messages, ws_open
from websockets.exceptions import ConnectionClosed

ROUNDS = 5
POSTERS = 6


async def burst(server, round_no: int, kill_after: int, acked: dict, reused: list) -> int:
    """Post from several clients until ``kill_after`` acks, then kill -9 mid-burst."""
    killed = asyncio.Event()
    count = 0

    def ack(message: dict) -> None:
        nonlocal count
        previous = acked.get(message["id"])
        entry = (message["user"], message["text"])
        if previous is not None and previous != entry:
            reused.append((message["id"], previous, entry))
        acked[message["id"]] = entry
        count += 1
        if count == kill_after:
            server.kill9()  # at once, while the other requests are in flight
            killed.set()

    async def poster(i: int) -> None:
        async with httpx.AsyncClient(timeout=10) as http:
            for n in range(100_000):  # bounded; ends when the server is gone
                if killed.is_set():
                    return
                text = f"r{round_no}-p{i}-{n}"
                try:
                    response = await http.post(f"{server.url}api/messages",
                                               json={"user": f"poster{i}", "text": text})
                except httpx.HTTPError:
                    return
                if response.status_code == 201:
                    ack(response.json())
                else:
                    raise AssertionError(f"{response.status_code} {response.text}")

    async def ws_sender() -> None:
        ws = await ws_open(server.ws_url)
        mine = set()
        try:
            await ws.send(json.dumps({"type": "hello", "user": "wsender", "after": 2**40}))
            for n in range(100_000):  # bounded; ends when the server is gone
                text = f"r{round_no}-ws-{n}"
                mine.add(text)
                await ws.send(json.dumps({"type": "message", "text": text}))
                while True:  # read until our own message comes back (bounded by the kill)
                    event = json.loads(await ws.recv())
                    if event.get("type") == "message" and event["text"] in mine:
                        ack(event)
                        break
        except (ConnectionClosed, OSError):
            return
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), 2)

    async with asyncio.timeout(120):
        await asyncio.gather(*(poster(i) for i in range(POSTERS)), ws_sender())
        await server.proc.wait()
    return count


async def test_kill9_loses_no_acknowledged_message(spawn, tmp_path, figures):
    db = tmp_path / "chat.db"
    cli = ["--db", str(db), "--rate", "1000000", "--burst", "1000000"]
    rng = random.Random(SEED)
    acked: dict[int, tuple[str, str]] = {}
    reused: list = []
    per_round = []
    for round_no in range(ROUNDS):
        server = await spawn(cli=cli)
        per_round.append(await burst(server, round_no, rng.randrange(100, 300), acked, reused))
        assert server.proc.returncode == -9
    server = await spawn(cli=cli)
    stored = {m["id"]: (m["user"], m["text"]) for m in await stored_messages(server.url)}
    lost = {i: m for i, m in acked.items() if i not in stored}
    changed = {i: (m, stored[i]) for i, m in acked.items() if i in stored and stored[i] != m}
    figures("kill -9 with --db", rounds=ROUNDS, acknowledged=len(acked),
            acks_per_round=per_round, in_history=len(stored), lost=len(lost),
            changed=len(changed), ids_reused=len(reused))
    assert not reused, reused[:5]
    assert not lost, list(lost.items())[:5]
    assert not changed, list(changed.items())[:5]
