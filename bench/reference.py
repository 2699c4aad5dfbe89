"""The ceiling: the task list with no framework at all.

Plain ASGI, asyncpg and orjson, doing the same JWT check and the same SQL as
TaskFlow's `GET /projects/{id}/tasks?status=…&limit=…` (membership, then the
first keyset page). Whatever TaskFlow spends beyond this is the framework's.
"""

import os
import uuid
from typing import Any

import asyncpg
import jwt
import orjson

from taskflow.tokens import ISSUER, REQUIRED_CLAIMS, TokenType

SECRET = os.environ["TASKFLOW_SECRET_KEY"]
DSN = os.environ["BENCH_DSN"]

MEMBERSHIP = "SELECT role FROM project_members WHERE project_id = $1 AND user_id = $2"
PAGE = """
SELECT id, project_id, title, description, status, assignee_id, due_date, created_at, updated_at
FROM tasks WHERE project_id = $1 AND status = ANY($2::task_status[])
ORDER BY created_at DESC, id DESC LIMIT $3
"""

pool: asyncpg.Pool | None = None


async def send_json(send: Any, status: int, body: Any) -> None:
    payload = orjson.dumps(body, default=str, option=orjson.OPT_UTC_Z)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": payload})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    global pool
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                pool = await asyncpg.create_pool(DSN, min_size=2, max_size=10)
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if pool is not None:
                    await pool.close()
                await send({"type": "lifespan.shutdown.complete"})
                return
    assert pool is not None
    headers = dict(scope["headers"])
    token = headers.get(b"authorization", b"").decode().removeprefix("Bearer ")
    try:
        decoded = jwt.api_jwt.decode_complete(
            token, SECRET, algorithms=["HS256"], audience=TokenType.ACCESS.audience, issuer=ISSUER,
            leeway=5, options={"require": REQUIRED_CLAIMS},
        )  # fmt: skip
        if decoded["header"].get("typ") != TokenType.ACCESS:
            raise jwt.InvalidTokenError
        user_id = uuid.UUID(decoded["payload"]["sub"])
        project_id = uuid.UUID(scope["path"].split("/")[2])
    except (jwt.InvalidTokenError, ValueError, IndexError):
        await send_json(send, 401, {"code": "unauthorized"})
        return
    query = dict(
        part.split("=", 1) for part in scope["query_string"].decode().split("&") if "=" in part
    )
    statuses = query.get("status", "pending,in_progress,completed").split(",")
    limit = int(query.get("limit", "50"))
    async with pool.acquire() as connection:
        if await connection.fetchval(MEMBERSHIP, project_id, user_id) is None:
            await send_json(send, 404, {"code": "not_found"})
            return
        rows = await connection.fetch(PAGE, project_id, statuses, limit + 1)
    items = [dict(row) for row in rows[:limit]]
    await send_json(send, 200, {"items": items, "next_cursor": None})
