"""The WebSocket, end to end: real hypercorn processes, a real WebSocket client."""

import asyncio
import base64
import json
import os
import secrets
import signal
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from taskflow.config import Config

from .conftest import (
    ON_POSTGRES,
    PASSWORD,
    TEST_REDIS_URL,
    free_port,
    hypercorn,
    live_server,
    running,
)

Json = dict[str, Any]


class Api:
    """A user of a live server, over HTTP."""

    def __init__(self, http: httpx.AsyncClient, email: str, token: str, user_id: str) -> None:
        self.http, self.email, self.token, self.id = http, email, token, user_id

    @classmethod
    async def register(cls, http: httpx.AsyncClient) -> "Api":
        email = f"ws-{secrets.token_hex(6)}@example.com"
        user = await http.post("/auth/register", json={"email": email, "password": PASSWORD})
        tokens = await http.post("/auth/login", json={"email": email, "password": PASSWORD})
        return cls(http, email, tokens.json()["access_token"], user.json()["id"])

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def call(self, method: str, url: str, body: Any = None, expect: int = 200) -> Any:
        response = await self.http.request(method, url, json=body, headers=self.headers)
        assert response.status_code == expect, response.text
        return response.json() if response.content else None

    async def project(self, *members: "Api") -> Json:
        project: Json = await self.call("POST", "/projects", {"name": "Live"}, 201)
        for member in members:
            await self.call(
                "POST", f"/projects/{project['id']}/members", {"email": member.email}, 201
            )
        return project

    async def task(self, project: Json, title: str = "t", **fields: Any) -> Json:
        task: Json = await self.call(
            "POST", f"/projects/{project['id']}/tasks", {"title": title, **fields}, 201
        )
        return task


@pytest.fixture
async def server(config: Config, environ: dict[str, str]) -> AsyncIterator[str]:
    """One live instance; the tables are emptied after the test."""
    async with running(config), live_server(environ) as url:
        yield url


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://") + "/ws"


async def connect(url: str, user: Api | None = None, **options: Any) -> ClientConnection:
    headers = user.headers if user else {}
    return await websockets.connect(ws_url(url), additional_headers=headers, **options)


async def receive(ws: ClientConnection, timeout: float = 5) -> Json:
    message: Json = json.loads(await asyncio.wait_for(ws.recv(), timeout))
    return message


async def ready(url: str, user: Api, **options: Any) -> ClientConnection:
    ws = await connect(url, user, **options)
    assert await receive(ws) == {"type": "ready", "user_id": user.id}
    return ws


async def subscribe(ws: ClientConnection, project: Json, since: int | None = None) -> list[Json]:
    """Subscribe; return the replayed events, up to and checking the `subscribed` frame."""
    frame: Json = {"type": "subscribe", "project_id": project["id"]}
    if since is not None:
        frame["since"] = since
    await ws.send(json.dumps(frame))
    replayed = []
    while True:
        message = await receive(ws)
        if message["type"] == "subscribed":
            assert message["project_id"] == project["id"]
            return replayed
        replayed.append(message)


async def events_until(ws: ClientConnection, count: int, timeout: float = 10) -> list[Json]:
    events: list[Json] = []
    while len(events) < count:
        message = await receive(ws, timeout)
        if message["type"] == "event":
            events.append(message)
    return events


async def close_code(ws: ClientConnection, timeout: float = 12) -> int | None:
    try:
        async with asyncio.timeout(timeout):
            async for _ in ws:
                pass
    except websockets.ConnectionClosed:
        pass
    return ws.close_code


@pytest.fixture
async def http(server: str) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server, timeout=30) as client:
        yield client


async def test_handshake_auth_subscribe_and_live_events(
    server: str, http: httpx.AsyncClient
) -> None:
    owner, member = await Api.register(http), await Api.register(http)
    project = await owner.project(member)
    async with await ready(server, member) as ws:
        assert await subscribe(ws, project) == []
        task = await owner.task(project, "Live one")
        (event,) = await events_until(ws, 1)
        feed = await owner.call("GET", f"/projects/{project['id']}/events")
        assert event == feed["items"][-1]
        assert (event["event"], event["data"], event["actor_id"]) == (
            "task.created",
            task,
            owner.id,
        )

        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}
        await ws.send(json.dumps({"type": "unsubscribe", "project_id": project["id"]}))
        assert await receive(ws) == {"type": "unsubscribed", "project_id": project["id"]}
        await owner.task(project, "unseen")
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}  # and no event before it


async def test_subscribed_names_the_last_event(server: str, http: httpx.AsyncClient) -> None:
    owner = await Api.register(http)
    project = await owner.project()
    await owner.task(project)
    feed = await owner.call("GET", f"/projects/{project['id']}/events")
    async with await ready(server, owner) as ws:
        await ws.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
        message = await receive(ws)
        assert message == {
            "type": "subscribed",
            "project_id": project["id"],
            "last_event_id": feed["items"][-1]["id"],
        }


async def test_authentication_by_first_message(server: str, http: httpx.AsyncClient) -> None:
    user = await Api.register(http)
    async with await connect(server) as ws:
        await ws.send(json.dumps({"type": "auth", "token": user.token}))
        assert await receive(ws) == {"type": "ready", "user_id": user.id}


@pytest.mark.parametrize(
    "first",
    [
        {"type": "auth", "token": "not-a-token"},
        {"type": "ping"},
        "not json",
    ],
)
async def test_bad_first_messages_close_4401(server: str, first: Any) -> None:
    async with await connect(server) as ws:
        await ws.send(first if isinstance(first, str) else json.dumps(first))
        assert await close_code(ws) == 4401


async def test_bad_handshake_token_closes_4401(server: str, http: httpx.AsyncClient) -> None:
    user = await Api.register(http)
    for header in ("Bearer nonsense", f"Basic {user.token}"):
        ws = await websockets.connect(ws_url(server), additional_headers={"Authorization": header})
        assert await close_code(ws) == 4401


async def test_silence_closes_4401_after_10_seconds(server: str) -> None:
    started = time.monotonic()
    async with await connect(server) as ws:
        assert await close_code(ws, timeout=15) == 4401
    assert 9 < time.monotonic() - started < 14


async def test_protocol_errors_keep_the_connection(server: str, http: httpx.AsyncClient) -> None:
    user, stranger = await Api.register(http), await Api.register(http)
    project = await stranger.project()
    async with await ready(server, user) as ws:
        for bad in (
            "{not json",
            json.dumps({"type": "dance"}),
            json.dumps({"type": "subscribe"}),
            json.dumps({"type": "subscribe", "project_id": "not-a-uuid"}),
            json.dumps({"type": "subscribe", "project_id": project["id"], "since": -1}),
            json.dumps([1, 2]),
            b"\x00\x01binary",
        ):
            await ws.send(bad)
            assert await receive(ws) == {"type": "error", "code": "bad_message"}
        await ws.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
        assert await receive(ws) == {
            "type": "error",
            "code": "not_found",
            "project_id": project["id"],
        }
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}

        await ws.send(json.dumps({"type": "ping", "pad": "x" * (64 * 1024)}))
        assert await close_code(ws) == 1009


async def test_resume_with_since_gets_every_event_exactly_once(
    server: str, http: httpx.AsyncClient
) -> None:
    owner = await Api.register(http)
    project = await owner.project()
    async with await ready(server, owner) as ws:
        await subscribe(ws, project)
        await owner.task(project, "seen")
        (seen,) = await events_until(ws, 1)
    missed = [await owner.task(project, f"missed {n}") for n in range(5)]
    async with await ready(server, owner) as ws:
        replayed = await subscribe(ws, project, since=seen["id"])
        assert [event["data"]["id"] for event in replayed] == [task["id"] for task in missed]
        await owner.task(project, "live")
        (live,) = await events_until(ws, 1)
        assert live["data"]["title"] == "live" and live["id"] > replayed[-1]["id"]


async def test_resume_while_writes_continue_has_no_gap_or_duplicate(
    server: str, http: httpx.AsyncClient
) -> None:
    owner = await Api.register(http)
    project = await owner.project()
    first = await owner.task(project, "first")
    feed = await owner.call("GET", f"/projects/{project['id']}/events")
    since = feed["items"][0]["id"]  # project.created

    async def write(count: int) -> None:
        for n in range(count):
            await owner.call("PATCH", f"/tasks/{first['id']}", {"title": f"v{n}"})

    writer = asyncio.create_task(write(40))
    await asyncio.sleep(0.05)
    async with await ready(server, owner) as ws:
        events = await subscribe(ws, project, since=since)
        await writer
        total = 1 + 40  # task.created, then the updates
        events += await events_until(ws, total - len(events))
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}
    ids = [event["id"] for event in events]
    assert ids == sorted(set(ids)) and len(ids) == total


async def test_no_event_reaches_a_non_member(server: str, http: httpx.AsyncClient) -> None:
    owner, outsider = await Api.register(http), await Api.register(http)
    project, theirs = await owner.project(), await outsider.project()
    async with await ready(server, outsider) as ws, await ready(server, owner) as watcher:
        await subscribe(ws, theirs)
        await subscribe(watcher, project)
        await ws.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
        assert (await receive(ws))["code"] == "not_found"
        task = await owner.task(project)
        for n in range(300):
            await owner.call("PATCH", f"/tasks/{task['id']}", {"title": f"secret {n}"})
        await events_until(watcher, 301)  # every event was out
        await outsider.task(theirs, "mine")
        mine = await events_until(ws, 1)
        assert mine[0]["project_id"] == theirs["id"]
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}


async def test_removal_stops_events_within_a_second(server: str, http: httpx.AsyncClient) -> None:
    owner, member = await Api.register(http), await Api.register(http)
    project = await owner.project(member)
    async with await ready(server, member) as ws:
        await subscribe(ws, project)
        started = time.monotonic()
        await owner.call("DELETE", f"/projects/{project['id']}/members/{member.id}", expect=204)
        message = await receive(ws, timeout=1)
        assert time.monotonic() - started < 1
        assert message == {
            "type": "unsubscribed",
            "project_id": project["id"],
            "reason": "removed",
        }
        await owner.task(project, "after removal")
        await ws.send(json.dumps({"type": "ping"}))
        assert await receive(ws) == {"type": "pong"}


async def test_a_deleted_project_unsubscribes(server: str, http: httpx.AsyncClient) -> None:
    owner, member = await Api.register(http), await Api.register(http)
    project = await owner.project(member)
    async with await ready(server, member) as ws:
        await subscribe(ws, project)
        await owner.call("DELETE", f"/projects/{project['id']}", expect=204)
        deleted = await receive(ws)
        assert (deleted["type"], deleted["event"]) == ("event", "project.deleted")
        assert await receive(ws) == {
            "type": "unsubscribed",
            "project_id": project["id"],
            "reason": "project_deleted",
        }


async def test_logout_closes_the_socket(server: str, http: httpx.AsyncClient) -> None:
    user = await Api.register(http)
    async with await ready(server, user) as ws:
        started = time.monotonic()
        await user.call("POST", "/auth/logout", expect=204)
        assert await close_code(ws, timeout=6) == 4401
        assert time.monotonic() - started < 5


def stalled_subscriber(url: str, user: Api, project: Json) -> socket.socket:
    """A client that subscribes and then never reads: a tiny receive window,
    and nothing taken out of it."""
    port = int(url.rsplit(":", 1)[1])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
            f"Sec-WebSocket-Version: 13\r\nAuthorization: Bearer {user.token}\r\n\r\n"
        ).encode()
    )
    payload = json.dumps({"type": "subscribe", "project_id": project["id"]}).encode()
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[i % 4] for i, byte in enumerate(payload))
    sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
    return sock


async def test_a_stalled_client_does_not_delay_others(
    config: Config, environ: dict[str, str]
) -> None:
    small_queue = {**environ, "TASKFLOW_WS_SEND_QUEUE": "16"}
    async with running(config), live_server(small_queue) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            owner = await Api.register(http)
            project = await owner.project()
            task = await owner.task(project)
            stalled = stalled_subscriber(url, owner, project)
            async with await ready(url, owner) as ws:
                await subscribe(ws, project)
                await asyncio.sleep(0.2)
                delays = []
                for n in range(150):  # ~30 KB an event: megabytes for the stalled one
                    body = {"description": f"{n}" + "d" * 9_990}
                    await owner.call("PATCH", f"/tasks/{task['id']}", body)
                    sent = time.monotonic()
                    (event,) = await events_until(ws, 1)
                    delays.append(time.monotonic() - sent)
                    assert event["data"]["description"].startswith(f"{n}d")
            stalled.close()
    # Every event reached the reader promptly, whatever the stalled one did.
    assert max(delays) < 1, max(delays)


async def test_message_flood_is_rate_limited(config: Config, environ: dict[str, str]) -> None:
    limited = {**environ, "TASKFLOW_WS_MESSAGES_PER_SECOND": "5"}
    async with running(config), live_server(limited) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            user = await Api.register(http)
            async with await ready(url, user) as ws:
                for _ in range(20):
                    await ws.send(json.dumps({"type": "ping"}))
                replies = [(await receive(ws))["type"] for _ in range(20)]
    assert replies.count("pong") <= 6
    assert replies.count("error") >= 14


async def test_connections_per_user_are_rate_limited(
    config: Config, environ: dict[str, str]
) -> None:
    limited = {**environ, "TASKFLOW_WS_CONNECTIONS_PER_MINUTE": "3"}
    async with running(config), live_server(limited) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            user = await Api.register(http)
            for _ in range(3):
                ws = await ready(url, user)
                await ws.close()
            ws = await connect(url, user)
            assert await close_code(ws) == 4429


async def test_sigterm_closes_sockets_with_1012_and_exits(
    config: Config, environ: dict[str, str]
) -> None:
    async with (
        running(config),
        hypercorn(environ, workers=2, graceful_timeout=20) as (url, process),
    ):
        async with httpx.AsyncClient(base_url=url) as http:
            user = await Api.register(http)
            sockets = [await ready(url, user) for _ in range(4)]
            started = time.monotonic()
            os.killpg(process.pid, signal.SIGTERM)  # as a platform stops a dyno
            codes = [await close_code(ws, timeout=10) for ws in sockets]
            exit_code = await asyncio.wait_for(process.wait(), 25)
    assert codes == [1012] * 4
    assert exit_code == 0
    assert time.monotonic() - started < 20


@pytest.mark.skipif(not TEST_REDIS_URL, reason="two instances share events through Redis")
async def test_a_write_through_one_instance_reaches_a_subscriber_on_another(
    config: Config, environ: dict[str, str]
) -> None:
    async with running(config), live_server(environ) as a, live_server(environ) as b:
        async with httpx.AsyncClient(base_url=a) as http_a:
            owner = await Api.register(http_a)
            project = await owner.project()
            async with await ready(b, owner) as ws:
                await subscribe(ws, project)
                task = await owner.task(project, "across")
                (event,) = await events_until(ws, 1)
                assert event["data"] == task


@asynccontextmanager
async def private_redis(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Redis of this test's own, to stop and start at will."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@pytest.mark.skipif(not ON_POSTGRES, reason="two instances need PostgreSQL")
async def test_redis_restarting_mid_stream_loses_no_event(
    config: Config, environ: dict[str, str]
) -> None:
    redis_port = free_port()
    shared = {**environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"}
    async with private_redis(redis_port) as redis_server, running(config):
        async with live_server(shared) as a, live_server(shared) as b:
            async with httpx.AsyncClient(base_url=a, timeout=30) as http:
                owner = await Api.register(http)
                project = await owner.project()
                task = await owner.task(project)
                statuses: list[int] = []

                async def write(count: int) -> None:
                    for n in range(count):
                        response = await http.patch(
                            f"/tasks/{task['id']}", json={"title": f"v{n}"}, headers=owner.headers
                        )
                        statuses.append(response.status_code)
                        await asyncio.sleep(0.02)

                async with await ready(b, owner) as ws:
                    await subscribe(ws, project)
                    writer = asyncio.create_task(write(150))
                    await asyncio.sleep(0.8)
                    redis_server.kill()  # Redis dies mid-stream...
                    await redis_server.wait()
                    await asyncio.sleep(1.5)
                    async with private_redis(redis_port):  # ...and comes back
                        await writer
                        received = await events_until(ws, 150, timeout=15)
                        feed = await owner.call(
                            "GET", f"/projects/{project['id']}/events?limit=1000"
                        )
    assert statuses == [200] * 150  # REST kept answering through the outage
    updates = [event for event in feed["items"] if event["event"] == "task.updated"]
    assert [event["id"] for event in received] == [event["id"] for event in updates]
    assert received == updates


async def test_abuse_leaves_the_server_up_and_others_served(
    server: str, http: httpx.AsyncClient
) -> None:
    owner = await Api.register(http)
    project = await owner.project()
    # A thousand connections that never authenticate...
    idle = await asyncio.gather(*(connect(server) for _ in range(1000)))
    async with await ready(server, owner) as reader, await ready(server, owner) as flooder:
        await subscribe(reader, project)
        # ...a flood of subscribes, malformed and binary frames on another socket...
        for n in range(200):
            await flooder.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
            await flooder.send(b"\xff" * 100 if n % 2 else "{broken")
        # ...and another client's events keep flowing.
        for n in range(20):
            await owner.task(project, f"during abuse {n}")
        events = await events_until(reader, 20)
        assert [event["data"]["title"] for event in events] == [
            f"during abuse {n}" for n in range(20)
        ]
    codes = await asyncio.gather(*(close_code(ws, timeout=20) for ws in idle))
    assert set(codes) == {4401}
    assert (await http.get("/healthz")).status_code == 200
