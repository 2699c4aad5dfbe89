"""The Redis cache of memberships and tasks: never a stale read, on any instance."""

import asyncio
import uuid
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow import cache
from taskflow.cache import ENTRY_SECONDS, GENERATION_SECONDS
from taskflow.config import Config
from taskflow.data.tasks import TaskDocument, task_key
from taskflow.jsonio import dumps

from .support import (
    ON_POSTGRES,
    TEST_REDIS_URL,
    TestUser,
    create_task,
    create_user,
    free_port,
    live_server,
    private_redis,
    redis_only,
    register_user,
    running,
)

two_instances = pytest.mark.skipif(
    not (ON_POSTGRES and TEST_REDIS_URL), reason="two instances share PostgreSQL and Redis"
)


class Caller:
    """A user of the API, over HTTP, on whichever instance they are sent to."""

    def __init__(self, user: TestUser) -> None:
        self.id = user.id
        self.email = user.email
        self.headers = user.headers

    @classmethod
    async def register(cls, http: httpx.AsyncClient) -> "Caller":
        return cls(await register_user(http))

    async def get(self, http: httpx.AsyncClient, path: str) -> httpx.Response:
        return await http.get(path, headers=self.headers)


@two_instances
async def test_writes_on_one_instance_are_read_at_once_on_the_other(
    config: Config, environ: dict[str, str]
) -> None:
    async with running(config), live_server(environ) as a_url, live_server(environ) as b_url:
        async with httpx.AsyncClient(base_url=a_url) as a, httpx.AsyncClient(base_url=b_url) as b:
            owner, member = await Caller.register(a), await Caller.register(a)
            project = (await a.post("/projects", json={"name": "P"}, headers=owner.headers)).json()
            members = f"/projects/{project['id']}/members"
            await a.post(members, json={"email": member.email}, headers=owner.headers)
            task = (
                await a.post(
                    f"/projects/{project['id']}/tasks", json={"title": "v"}, headers=owner.headers
                )
            ).json()
            path, page = f"/tasks/{task['id']}", f"/projects/{project['id']}/tasks"

            # Interleaved writes and reads, each write on the other instance
            # from the read; every read comes after a cached one.
            for n in range(20):
                writer, reader = (a, b) if n % 2 else (b, a)
                assert (await member.get(reader, path)).status_code == 200  # cached now
                patched = await writer.patch(path, json={"title": f"v{n}"}, headers=owner.headers)
                read = await member.get(reader, path)
                assert read.json()["title"] == f"v{n}"
                assert read.headers["ETag"] == patched.headers["ETag"]

            # Removing a member: the cached membership goes with it, and so
            # does the cached assignee of their tasks.
            await a.patch(path, json={"assignee_id": member.id}, headers=owner.headers)
            for caller in (owner, member):
                assert (await caller.get(b, path)).status_code == 200
            assert (await member.get(b, page)).status_code == 200
            removed = await a.delete(f"{members}/{member.id}", headers=owner.headers)
            assert removed.status_code == 204
            assert (await member.get(b, path)).status_code == 404
            assert (await member.get(b, page)).status_code == 404
            assert (await owner.get(b, path)).json()["assignee_id"] is None

            # Added back: a cached "not a member" does not outlive it either.
            await a.post(members, json={"email": member.email}, headers=owner.headers)
            assert (await member.get(b, path)).status_code == 200

            # A deleted project takes its cached tasks and memberships along.
            deleted = await a.delete(f"/projects/{project['id']}", headers=owner.headers)
            assert deleted.status_code == 204
            for caller in (owner, member):
                assert (await caller.get(b, path)).status_code == 404
                assert (await caller.get(b, page)).status_code == 404


@redis_only
async def test_a_fill_that_lost_the_race_to_a_write_is_never_served(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser
) -> None:
    task = await create_task(client, project, owner, title="old")
    path = f"/tasks/{task['id']}"
    # As a reader fetched it; nothing is cached yet.
    stale = TaskDocument(uuid.UUID(project["id"]), 1, dumps(task))

    async def read_old_then_lose_the_race() -> TaskDocument:
        # This reader fetched the old row; the write commits (and invalidates)
        # before the reader gets to store it.
        response = await client.patch(path, json={"title": "new"}, headers=owner.headers)
        assert response.status_code == 200
        return stale

    async with app.app_context():
        await cache.through(task_key(uuid.UUID(task["id"])), read_old_then_lose_the_race)
    for _ in range(2):
        response = await client.get(path, headers=owner.headers)
        assert (await response.get_json())["title"] == "new"
        assert response.headers["ETag"] == '"2"'


@redis_only
async def test_entries_and_generations_expire(
    client: Client, project: dict[str, Any], owner: TestUser
) -> None:
    task = await create_task(client, project, owner)
    await client.get(f"/tasks/{task['id']}", headers=owner.headers)
    await client.patch(f"/tasks/{task['id']}", json={"title": "t"}, headers=owner.headers)
    redis = aioredis.from_url(TEST_REDIS_URL)
    try:
        entries = [key async for key in redis.scan_iter("taskflow:cache:*")]
        generations = [key async for key in redis.scan_iter("taskflow:cache-generation:*")]
        entry_ttls = [await redis.pttl(key) for key in entries]
        generation_ttls = [await redis.pttl(key) for key in generations]
    finally:
        await redis.aclose()
    assert entries and generations
    assert all(0 < ttl <= ENTRY_SECONDS * 1000 for ttl in entry_ttls), entry_ttls
    assert all(0 < ttl <= GENERATION_SECONDS * 1000 for ttl in generation_ttls), generation_ttls


async def test_without_redis_answering_reads_go_to_the_database(environ: dict[str, str]) -> None:
    redis_port = free_port()
    config = Config.from_env({**environ, "REDIS_URL": f"redis://127.0.0.1:{redis_port}/0"})
    async with private_redis(redis_port) as redis_server, running(config) as app:
        client = app.test_client()
        owner = (await create_user(client)).headers
        project = await (
            await client.post("/projects", json={"name": "P"}, headers=owner)
        ).get_json()
        tasks = f"/projects/{project['id']}/tasks"
        task = await (await client.post(tasks, json={"title": "before"}, headers=owner)).get_json()
        path = f"/tasks/{task['id']}"
        assert (await client.get(path, headers=owner)).status_code == 200  # cached
        redis_server.kill()
        await redis_server.wait()
        patched = await client.patch(path, json={"title": "during"}, headers=owner)
        assert patched.status_code == 200
        during = await client.get(path, headers=owner)
        async with private_redis(redis_port):
            await asyncio.sleep(1.5)  # past the back-off: the cache is used again
            after = [await client.get(path, headers=owner) for _ in range(2)]
    assert (await during.get_json())["title"] == "during"
    assert [(await response.get_json())["title"] for response in after] == ["during"] * 2
