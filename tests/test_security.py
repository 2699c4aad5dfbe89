"""Who is calling: checked before the body is read, without holding the
database, and a token that fails the check cannot spend its user's limit."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import asyncpg
import httpx
import redis.asyncio as aioredis
from quart.typing import TestClientProtocol as Client
from sqlalchemy.engine import make_url

from taskflow.config import Config, normalize_database_url

from .support import (
    ON_POSTGRES,
    TEST_REDIS_URL,
    TestUser,
    create_user,
    live_server,
    register_user,
    running,
)

SLOW_BODIES = 12  # more than the pool's 10 connections


@contextmanager
def slow_posts(url: str, user: TestUser, count: int) -> Iterator[list[socket.socket]]:
    """*count* POSTs whose headers arrive at once and whose bodies never finish."""
    port = int(url.rsplit(":", 1)[1])
    sockets = []
    try:
        for _ in range(count):
            sock = socket.create_connection(("127.0.0.1", port))
            sock.sendall(
                (
                    f"POST /projects HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    f"Authorization: Bearer {user.access_token}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
                ).encode()
            )
            sockets.append(sock)
        yield sockets
    finally:
        for sock in sockets:
            sock.close()


async def idle_in_transaction(database_url: str) -> int:
    url = make_url(normalize_database_url(database_url))
    connection = await asyncpg.connect(
        host=url.host, port=url.port or 5432, user=url.username, database=url.database
    )
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'taskflow' "
            "AND state LIKE 'idle in transaction%' AND datname = current_database()"
        )
        return count
    finally:
        await connection.close()


async def test_slow_bodies_hold_no_connection_and_starve_no_one(
    config: Config, environ: dict[str, str]
) -> None:
    async with running(config), live_server(environ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            slow, other = await register_user(http), await register_user(http)
            if TEST_REDIS_URL:  # no session mark: the check goes to the database
                redis = aioredis.from_url(TEST_REDIS_URL)
                marks = [key async for key in redis.scan_iter("taskflow:session:*")]
                if marks:
                    await redis.delete(*marks)
                await redis.aclose()
            with slow_posts(url, slow, SLOW_BODIES) as sockets:
                await asyncio.sleep(1)
                for sock in sockets:  # a byte now and then: the body keeps coming
                    sock.sendall(b" ")
                if ON_POSTGRES:
                    assert await idle_in_transaction(environ["DATABASE_URL"]) == 0
                timings = []
                for n in range(5):
                    started = time.monotonic()
                    me = await http.get("/auth/me", headers=other.headers)
                    made = await http.post(
                        "/projects", json={"name": f"p{n}"}, headers=other.headers
                    )
                    timings.append(time.monotonic() - started)
                    assert (me.status_code, made.status_code) == (200, 201), made.text
    assert max(timings) < 2, timings


async def test_a_revoked_sessions_token_spends_its_address_limit_not_its_users(
    environ: dict[str, str],
) -> None:
    limited = {
        **environ,
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": "5",
        "TASKFLOW_TRUSTED_PROXY_HOPS": "1",
    }
    async with running(Config.from_env(limited)) as app:
        client: Client = app.test_client()
        user = await create_user(client)
        old = user.headers
        assert (await client.post("/auth/logout", headers=old)).status_code == 204
        statuses = [
            (
                await client.get("/auth/me", headers={**old, "X-Forwarded-For": "10.0.0.1"})
            ).status_code
            for _ in range(8)
        ]
        assert set(statuses[:5]) == {401} and set(statuses[5:]) == {429}, statuses
        tokens = await (
            await client.post(
                "/auth/login",
                json={"email": user.email, "password": user.password},
                headers={"X-Forwarded-For": "10.0.0.2"},
            )
        ).get_json()
        fresh = {"Authorization": f"Bearer {tokens['access_token']}", "X-Forwarded-For": "10.0.0.3"}
        response = await client.get("/auth/me", headers=fresh)
        assert response.status_code == 200, await response.get_json()
