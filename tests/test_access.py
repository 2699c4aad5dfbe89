"""Authorization holds when a write commits: a write that waited for the
project's lock while a removal (or another write) committed is judged by what
committed, not by what its first statement saw.

The other transaction is held open by hand on its own connection, so the race
that concurrent clients hit now and then happens every time.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client
from sqlalchemy import delete, select, text, update
from sqlalchemy.ext.asyncio import AsyncConnection

from taskflow.db import backends
from taskflow.models import Event, ProjectMember, Task

from .support import TestUser, create_task, problem_of


@pytest.fixture
def environ(environ: dict[str, str]) -> dict[str, str]:
    """The writes here wait for a lock held by hand for about a second on
    purpose: no lock timeout (1 s by default) may end their wait first."""
    return {**environ, "TASKFLOW_DATABASE_LOCK_TIMEOUT_MS": "10000"}


@asynccontextmanager
async def project_locked(app: Quart, project_id: str) -> AsyncIterator[AsyncConnection]:
    """A transaction holding the project's row lock, as a removal or a write
    does; committed when the block ends."""
    async with app.app_context():
        engine = backends().engine
    async with engine.connect() as connection:
        await connection.begin()
        if connection.dialect.name == "postgresql":
            await connection.execute(
                text("SELECT id FROM projects WHERE id = :id FOR UPDATE"),
                {"id": uuid.UUID(project_id)},
            )
        else:  # BEGIN IMMEDIATE took the database's write lock
            await connection.execute(text("SELECT 1"))
        yield connection
        await connection.commit()


async def waiting(request: Any) -> asyncio.Task[Any]:
    """*request* started, and given time to reach the lock and wait on it."""
    task = asyncio.ensure_future(request)
    await asyncio.sleep(0.5)
    assert not task.done(), "the write did not wait for the lock"
    return task


async def test_a_write_waiting_while_its_author_is_removed_is_refused(
    app: Quart, client: Client, project: dict[str, Any], member: TestUser
) -> None:
    task = await create_task(client, project, member, title="before")
    async with project_locked(app, project["id"]) as removal:
        patch = await waiting(
            client.patch(f"/tasks/{task['id']}", json={"title": "after"}, headers=member.headers)
        )
        create = await waiting(
            client.post(
                f"/projects/{project['id']}/tasks", json={"title": "new"}, headers=member.headers
            )
        )
        await removal.execute(
            delete(ProjectMember).where(
                ProjectMember.project_id == uuid.UUID(project["id"]),
                ProjectMember.user_id == uuid.UUID(member.id),
            )
        )
    for response in (await patch, await create):
        problem_of(response, await response.get_json(), 404, "not_found")
    async with app.app_context(), backends().engine.connect() as connection:
        titles = (await connection.execute(select(Task.title))).scalars().all()
        kinds = (await connection.execute(select(Event.kind).order_by(Event.id))).scalars().all()
    assert titles == ["before"]
    assert kinds.count("task.updated") == 0 and kinds.count("task.created") == 1


async def test_if_match_is_judged_after_the_lock(
    app: Quart, client: Client, project: dict[str, Any], member: TestUser
) -> None:
    task = await create_task(client, project, member, title="v1")
    async with project_locked(app, project["id"]) as other_write:
        stale = await waiting(
            client.patch(
                f"/tasks/{task['id']}",
                json={"title": "mine"},
                headers={**member.headers, "If-Match": '"1"'},
            )
        )
        await other_write.execute(
            update(Task)
            .where(Task.id == uuid.UUID(task["id"]))
            .values(title="theirs", version=Task.version + 1)
        )
    response = await stale
    problem_of(response, await response.get_json(), 412, "precondition_failed")
    current = await client.get(f"/tasks/{task['id']}", headers=member.headers)
    assert (await current.get_json())["title"] == "theirs"
