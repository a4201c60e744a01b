"""Rooms and direct messages across real chat processes behind nginx (issue 23, the Redis
path): a process follows only its clients' rooms, and a client never sees another room's
or another pair's messages, directly, through nginx, after a resume and after failing over
to another process; private rooms and DMs are refused on every transport to whoever may
not read them.

Each test starts its own redis-server, chat processes and nginx (chatlib.cluster). The
clients here speak the wire directly (rooms-api.md's frames), one room each.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import httpx
import pytest
from redis_fixtures import require_programs
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from chatlib.cluster import Cluster
from chatlib.wire import SSEParser

pytestmark = pytest.mark.timeout(180)
T = 20.0
SECRET = "cluster-rooms-secret-0123456789"


@contextlib.asynccontextmanager
async def cluster_of(processes: int = 3, **options):
    require_programs("redis-server", "nginx")
    cluster = Cluster(processes=processes, port=0, **options)
    await cluster.start()
    try:
        yield cluster
    finally:
        await cluster.stop()


def ws_url(base: str, token: str | None = None) -> str:
    url = base.replace("http://", "ws://").rstrip("/") + "/ws"
    return url + (f"?token={token}" if token else "")


class Member:
    """A WebSocket client in one room: every event it got, by type."""

    def __init__(self, base: str, user: str, room: str, *, token: str | None = None) -> None:
        self.base, self.user, self.room, self.token = base, user, room, token
        self.events: list[dict] = []
        self.ws = None
        self._reader: asyncio.Task | None = None
        self.changed = asyncio.Event()

    @property
    def messages(self) -> list[dict]:
        return [e for e in self.events if e["type"] == "message"]

    @property
    def last_id(self) -> int:
        return max([m["id"] for m in self.messages], default=0)

    async def connect(self, base: str | None = None) -> Member:
        self.base = base or self.base
        self.ws = await ws_connect(ws_url(self.base, self.token), open_timeout=T)
        await self.ws.send(json.dumps({"type": "hello", "user": self.user,
                                       "after": self.last_id, "room": self.room}))
        self._reader = asyncio.ensure_future(self._read(self.ws))
        return self

    async def _read(self, ws) -> None:
        with contextlib.suppress(ConnectionClosed):
            async for raw in ws:
                self.events.append(json.loads(raw))
                self.changed.set()
        self.changed.set()

    async def send(self, data: dict) -> None:
        await self.ws.send(json.dumps(data))

    async def until(self, predicate, timeout: float = T) -> None:
        async with asyncio.timeout(timeout):
            while not predicate(self):  # bounded by the timeout
                self.changed.clear()
                await self.changed.wait()

    async def close(self) -> None:
        if self.ws is not None:
            await self.ws.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


async def post(http, base: str, room: str, user: str, text: str, token: str | None = None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return await http.post(base.rstrip("/") + "/api/messages", params={"room": room},
                           json={"user": user, "text": text}, headers=headers)


async def sse_first(http, base: str, query: str, count: int,
                    headers: dict | None = None) -> tuple[int, list[dict]]:
    """The status of ``GET /api/events?query`` and its first ``count`` message events."""
    parser, events = SSEParser(), []
    async with http.stream("GET", base.rstrip("/") + "/api/events?" + query,
                           headers=headers or {}) as stream:
        if stream.status_code != 200:
            return stream.status_code, []
        chunks = stream.aiter_bytes()
        async with asyncio.timeout(T):
            while len(events) < count:  # bounded by the timeout
                for event in parser.feed(await anext(chunks)):
                    if event.event == "message":
                        events.append(json.loads(event.data))
    return 200, events


async def test_a_room_never_sees_another_rooms_messages_across_processes_and_failover():
    async with cluster_of() as cluster, httpx.AsyncClient(timeout=T) as http:
        one, two, three = cluster.servers
        lab = await Member(one.url, "ada", "lab").connect()  # lab's only member: on one
        yard = await Member(two.url, "bob", "yard").connect()
        lobby = await Member(three.url, "cy", "lobby").connect()
        # A room's presence is the union over processes, and its own: yard's on three
        # lists bob (on two), not ada (lab) nor cy (the default room, on three itself).
        yard_too = await Member(three.url, "dee", "yard").connect()
        await yard_too.until(lambda m: any(e["type"] == "presence" and e["users"] == [
            "bob", "dee"] for e in m.events))
        lab_texts, yard_texts = [], []
        for i in range(4):  # posted where the room has nobody, and through nginx
            for room, texts, base in (("lab", lab_texts, three.url),
                                      ("yard", yard_texts, cluster.url)):
                texts.append(f"{room} {i}")
                response = await post(http, base, room, "zed", texts[-1])
                assert response.status_code == 201, response.text
                assert (response.json()["id"], response.json()["room"]) == (i + 1, room)
        await lab.until(lambda m: len(m.messages) >= 4)
        await yard.until(lambda m: len(m.messages) >= 4)
        assert [(m["id"], m["text"], m["room"]) for m in lab.messages] == [
            (i + 1, text, "lab") for i, text in enumerate(lab_texts)]
        assert [m["text"] for m in yard.messages] == yard_texts
        # The long-poll cursor and the SSE resume header read their own room only.
        polled = (await http.get(cluster.url + "api/messages",
                                 params={"room": "yard", "after": 2})).json()
        assert [m["text"] for m in polled["messages"]] == yard_texts[2:]
        status, resumed = await sse_first(http, cluster.url, "room=lab", 2,
                                          {"Last-Event-ID": "2"})
        assert status == 200 and [m["text"] for m in resumed] == lab_texts[2:]

        one.kill()  # lab's process dies; lab's member fails over, resuming from its cursor
        for i in range(4, 6):
            for room, texts in (("lab", lab_texts), ("yard", yard_texts)):
                texts.append(f"{room} {i}")
                assert (await post(http, two.url, room, "zed", texts[-1])).status_code == 201
        await lab.close()
        await lab.connect(cluster.url)  # nginx: to a live process
        await lab.until(lambda m: len(m.messages) >= 6)
        await yard.until(lambda m: len(m.messages) >= 6)
        assert [(m["id"], m["text"]) for m in lab.messages] == [
            (i + 1, text) for i, text in enumerate(lab_texts)]  # no gap, nothing doubled
        assert [m["text"] for m in yard.messages] == yard_texts
        assert lobby.messages == []  # the default room heard none of it
        for member in (lab, yard, lobby, yard_too):
            assert all(e.get("room", "lobby") == member.room for e in member.events
                       if e["type"] in ("message", "presence", "typing")), member.user
            await member.close()


async def test_private_rooms_and_direct_messages_across_processes():
    async with cluster_of(token=SECRET, private_rooms=("staff",)) as cluster, \
            httpx.AsyncClient(timeout=T) as http:
        one, two, three = cluster.servers
        ada, bob = cluster.user_token("ada", ("staff",)), cluster.user_token("bob")
        dm = "@ada+bob"
        staff = await Member(one.url, "ada", "staff", token=ada).connect()
        bob_lobby = await Member(two.url, "bob", "lobby", token=bob).connect()
        # bob may not read or post in staff, on any transport, on any process.
        await bob_lobby.send({"type": "join", "room": "staff", "after": 0})
        await bob_lobby.until(lambda m: any(e["type"] == "error" for e in m.events))
        [error] = [e for e in bob_lobby.events if e["type"] == "error"]
        assert error["room"] == "staff" and error["error"].startswith("forbidden"), error
        for base in (cluster.url, three.url):
            headers = {"Authorization": f"Bearer {bob}"}
            assert (await post(http, base, "staff", "bob", "let me in", bob)).status_code \
                == 403
            assert (await http.get(base + "api/messages", headers=headers,
                                   params={"room": "staff", "after": 0})).status_code == 403
            status, _ = await sse_first(http, base, "room=staff", 1,
                                        {**headers, "Last-Event-ID": "0"})
            assert status == 403
        # ada posts in staff on another process: staff's member (on one) gets it.
        assert (await post(http, three.url, "staff", "ada", "staff only", ada)).status_code \
            == 201
        await staff.until(lambda m: len(m.messages) == 1)
        # ada writes bob a DM on process three; bob, on two, hears of it and joins.
        response = await post(http, three.url, dm, "ada", "psst", ada)
        assert response.status_code == 201, response.text
        await bob_lobby.until(lambda m: any(e["type"] == "dm" for e in m.events))
        [notice] = [e for e in bob_lobby.events if e["type"] == "dm"]
        assert (notice["room"], notice["from"]) == (dm, "ada")
        await bob_lobby.send({"type": "join", "room": dm, "after": 0})
        await bob_lobby.until(lambda m: any(e.get("room") == dm for e in m.messages))
        assert [(e["text"], e["user"]) for e in bob_lobby.messages if e.get("room") == dm] \
            == [("psst", "ada")]
        # cy (a user token of its own, or the shared token) never reads the pair's room.
        cy = cluster.user_token("cy")
        for token in (cy, SECRET):
            assert (await http.get(cluster.url + "api/messages", params={
                "room": dm, "after": 0, "user": "cy"},
                headers={"Authorization": f"Bearer {token}"})).status_code == 403
        intruder = await Member(three.url, "cy", "lobby", token=cy).connect()
        await intruder.send({"type": "join", "room": dm, "after": 0})
        await intruder.until(lambda m: any(e["type"] == "error" for e in m.events))
        assert not any(e.get("room") == dm for e in intruder.events if e["type"] != "error")
        assert not any(e.get("room") == "staff" for e in bob_lobby.events
                       if e["type"] != "error")
        for member in (staff, bob_lobby, intruder):
            await member.close()
