"""The HTTP transport: posting (``POST /api/messages``, ``/api/typing``), polling and long
polling (``GET /api/messages``), and who is here (``GET /api/presence``).

Every route is about one room: ``?room=NAME`` (chatlib.rooms), the default room without
it. A room the client may not join is refused (403) before anything is read or stored."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from types import MappingProxyType
from urllib.parse import parse_qsl

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import request_response

from . import wire
from .admission import BUSY_ERROR
from .auth import GRANT
from .fastpath import server_send
from .hub import Answer, Hub
from .rooms import Rooms
from .store import DEFAULT_ROOM
from .validation import (
    ChatError,
    client_id,
    float_param,
    int_param,
    message_text,
    nickname,
    optional_user,
    room_name,
)
from .web import JSONBody, address, read_json, wait_disconnect


def rate_check(request: Request, user: str) -> None:
    budget = request.app.state.budget
    if not budget.allow(address(request.scope), user=user):
        raise ChatError(429, "too many messages: slow down",
                        budget.retry_after(address(request.scope), user=user))


NO_QUERY: Mapping[str, str] = MappingProxyType({})


def query_params(scope) -> Mapping[str, str]:
    """The request's query parameters, as Starlette's ``QueryParams`` reads them (the last
    value of a repeated name) in a plain dict, and an empty query string not parsed at
    all (a ``POST``'s, usually: every post reads its room from it)."""
    query = scope.get("query_string")
    if not query:
        return NO_QUERY
    return dict(parse_qsl(query.decode("latin-1"), keep_blank_values=True))


def room_of(params, limits, user: str, scope) -> str:
    """The request's room (``?room=``, the default room without it), checked: ChatError
    400 for a bad name, 403 for a room this client may not join (chatlib.rooms)."""
    room = room_name(params.get("room"), limits)
    if room != DEFAULT_ROOM or GRANT in scope:
        scope["app"].state.rooms.check(room, user, scope.get(GRANT))
    return room


async def poll(state, scope, receive=None) -> bytes | None:
    """``GET /api/messages``: the JSON body of the 200 answer, or None if the client hung up
    while its long poll waited (499). Raises ChatError (4xx) and StoreUnavailable (503).

    ``receive``: the request's ASGI ``receive``, watched for a hang-up while a long poll
    waits (:func:`until_disconnected`); None: the caller cancels this itself when its
    client hangs up (chatlib.pollpath)."""
    hub: Hub = state.hub
    limits = hub.limits
    params = query_params(scope)
    after = int_param(params, "after", 0)
    wait = min(max(float_param(params, "wait", 0.0), 0.0), limits.max_wait)
    user = optional_user(params, limits)
    if "room" in params:
        room = room_of(params, limits, user, scope)
        if room != DEFAULT_ROOM:
            rooms: Rooms = state.rooms
            async with rooms.using(room) as hub:
                return await poll_room(state, hub, receive, params, after, wait, user)
    elif GRANT in scope:
        room_of(params, limits, user, scope)
    return await poll_room(state, hub, receive, params, after, wait, user)


async def poll_room(state, hub: Hub, receive, params, after: int, wait: float,
                    user: str) -> bytes | None:
    """:func:`poll`, in ``hub``'s room."""
    limits = hub.limits
    if user:  # keeps a name that joined (POST /api/presence) present; adds none
        hub.presence.refresh(user)
    if "before" in params:  # an older page (the resume protocol's "history" marker)
        before = int_param(params, "before", 0)
        older = await hub.log.before(before, limits.history)
        first = await hub.log.first_id()
        return wire.dumps(wire.older_body(older, first, hub.room)).encode()
    if wait > 0:
        state.long_polls += 1  # parked now: ChatServer.stats
        try:
            waiting = hub.poll(after, wait)
            answer = await (waiting if receive is None else until_disconnected(receive, waiting))
        finally:
            state.long_polls -= 1
        if answer is None:
            return None
    else:
        answer = await hub.poll(after)
    return poll_answer(state, answer, hub.room)


POLL_HEADERS = [(b"content-type", b"application/json"), (b"cache-control", b"no-store")]


class Messages:
    """``/api/messages``: ``GET`` polls (long and short), ``POST`` posts.

    A raw ASGI endpoint, for the polls' sake: a function endpoint would run Starlette's
    ``Request``, ``Response`` and two exception-handling ``send`` wrappers for every
    answer, which a poll needs none of. Its errors still go to the app's handlers
    (ChatError's JSON, 503 with ``Retry-After``; nothing has been sent when they are
    raised) and its answer goes to the server's own send (chatlib.fastpath.server_send;
    bench/README.md, "Long polling: the floor"). A ``POST`` is an ordinary Starlette
    endpoint.
    """

    def __init__(self) -> None:
        self.post = request_response(post_message)

    async def __call__(self, scope, receive, send) -> None:
        if scope["method"] == "POST":
            await self.post(scope, receive, send)
            return
        body = await poll(scope["app"].state, scope, receive)
        status, headers = (200, POLL_HEADERS) if body is not None else (499, [])
        body = body or b""
        send = server_send(scope, send)
        try:
            await send({"type": "http.response.start", "status": status,
                        "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
        except OSError:  # uvicorn's ClientDisconnected: nobody to answer
            pass


async def until_disconnected(receive, work):
    """Await ``work``, or give up (``None``) if the client hangs up first.

    A long poll parks a handler for up to ``max_wait`` seconds; a client that gives up
    should free it at once rather than hold it until the timeout.

    Two tasks and asyncio.wait, on purpose: one watch task that cancels this one on a
    hang-up (no task for ``work``) answers a loop step sooner, with fewer messages per
    answer, and costs more per delivery (bench/README.md, "Long polling: the floor").
    """
    waiting = asyncio.ensure_future(work)
    watching = asyncio.ensure_future(wait_disconnect(receive))
    try:
        await asyncio.wait({waiting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not waiting.done():
            waiting.cancel()
    return waiting.result() if waiting.done() and not waiting.cancelled() else None


def poll_answer(state, answer: Answer, room: str = DEFAULT_ROOM) -> bytes:
    """The JSON body of ``answer``, shared by every poll that gets the same one.

    After a message, every long poll parked at the same cursor wakes and gets the same
    messages: the answer is encoded once (the last one is kept, per app) and sent to
    each. Equal lists of (frozen) messages make equal bodies, so a replaced log can't be
    answered from the cache with its predecessor's texts.
    """
    cached = getattr(state, "poll_answer", None)
    if cached is not None and cached[0] == answer and cached[2] == room:
        return cached[1]
    body = wire.dumps(wire.messages_body(answer.messages, answer.last_id,
                                         answer.resume.events(), room)).encode()
    state.poll_answer = (answer, body, room)
    return body


async def post_message(request: Request) -> Response:
    """201 and the stored message; a repeat of (user, client_id): 200 and the original.

    The client id comes in the body (``"client_id"``) or in an ``Idempotency-Key`` header
    (the IETF httpapi draft's name for it); both at once must agree.
    """
    hub: Hub = request.app.state.hub
    data = await read_json(request, hub.limits)
    user = nickname(data, hub.limits)
    room = room_of(query_params(request.scope), hub.limits, user, request.scope)
    text = message_text(data, hub.limits)
    cid = client_id(data.get("client_id"))
    key = client_id(request.headers.get("idempotency-key"), "Idempotency-Key")
    if cid is not None and key is not None and cid != key:
        raise ChatError(400, "client_id and Idempotency-Key differ")
    rate_check(request, user)
    async with in_room(request, room) as hub:
        message, duplicate = await hub.post(user, text, cid or key)
    return JSONBody(message.to_dict(), status_code=200 if duplicate else 201)


def in_room(request: Request, room: str):
    """The hub of ``room`` for this request (chatlib.rooms.Rooms.using)."""
    rooms: Rooms = request.app.state.rooms
    return rooms.using(room)


async def typing(request: Request) -> Response:
    hub: Hub = request.app.state.hub
    user = nickname(await read_json(request, hub.limits), hub.limits)
    room = room_of(query_params(request.scope), hub.limits, user, request.scope)
    rate_check(request, user)
    async with in_room(request, room) as hub:
        hub.typing(user)
    return Response(status_code=204)


async def presence(request: Request) -> Response:
    """``GET``: who is here. ``POST {"user": NAME}``: NAME joins the presence list as an HTTP
    client (polling or SSE) for ``presence_ttl`` seconds, refreshed by its polls (or held
    by its event stream), and gets the list.

    Joining is POST-only: a GET is what any page can make the browser send to any port
    with an ``<img>``, no Origin and no preflight, so a GET that added a name let another
    page on 127.0.0.1 add fake ones (issue 18). A POST must pass the Origin and
    Content-Type checks (chatlib.guard). One address may add names at most at
    ``new_names_rate`` and hold ``polled_per_address`` of them (429 beyond, with
    ``Retry-After``).
    """
    hub: Hub = request.app.state.hub
    limits = hub.limits
    params = query_params(request.scope)
    if request.method == "POST":
        user = nickname(await read_json(request, limits), limits)
    else:
        user = optional_user(params, limits)
    room = room_of(params, limits, user, request.scope)
    async with in_room(request, room) as hub:
        if request.method == "POST":
            if not hub.presence.refresh(user):  # a new polling session (a name here is not)
                rooms: Rooms = request.app.state.rooms
                if rooms.polled_in(user) >= limits.rooms_per_client:
                    raise ChatError(429, "too many rooms for one polling user"
                                         f" (at most {limits.rooms_per_client})")
                wait = hub.admission.admit()
                if wait is not None:
                    raise ChatError(503, BUSY_ERROR, wait)
            refused, retry_after = hub.presence.touch(user, address(request.scope))
            if refused:
                raise ChatError(429, refused, retry_after)
        return JSONBody({**hub.presence.event(), **hub.tag})
