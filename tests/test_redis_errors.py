"""Every Redis failure is a JSON 503 (an error frame on a WebSocket), never a 500.

Issue 18: at ``maxmemory`` (OOM) the server answered 80 plain-text 500s with tracebacks;
a hung Redis (SIGSTOP) got 503s for messages Redis then stored, so a sender without a
client_id stored twice. Now a refusal says nothing was stored, and a timeout says the
outcome is unknown: send again with the same client_id (which the script dedupes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal

import httpx
import pytest
import redis.asyncio as aioredis

from chatlib.clients import ChatRefused


def tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


async def test_redis_out_of_memory_is_a_json_503_not_a_500(
        redis_server, start_chat, make_log, make_client, caplog):
    caplog.set_level(logging.WARNING)
    server = await start_chat(log=make_log())
    ws = await make_client("ws", server, "wanda")
    admin = aioredis.Redis.from_url(redis_server.url)
    try:
        async with httpx.AsyncClient() as http:
            url = server.url + "api/messages"
            assert (await http.post(url, json={"user": "ann", "text": "fits"})).status_code == 201
            await admin.config_set("maxmemory", 1)  # every write is now refused: OOM
            for _ in range(5):
                refused = await http.post(url, json={"user": "ann", "text": "no room"})
                assert refused.status_code == 503, refused.text
                assert refused.headers["content-type"] == "application/json"
                assert "OutOfMemoryError" in refused.json()["error"]
                assert "nothing was stored" in refused.json()["error"]
            with pytest.raises(ChatRefused) as by_ws:
                await ws.send("no room either")
            assert by_ws.value.status == 503 and ws.connected  # refused, still connected
            history = await http.get(url, params={"after": 0})  # reads are not refused
            assert [m["text"] for m in history.json()["messages"]] == ["fits"]
            await admin.config_set("maxmemory", 0)
            assert (await http.post(url, json={"user": "ann", "text": "room"})).status_code \
                == 201
    finally:
        with contextlib.suppress(Exception):
            await admin.config_set("maxmemory", 0)
        await admin.aclose()
    assert tracebacks(caplog) == []


async def test_a_hung_redis_is_a_503_that_says_resend_with_the_same_client_id(
        redis_server, start_chat, make_log, caplog):
    caplog.set_level(logging.WARNING)
    server = await start_chat(log=make_log(timeout=1.0))
    pid = redis_server.process.pid
    url = server.url + "api/messages"
    body = {"user": "ann", "text": "sent into a hung Redis", "client_id": "hung-1"}
    async with httpx.AsyncClient(timeout=20) as http:
        os.kill(pid, signal.SIGSTOP)  # Redis hangs: accepts, reads nothing, answers nothing
        try:
            unknown = await http.post(url, json=body)
        finally:
            os.kill(pid, signal.SIGCONT)
        assert unknown.status_code == 503, unknown.text
        error = unknown.json()["error"]
        assert "may or may not be stored" in error and "same client_id" in error
        for _ in range(100):  # bounded: until Redis answers again
            again = await http.post(url, json=body)
            if again.status_code != 503:
                break
        assert again.status_code in (200, 201), again.text  # 200: it had been stored
        history = (await http.get(url, params={"after": 0})).json()["messages"]
    assert [m["text"] for m in history] == ["sent into a hung Redis"]  # once
    assert tracebacks(caplog) == []


async def test_a_websocket_joining_while_redis_is_down_is_closed_with_1011(
        redis_server, start_chat, make_log, caplog):
    from websockets.asyncio.client import connect as ws_connect
    from websockets.exceptions import ConnectionClosed

    from chatlib.ws import STORE_DOWN

    caplog.set_level(logging.WARNING)
    server = await start_chat(log=make_log(timeout=1.0))
    redis_server.kill()
    async with ws_connect(server.ws_url) as ws:
        await ws.send('{"type": "hello", "user": "late", "after": 3}')
        with pytest.raises(ConnectionClosed):
            async with asyncio.timeout(15):
                while True:  # bounded by the timeout
                    await ws.recv()
    assert (ws.close_code, ws.close_reason) == (1011, STORE_DOWN)  # not 1013: fell behind
    assert tracebacks(caplog) == []
