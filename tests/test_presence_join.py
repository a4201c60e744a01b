"""Joining the presence list is POST-only (issue 18).

Any page can make a browser GET any port with an ``<img>`` (no Origin, no preflight): a
page on another port of 127.0.0.1 added a fake name that way. ``POST /api/presence``
passes the Origin and Content-Type checks; a GET (a poll, an event stream) only keeps a
name that joined present.
"""

from __future__ import annotations

import asyncio

import httpx

from chatlib import Limits


async def names(http: httpx.AsyncClient, server) -> list[str]:
    return (await http.get(server.url + "api/presence")).json()["users"]


async def test_a_get_adds_no_name(server, http):
    assert (await http.get(server.url + "api/messages", params={"user": "fake"})).status_code \
        == 200
    async with http.stream("GET", server.url + "api/events", params={"user": "fake-sse"}) as sse:
        assert sse.status_code == 200
        chunks = sse.aiter_bytes()  # kept: a dropped iterator closes the stream
        await asyncio.wait_for(anext(chunks), 10)  # the stream is open
        assert await names(http, server) == []
    assert await names(http, server) == []


async def test_a_post_joins_and_polls_keep_the_name(start_chat, http):
    server = await start_chat(limits=Limits(presence_ttl=1.0, presence_interval=0))
    joined = await http.post(server.url + "api/presence", json={"user": "paula"})
    assert joined.status_code == 200 and joined.json()["users"] == ["paula"]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 2.5  # past the TTL, kept by polls
    while loop.time() < deadline:  # bounded
        await http.get(server.url + "api/messages", params={"user": "paula", "wait": 0.3})
    assert await names(http, server) == ["paula"]
    # An event stream holds a name that joined.
    await http.post(server.url + "api/presence", json={"user": "sam"})
    async with http.stream("GET", server.url + "api/events", params={"user": "sam"}) as sse:
        chunks = sse.aiter_bytes()
        await asyncio.wait_for(anext(chunks), 10)
        await asyncio.sleep(1.5)  # past sam's join TTL: the open stream keeps it
        assert "sam" in await names(http, server)


async def test_another_site_cannot_post_a_join(server, http):
    foreign = await http.post(server.url + "api/presence", json={"user": "fake"},
                              headers={"Origin": "http://127.0.0.1:1"})
    assert foreign.status_code == 403
    form = await http.post(server.url + "api/presence", content=b"user=fake",
                           headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert form.status_code == 415
    assert await names(http, server) == []


async def test_a_refused_join_says_when_to_come_back(start_chat, http):
    """Both per-address refusals of a new name carry ``Retry-After`` (RFC 9110, 10.2.3):
    the new-name budget's wait, or ``presence_ttl`` for an address holding its maximum
    of names. Waiting out the first is what is tested, so this test sleeps for it."""
    server = await start_chat(limits=Limits(new_names_rate=1.0, new_names_burst=1,
                                            presence_interval=0))

    async def join(user: str) -> httpx.Response:
        return await http.post(server.url + "api/presence", json={"user": user})

    assert (await join("ann")).status_code == 200
    refused = await join("bea")
    refused_at = asyncio.get_running_loop().time()
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1", \
        refused.headers
    assert "new nicknames" in refused.json()["error"]
    await asyncio.sleep(max(0.0, refused_at + 1 - asyncio.get_running_loop().time()))
    assert (await join("bea")).status_code == 200

    full = await start_chat(limits=Limits(polled_per_address=1, presence_ttl=7.5))
    assert (await http.post(full.url + "api/presence", json={"user": "ann"})).status_code \
        == 200
    held = await http.post(full.url + "api/presence", json={"user": "bea"})
    assert held.status_code == 429 and held.headers["Retry-After"] == "8", held.headers
