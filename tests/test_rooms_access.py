"""Who may read what (issue 23; chatlib.rooms, chatlib.auth user tokens): a room of direct
messages ``@A+B`` is A's and B's only, a private room only the user tokens that list it,
and a client that may not join one is refused on every transport: 403 on HTTP (polls,
long polls with a cursor, posts, SSE with and without ``Last-Event-ID``, presence,
typing), an error naming the room on a WebSocket or WebTransport ``join`` (the connection
stays), close 1008 for a hello naming it. Never a silent empty answer."""

from __future__ import annotations

import asyncio
import json
import re
from functools import partial

import httpx
import pytest
from helpers import serve_cli
from test_webtransport import Probe
from websockets.asyncio.client import connect as ws_connect

from chatlib import ChatServer, Limits
from chatlib.auth import user_token
from chatlib.wire import SSEParser

T = 15.0
LIMITS = Limits(rate=1000, burst=1000, presence_interval=0)
DM = "@ada+bob"


def bearer(token: str) -> dict:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def tokens(start_chat):
    """A token-mode server with a private room "staff", and user tokens: ada (staff),
    bob, eve, and the shared token."""
    server = await start_chat(limits=LIMITS, token="s3cret", private_rooms={"staff"},
                              webtransport=True)
    return server, {"ada": server.user_token("ada", rooms=["staff"]),
                    "bob": server.user_token("bob"), "eve": server.user_token("eve"),
                    "shared": "s3cret"}


async def ws_open(server, token: str | None, user: str, **hello):
    ws = await ws_connect(server.ws_url, additional_headers=bearer(token) if token else {})
    await ws.send(json.dumps({"type": "hello", "user": user, "after": 0, **hello}))
    return ws


async def frame(ws, *kinds: str) -> dict:
    async with asyncio.timeout(T):
        while True:  # bounded by the timeout
            data = json.loads(await ws.recv())
            if data["type"] in kinds:
                return data


async def refused_everywhere(http: httpx.AsyncClient, server, room: str, token: str,
                             user: str) -> None:
    """Every HTTP way into ``room`` with ``token`` as ``user``: 403, saying why."""
    url, headers = server.url, bearer(token)
    answers = [
        await http.get(url + "api/messages", params={"room": room}, headers=headers),
        await http.get(url + "api/messages", params={"room": room, "after": 1, "wait": 5},
                       headers=headers),
        await http.get(url + "api/messages", params={"room": room, "before": 5},
                       headers=headers),
        await http.post(url + "api/messages", params={"room": room}, headers=headers,
                        json={"user": user, "text": "let me in"}),
        await http.post(url + "api/typing", params={"room": room}, headers=headers,
                        json={"user": user}),
        await http.post(url + "api/presence", params={"room": room}, headers=headers,
                        json={"user": user}),
        await http.get(url + "api/presence", params={"room": room}, headers=headers),
        await http.get(url + "api/events", params={"room": room}, headers=headers),
        await http.get(url + "api/events", params={"room": room},
                       headers={**headers, "Last-Event-ID": "1"}),
    ]
    for answer in answers:
        assert answer.status_code == 403, (answer.request.url, answer.text)
        assert answer.json()["error"].startswith("forbidden")


async def test_direct_messages_are_the_two_users_only(tokens):
    server, token = tokens
    async with httpx.AsyncClient(timeout=T) as http:
        bob = await ws_open(server, token["bob"], "bob")  # in the lobby only
        ada = await ws_open(server, token["ada"], "ada")
        try:
            await ada.send(json.dumps({"type": "join", "room": DM, "after": 0}))
            assert await frame(ada, "joined", "error") == {"type": "joined", "room": DM}
            await ada.send(json.dumps({"type": "message", "room": DM, "text": "psst"}))
            assert (await frame(ada, "message"))["text"] == "psst"
            # bob is told, on the connection that is not in the room, and reads it there
            assert await frame(bob, "dm") == {"type": "dm", "room": DM, "from": "ada"}
            answer = await http.get(server.url + "api/messages", params={"room": DM},
                                    headers=bearer(token["bob"]))
            assert [m["text"] for m in answer.json()["messages"]] == ["psst"]
            for who in ("eve", "shared"):
                await refused_everywhere(http, server, DM, token[who], "eve")
            # a user token fixes the nickname: posting as another user is refused
            answer = await http.post(server.url + "api/messages", params={"room": DM},
                                     headers=bearer(token["eve"]),
                                     json={"user": "ada", "text": "spoof"})
            assert answer.status_code == 403
            answer = await http.post(server.url + "api/messages",
                                     headers=bearer(token["eve"]),
                                     json={"user": "ada", "text": "spoof"})
            assert answer.status_code == 403
        finally:
            await bob.close()
            await ada.close()


@pytest.mark.parametrize("who", ["eve", "shared"])
async def test_a_websocket_join_of_a_forbidden_room_is_refused_and_the_rest_stays(
        tokens, who):
    server, token = tokens
    eve = await ws_open(server, token[who], "eve")
    try:
        for room in (DM, "staff"):
            await eve.send(json.dumps({"type": "join", "room": room, "after": 0}))
            error = await frame(eve, "error", "joined")
            assert error["type"] == "error" and error["room"] == room
            assert error["status"] == 403 and error["error"].startswith("forbidden")
        await eve.send(json.dumps({"type": "message", "room": DM, "text": "x"}))
        assert "join it first" in (await frame(eve, "error"))["error"]
        await eve.send(json.dumps({"type": "message", "text": "still in the lobby"}))
        assert (await frame(eve, "message"))["text"] == "still in the lobby"
    finally:
        await eve.close()
    # a hello into a forbidden room, or as another user than the token's: 1008
    for user, room in (("eve", DM), ("eve", "staff"), ("ada", None)):
        hello = {} if room is None else {"room": room}
        if who == "shared" and room is None:
            continue  # the shared token may use any nickname
        ws = await ws_open(server, token[who], user, **hello)
        try:
            assert (await frame(ws, "error"))["error"].startswith("forbidden")
            await asyncio.wait_for(ws.wait_closed(), T)
            assert ws.close_code == 1008 and ws.close_reason.startswith("forbidden")
        finally:
            await ws.close()


async def test_private_rooms_are_the_listed_tokens_only(tokens):
    server, token = tokens
    async with httpx.AsyncClient(timeout=T) as http:
        answer = await http.post(server.url + "api/messages", params={"room": "staff"},
                                 headers=bearer(token["ada"]),
                                 json={"user": "ada", "text": "staff only"})
        assert answer.status_code == 201 and answer.json()["room"] == "staff"
        for who in ("bob", "shared"):
            await refused_everywhere(http, server, "staff", token[who], who)
        ada = await ws_open(server, token["ada"], "ada", room="staff", after=0)
        try:
            assert (await frame(ada, "message"))["text"] == "staff only"
        finally:
            await ada.close()
        # the room list shows each client what it may join
        rooms = (await http.get(server.url + "api/rooms", headers=bearer(token["ada"]))).json()
        assert {"room": "staff", "last_id": 1, "private": True} in rooms["rooms"]
        rooms = (await http.get(server.url + "api/rooms", headers=bearer(token["bob"]))).json()
        assert all(r["room"] != "staff" for r in rooms["rooms"])


def answered(probe: Probe) -> dict | None:
    """The answer to a join (joined or an error), once it came."""
    return next((line for line in probe.lines if line["type"] in ("error", "joined")), None)


async def test_webtransport_refuses_forbidden_rooms(tokens, http):
    server, token = tokens
    for who in ("eve", "ada"):  # a ticket stands for the user token that asked for it
        info = (await http.get(server.url + "api/webtransport",
                               headers=bearer(token[who]))).json()
        p = Probe()
        status, error = await p.session.open(info["url"], info["hash"])
        assert status == 200, error
        try:
            p.session.send(f'{{"type": "hello", "user": "{who}"}}\n'.encode())
            p.session.send(json.dumps({"type": "join", "room": DM}).encode() + b"\n")
            answer = await p.until(partial(answered, p))
            if who == "eve":
                assert answer["type"] == "error" and answer["room"] == DM
                assert answer["error"].startswith("forbidden")
            else:
                assert answer == {"type": "joined", "room": DM}
        finally:
            await p.session.close()
    p = Probe()  # a user token in the CONNECT's header works as the ticket does
    status, error = await p.session.open(server.wt_url, server.wt_hash,
                                         headers=bearer(token["eve"]))
    assert status == 200, error
    try:
        p.session.send(json.dumps({"type": "hello", "user": "eve", "room": "staff"}
                                  ).encode() + b"\n")
        await p.until(lambda: p.end is not None)
        assert p.end[0] == 1008 and p.end[1].startswith("forbidden")
    finally:
        await p.session.close()


async def test_open_mode_direct_messages_go_by_nickname(start_chat):
    server = await start_chat(limits=LIMITS)
    async with httpx.AsyncClient(timeout=T) as http:
        eve = await ws_open(server, None, "eve")
        ada = await ws_open(server, None, "ada", room=DM)
        try:
            await eve.send(json.dumps({"type": "join", "room": DM}))
            assert (await frame(eve, "error", "joined"))["error"].startswith("forbidden")
            await ada.send(json.dumps({"type": "message", "room": DM, "text": "hi bob"}))
            assert (await frame(ada, "message"))["room"] == DM
        finally:
            await eve.close()
            await ada.close()
        answer = await http.get(server.url + "api/messages", params={"room": DM})
        assert answer.status_code == 403 and "user=" in answer.json()["error"]
        answer = await http.get(server.url + "api/messages",
                                params={"room": DM, "user": "eve"})
        assert answer.status_code == 403
        answer = await http.get(server.url + "api/messages",
                                params={"room": DM, "user": "bob"})
        assert [m["text"] for m in answer.json()["messages"]] == ["hi bob"]
        rooms = (await http.get(server.url + "api/rooms", params={"user": "bob"})).json()
        assert rooms["dms"] == [{"room": DM, "with": "ada", "last_id": 1}]
        rooms = (await http.get(server.url + "api/rooms")).json()
        assert rooms == {"rooms": [{"room": "lobby", "last_id": 0}], "dms": []}


async def test_the_shared_token_cannot_mint_user_tokens(tokens, http):
    """Everyone in the class holds the shared token (it is in the link): a user token
    signed with it, or with anything derived from it, is refused; only the server's own
    user secret signs one it accepts."""
    server, token = tokens
    forged = user_token(server.token, "bob")
    answer = await http.get(server.url + "api/rooms", headers=bearer(forged))
    assert answer.status_code == 401
    assert server.user_secret and server.user_secret != server.token
    genuine = user_token(server.user_secret, "bob")
    answer = await http.get(server.url + "api/rooms", headers=bearer(genuine))
    assert answer.status_code == 200


async def test_user_tokens_are_checked(tokens, http):
    server, token = tokens
    forged = token["eve"][:-4] + ("AAAA" if not token["eve"].endswith("AAAA") else "BBBB")
    expired = server.user_token("eve", ttl=-1)
    for bad in (forged, expired, "u.e30.x"):
        answer = await http.get(server.url + "api/messages", headers=bearer(bad))
        assert answer.status_code == 401
    with pytest.raises(ValueError):
        ChatServer(private_rooms={"staff"})  # open mode: anyone may join anything
    with pytest.raises(ValueError):
        ChatServer().user_token("ada")


def test_cli_private_rooms_and_user_tokens(capsys):
    """``chatlib user-token`` mints what ``serve --token T --private-room R`` accepts."""
    from chatlib.__main__ import main

    main(["user-token", "--user-secret", "k3y", "ａｄａ", "--room", "staff"])
    minted = capsys.readouterr().out.strip()
    with serve_cli("--token", "s3cret", "--user-secret", "k3y", "--private-room", "staff",
                   "--max-rooms", "5") as line:
        match = re.search(r"serving on (http://\S+/)", line)
        assert match, line
        base = match.group(1).rsplit("/t/", 1)[0] + "/"
        staff = {"room": "staff"}
        answer = httpx.get(base + "api/messages", params=staff, headers=bearer(minted),
                           timeout=10)
        assert answer.status_code == 200 and answer.json()["room"] == "staff"
        answer = httpx.get(base + "api/messages", params=staff, headers=bearer("s3cret"),
                           timeout=10)
        assert answer.status_code == 403
        for i in range(4):  # the default room and 4 more
            answer = httpx.post(base + "api/messages", params={"room": f"r{i}"},
                                headers=bearer("s3cret"), json={"user": "x", "text": "y"},
                                timeout=10)
            assert answer.status_code == 201, answer.text
        answer = httpx.post(base + "api/messages", params={"room": "r4"},
                            headers=bearer("s3cret"), json={"user": "x", "text": "y"},
                            timeout=10)
        assert answer.status_code == 429 and "rooms" in answer.json()["error"]


async def dm_on_a_stream(server, stream: dict, post: dict) -> dict:
    """The ``dm`` event an event stream opened with ``stream`` (httpx options) gets when
    ada posts in @ada+bob with ``post`` (httpx options)."""
    async with httpx.AsyncClient(timeout=T) as http:
        parser = SSEParser()
        async with http.stream("GET", server.url + "api/events", **stream) as response:
            assert response.status_code == 200
            await wait_for(lambda: server.hub.subscribed)
            answer = await http.post(server.url + "api/messages", params={"room": DM},
                                     json={"user": "ada", "text": "psst"}, **post)
            assert answer.status_code == 201
            async with asyncio.timeout(T):
                async for chunk in response.aiter_bytes():
                    events = [e for e in parser.feed(chunk) if e.event == "dm"]
                    if events:
                        return json.loads(events[0].data)
    raise AssertionError("the stream ended without a dm event")


async def test_an_event_stream_hears_of_direct_messages(tokens):
    server, token = tokens
    assert await dm_on_a_stream(server, {"headers": bearer(token["bob"])},
                                {"headers": bearer(token["ada"])}) == {"room": DM, "from": "ada"}


async def test_an_open_mode_event_stream_hears_of_its_users_direct_messages(start_chat):
    server = await start_chat(limits=LIMITS)
    assert await dm_on_a_stream(server, {"params": {"user": "bob"}}, {}) == {
        "room": DM, "from": "ada"}


async def wait_for(condition) -> None:
    async with asyncio.timeout(T):
        while not condition():  # bounded by the timeout
            await asyncio.sleep(0.005)


async def test_rooms_across_processes_on_redis(make_any_log, start_chat):
    """Two processes (here: two servers) on one Redis: a room's presence, typing and
    messages reach the other's clients in it, and a direct message the other user's
    connections on the other process, which does not follow that room."""
    from chatlib.redis_log import RedisLog

    first = await make_any_log("redis")
    second = RedisLog(first.url)
    try:
        one = await start_chat(log=first, limits=LIMITS)
        two = await start_chat(log=second, limits=LIMITS)
        ada = await ws_open(one, None, "ada", room="a")
        bob = await ws_open(two, None, "bob", room="a")
        try:
            async with asyncio.timeout(T):
                while True:  # bounded by the timeout: until ada sees bob
                    seen = await frame(ada, "presence")
                    if "bob" in seen["users"]:
                        break
            assert seen["room"] == "a"
            await bob.send(json.dumps({"type": "typing", "room": "a"}))
            assert await frame(ada, "typing") == {"type": "typing", "user": "bob", "room": "a"}
            await ada.send(json.dumps({"type": "join", "room": DM}))
            await frame(ada, "joined")
            await ada.send(json.dumps({"type": "message", "room": DM, "text": "psst"}))
            assert await frame(bob, "dm") == {"type": "dm", "room": DM, "from": "ada"}
        finally:
            await ada.close()
            await bob.close()
    finally:
        await second.close()
