"""The ceiling: TaskFlow's two hot reads with no framework at all.

Plain ASGI, asyncpg and orjson, doing the same JWT check and the same SQL as
TaskFlow's `GET /projects/{id}/tasks?status=…&limit=…` (membership, then the
first keyset page) and `GET /tasks/{id}` (the task by id, then the caller's
membership of its project). Whatever TaskFlow spends beyond this is the
framework's. The benchmark serves it on several ASGI servers, so the ceiling
is the fastest server's and not hypercorn's alone.

It imports nothing of TaskFlow's (the package's import is the whole app's,
seconds of CPU for every worker of every server a run starts): the benchmark
hands it TaskFlow's rules for an access token, read from `taskflow.tokens`.
"""

import json
import os
import uuid
from typing import Any

import asyncpg
import jwt
import orjson

SECRET = os.environ["TASKFLOW_SECRET_KEY"]
DSN = os.environ["BENCH_DSN"]
ACCESS_TOKEN = json.loads(os.environ["BENCH_ACCESS_TOKEN_RULES"])

MEMBERSHIP = "SELECT role FROM project_members WHERE project_id = $1 AND user_id = $2"
PAGE = """
SELECT id, project_id, title, description, status, assignee_id, due_date, created_at, updated_at
FROM tasks WHERE project_id = $1 AND status = ANY($2::task_status[])
ORDER BY created_at DESC, id DESC LIMIT $3
"""
TASK = """
SELECT id, project_id, title, description, status, assignee_id, due_date, created_at, updated_at,
       version
FROM tasks WHERE id = $1
"""

pool: asyncpg.Pool | None = None


async def send_json(
    send: Any, status: int, body: Any, headers: tuple[tuple[bytes, bytes], ...] = ()
) -> None:
    payload = orjson.dumps(body, default=str, option=orjson.OPT_UTC_Z)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def lifespan(receive: Any, send: Any) -> None:
    global pool
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            # TaskFlow's pool of 10 a worker; a connection idle for a second
            # is closed, so that the servers not under load (a run has five,
            # two workers each) leave PostgreSQL's 100 connections to the one
            # that is.
            pool = await asyncpg.create_pool(
                DSN, min_size=1, max_size=10, max_inactive_connection_lifetime=1
            )
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if pool is not None:
                await pool.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    assert pool is not None
    headers = dict(scope["headers"])
    token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
    path = scope["path"].split("/")
    try:
        decoded = jwt.api_jwt.decode_complete(
            token, SECRET, algorithms=["HS256"], audience=ACCESS_TOKEN["audience"],
            issuer=ACCESS_TOKEN["issuer"], leeway=ACCESS_TOKEN["leeway"],
            options={"require": ACCESS_TOKEN["required_claims"]},
        )  # fmt: skip
        if decoded["header"].get("typ") != ACCESS_TOKEN["type"]:
            raise jwt.InvalidTokenError
        user_id = uuid.UUID(decoded["payload"]["sub"])
        if path[1] == "tasks":  # /tasks/{id}
            await get_task(send, user_id, uuid.UUID(path[2]))
            return
        project_id = uuid.UUID(path[2])  # /projects/{id}/tasks
    except (jwt.InvalidTokenError, ValueError, IndexError):
        await send_json(send, 401, {"code": "unauthorized"})
        return
    await list_tasks(send, user_id, project_id, scope["query_string"])


async def list_tasks(send: Any, user_id: uuid.UUID, project_id: uuid.UUID, query: bytes) -> None:
    assert pool is not None
    arguments = dict(part.split("=", 1) for part in query.decode().split("&") if "=" in part)
    statuses = arguments.get("status", "pending,in_progress,completed").split(",")
    limit = int(arguments.get("limit", "50"))
    async with pool.acquire() as connection:
        if await connection.fetchval(MEMBERSHIP, project_id, user_id) is None:
            await send_json(send, 404, {"code": "not_found"})
            return
        rows = await connection.fetch(PAGE, project_id, statuses, limit + 1)
    items = [dict(row) for row in rows[:limit]]
    await send_json(send, 200, {"items": items, "next_cursor": None})


async def get_task(send: Any, user_id: uuid.UUID, task_id: uuid.UUID) -> None:
    assert pool is not None
    async with pool.acquire() as connection:
        row = await connection.fetchrow(TASK, task_id)
        if row is None or await connection.fetchval(MEMBERSHIP, row["project_id"], user_id) is None:
            await send_json(send, 404, {"code": "not_found"})
            return
    task = dict(row)
    etag = f'"{task.pop("version")}"'.encode()
    await send_json(send, 200, task, ((b"etag", etag),))
