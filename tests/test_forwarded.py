"""Forwarded headers are believed from a configured proxy only, and nginx logs no tokens.

Every client on this machine comes from 127.0.0.1. uvicorn believes ``X-Forwarded-For`` from
127.0.0.1 by default, so a client that sent a new one with every request escaped every
per-address budget (issue 18: 600 of 600 POSTs accepted, 110 without the header). Now the
server believes nobody's unless told (``forwarded_allow_ips``), and deploy/nginx.conf sets
the header to the address its client connected from instead of appending to the client's.
"""

from __future__ import annotations

import httpx
import pytest
from redis_fixtures import require_programs

from chatlib import Limits
from chatlib.cluster import NginxProcess

# One address may send 5 messages, then one per 100 s: the sixth from one address is a 429.
BUDGET = 5
TIGHT = Limits(rate=0.01, burst=BUDGET, address_rate=0.01, address_burst=BUDGET)


async def rotating_posts(http: httpx.AsyncClient, url: str, count: int, prefix: str) -> list[int]:
    """``count`` POSTs, each with a new nickname and a new X-Forwarded-For: the statuses."""
    statuses = []
    for i in range(count):
        response = await http.post(url + "api/messages",
                                   json={"user": f"{prefix}{i}", "text": "hi"},
                                   headers={"X-Forwarded-For": f"10.9.{i // 250}.{i % 250}"})
        statuses.append(response.status_code)
    return statuses


async def test_forwarded_for_from_loopback_is_not_believed_by_default(start_chat):
    server = await start_chat(limits=TIGHT)
    async with httpx.AsyncClient() as http:
        statuses = await rotating_posts(http, server.url, 3 * BUDGET, "r")
    assert statuses == [201] * BUDGET + [429] * (2 * BUDGET)


async def test_forwarded_for_is_believed_from_a_configured_proxy(start_chat):
    server = await start_chat(limits=TIGHT, forwarded_allow_ips="127.0.0.1")
    async with httpx.AsyncClient() as http:
        statuses = await rotating_posts(http, server.url, 3 * BUDGET, "p")
    assert statuses == [201] * (3 * BUDGET)  # each "client" its own address, as told


@pytest.fixture
async def nginx_in_front(tmp_path):
    """A factory: nginx (deploy/nginx.conf, as chatlib.cluster fills it in) before a port."""
    require_programs("nginx")
    started: list[NginxProcess] = []

    async def start(upstream: int) -> NginxProcess:
        nginx = NginxProcess(tmp_path / "nginx", [upstream])
        started.append(nginx)
        await nginx.start()
        return nginx

    try:
        yield start
    finally:
        for nginx in started:
            await nginx.stop()


async def test_behind_nginx_each_real_client_keeps_its_own_budget(start_chat, nginx_in_front):
    # As chatlib.cluster runs it: the chat believes nginx (127.0.0.1) only.
    server = await start_chat(limits=TIGHT, forwarded_allow_ips="127.0.0.1")
    nginx = await nginx_in_front(server.port)
    async with httpx.AsyncClient() as rotating:  # from 127.0.0.1, a new header per POST
        statuses = await rotating_posts(rotating, nginx.url, 3 * BUDGET, "n")
    assert statuses == [201] * BUDGET + [429] * (2 * BUDGET)
    # Another client (another loopback address) still has its whole budget: the chat saw
    # the address each client connected to nginx from, not nginx's own.
    other = httpx.AsyncHTTPTransport(local_address="127.0.0.2")
    async with httpx.AsyncClient(transport=other) as http:
        response = await http.post(nginx.url + "api/messages",
                                   json={"user": "other", "text": "hi"})
    assert response.status_code == 201, response.text


async def test_nginx_logs_requests_without_their_query_string(start_chat, nginx_in_front):
    server = await start_chat(token="s3cret-token-value")
    nginx = await nginx_in_front(server.port)
    async with httpx.AsyncClient() as http:
        response = await http.get(nginx.url + "api/messages",
                                  params={"after": 0, "token": "s3cret-token-value"})
    assert response.status_code == 200, response.text
    log = (nginx.directory / "access.log").read_text()
    assert '"GET /api/messages HTTP/1.1" 200' in log
    assert "s3cret" not in log and "after=" not in log
