"""Several server processes sharing one SQLite history: each fans out the others' messages."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from helpers import stop_group

from chatlib import ChatServer, Limits, SQLiteLog
from chatlib.clients import PollingClient, SSEClient, WebSocketClient


async def test_two_servers_on_one_database_see_each_others_messages(tmp_path):
    path = tmp_path / "chat.db"
    a_log, b_log = SQLiteLog(path, poll_interval=0.05), SQLiteLog(path, poll_interval=0.05)
    async with ChatServer(log=a_log) as a, ChatServer(log=b_log) as b:
        async with WebSocketClient(a.url, "on-a") as on_a, SSEClient(b.url, "on-b") as on_b:
            async with PollingClient(a.url, "poster") as post_a, \
                    PollingClient(b.url, "poster") as post_b:
                sent = []
                for i in range(6):  # interleaved: each server appends in turn
                    sent.append(await (post_a if i % 2 else post_b).send(f"m{i}"))
            ids = [m.id for m in sent]
            assert ids == sorted(ids) and len(set(ids)) == 6
            for client in (on_a, on_b):  # everything, once, in id order, on both servers
                got = await client.receive_many(6, timeout=10)
                assert [m.id for m in got] == ids
                assert [m.text for m in got] == [f"m{i}" for i in range(6)]
    await a_log.close()
    await b_log.close()


async def test_a_server_in_another_process_shares_the_history(tmp_path):
    path = tmp_path / "chat.db"
    other = subprocess.Popen(
        [sys.executable, "-m", "chatlib", "serve", "--port", "0", "--db", str(path)],
        stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    log = SQLiteLog(path, poll_interval=0.05)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(other.stdout.readline), 20)
        assert "serving on" in line, line
        other_url = line.split("serving on ", 1)[1].split()[0]
        async with ChatServer(log=log, limits=Limits()) as here:
            async with WebSocketClient(here.url, "here") as near, \
                    WebSocketClient(other_url, "there") as far:
                await far.send("from the other process")
                assert (await near.receive(timeout=10)).text == "from the other process"
                await near.send("and back")
                texts = [m.text for m in await far.receive_many(2, timeout=10)]
                assert texts == ["from the other process", "and back"]
    finally:
        stop_group(other)
        await log.close()
