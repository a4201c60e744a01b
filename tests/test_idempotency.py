"""A client_id / Idempotency-Key reused with a different text: 422, on every log.

Before, the second text got 200 and the *original* message, which the second sender's
client then took as the acknowledgement of its own text (issue 18). The key is bound to
the user (another user's same key is a message of its own) and to the text.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from websockets.asyncio.client import connect as ws_connect

from chatlib.validation import ChatError

T = 10.0


async def test_a_reused_key_with_another_text_is_refused_by_every_log(every_log):
    first, repeat = await every_log.append("ann", "pay bob 5", "key-1")
    assert not repeat
    again, repeat = await every_log.append("ann", "pay bob 5", "key-1")
    assert repeat and again.id == first.id and again.text == "pay bob 5"
    with pytest.raises(ChatError) as refused:
        await every_log.append("ann", "pay eve 500", "key-1")
    assert refused.value.status == 422 and "already used" in refused.value.error
    # Bound to the user: the same key from someone else is their own message.
    other, repeat = await every_log.append("eve", "pay eve 500", "key-1")
    assert not repeat and other.id > first.id
    assert [m.text for m in await every_log.after(0)] == ["pay bob 5", "pay eve 500"]


async def test_http_answers_422_and_websocket_an_error_frame(server):
    url = server.url + "api/messages"
    async with httpx.AsyncClient() as http:
        first = await http.post(url, json={"user": "ann", "text": "hello"},
                                headers={"Idempotency-Key": "k-7"})
        assert first.status_code == 201
        same = await http.post(url, json={"user": "ann", "text": "hello", "client_id": "k-7"})
        assert same.status_code == 200 and same.json() == first.json()
        other = await http.post(url, json={"user": "ann", "text": "goodbye"},
                                headers={"Idempotency-Key": "k-7"})
        assert other.status_code == 422, other.text
        assert "already used" in other.json()["error"]
    async with ws_connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "hello", "user": "ann"}))
        await ws.send(json.dumps({"type": "message", "text": "not hello", "client_id": "k-7"}))
        for _ in range(20):  # history and presence come first
            frame = json.loads(await asyncio.wait_for(ws.recv(), T))
            if frame["type"] in ("ack", "error"):
                break
        assert frame["type"] == "error" and frame["status"] == 422
        assert frame["client_id"] == "k-7"


@pytest.mark.parametrize("key", ["a b", "~", "x" * 64])
def test_the_panel_keeps_a_client_id_the_server_accepts(key):
    """The panel and the server use one rule for client ids: an id the server accepts is
    sent by the panel, not dropped (the panel once refused a space the server took)."""
    from chatlib import panel, validation

    assert validation.client_id(key) == key
    assert panel.valid_client_id(key)
    for bad in ("", "x" * 65, "é", "\n", 7):
        assert not panel.valid_client_id(bad)
        with pytest.raises(ChatError):
            validation.client_id(bad)
