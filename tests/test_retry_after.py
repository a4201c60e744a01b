"""A send refused as too fast says when to come back (chatlib.limits.SendBudget.retry_after).

A 429 carries ``Retry-After`` (whole seconds, at least 1: RFC 9110, section 10.2.3), a
WebSocket error frame ``retry_after``; both come from the token bucket that refused. With
0.5 tokens/s and a burst of 1, the second send is refused and told 2 s: a send 1 s later is
refused again, one once those 2 s have passed is accepted. (Waiting out the named time is
what is tested, so these tests sleep for it.)
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from chatlib import Limits

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def limits() -> Limits:
    return Limits(rate=0.5, burst=1)


async def test_a_429_says_when_a_token_is_back(server):
    async with httpx.AsyncClient() as http:
        async def post(text: str) -> httpx.Response:
            return await http.post(server.url + "api/messages", json={"user": "ada", "text": text})

        assert (await post("first")).status_code == 201
        refused = await post("too soon")
        refused_at = time.monotonic()
        assert refused.status_code == 429
        retry_after = refused.headers["Retry-After"]
        assert retry_after == "2", retry_after  # 1 token / 0.5 per s, rounded up
        await asyncio.sleep(1)
        early = await post("still too soon")
        assert early.status_code == 429 and early.headers["Retry-After"] in ("1", "2")
        await asyncio.sleep(max(0.0, refused_at + int(retry_after) - time.monotonic()))
        assert (await post("on time")).status_code == 201
    assert [m.text for m in await server.log.after(0)] == ["first", "on time"]


async def test_a_websocket_error_frame_says_when_a_token_is_back(server):
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ada"}))

        async def send(text: str, cid: str) -> dict:
            await ws.send(json.dumps({"type": "message", "text": text, "client_id": cid}))
            for _ in range(100):  # bounded: skip presence and the message itself
                frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
                if frame["type"] in ("ack", "error") and frame.get("client_id") == cid:
                    return frame
            raise AssertionError("no answer to " + cid)

        assert (await send("first", "c1"))["type"] == "ack"
        refused = await send("too soon", "c2")
        refused_at = time.monotonic()
        assert refused["type"] == "error" and refused["status"] == 429
        assert refused["retry_after"] == 2, refused
        await asyncio.sleep(1)
        early = await send("still too soon", "c3")
        assert early["type"] == "error" and early["retry_after"] in (1, 2), early
        await asyncio.sleep(max(0.0, refused_at + refused["retry_after"] - time.monotonic()))
        assert (await send("on time", "c4"))["type"] == "ack"
    assert [m.text for m in await server.log.after(0)] == ["first", "on time"]
