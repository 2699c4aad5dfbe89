"""API tokens, sentence by sentence of the contract: created with a secret
shown once, scoped, limited to projects, expiring, deleted everywhere at once;
on REST and on the WebSocket. The matrix of every route under each kind of
token is in test_authorization.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
import uuid
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
import websockets
from quart import Quart
from quart.typing import TestClientProtocol as Client
from sqlalchemy import update

from taskflow.db import backends
from taskflow.models import ApiToken

from .support import (
    TestUser,
    create_project,
    create_task,
    hypercorn,
    problem_of,
    register_user,
    snapshot,
    statements,
)

BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"


async def new_token(client: Client, user: TestUser, **fields: Any) -> dict[str, Any]:
    body = {"name": "CI", "scope": "write", **fields}
    response = await client.post("/auth/tokens", json=body, headers=user.headers)
    assert response.status_code == 201, await response.get_json()
    token: dict[str, Any] = await response.get_json()
    return token


def bearer(token: dict[str, Any]) -> dict[str, str]:
    return {"Authorization": f"Bearer {token['token']}"}


def checksum_of(random_part: str) -> str:
    """The checksum as a secret scanner would compute it (CRC-32 in base62)."""
    value, digits = zlib.crc32(random_part.encode()), ""
    for _ in range(6):
        value, digit = divmod(value, 62)
        digits = BASE62[digit] + digits
    return digits


async def test_a_token_is_shown_once_and_only_its_hash_is_kept(
    app: Quart, client: Client, owner: TestUser
) -> None:
    created = await new_token(client, owner, name="Deploy bot", scope="read")
    secret = created.pop("token")
    assert set(created) == {
        "id", "name", "scope", "project_ids", "created_at", "expires_at", "last_used_at",
    }  # fmt: skip
    assert (created["name"], created["scope"], created["project_ids"]) == (
        "Deploy bot",
        "read",
        None,
    )
    assert created["last_used_at"] is None
    match = re.fullmatch(r"tfp_([0-9A-Za-z]{32})([0-9A-Za-z]{6})", secret)
    assert match and checksum_of(match.group(1)) == match.group(2)
    assert 32 * 5.95 >= 160  # 32 base62 characters: 190 bits of randomness
    created_at = datetime.fromisoformat(created["created_at"])
    assert datetime.fromisoformat(created["expires_at"]) - created_at == timedelta(days=90)
    stored = json.dumps(await snapshot(app), default=str)
    assert secret not in stored and match.group(1) not in stored
    assert hashlib.sha256(secret.encode()).hexdigest() in stored
    listed = await (await client.get("/auth/tokens", headers=owner.headers)).get_json()
    assert listed == {"items": [created]}


async def test_two_tokens_never_share_a_secret(client: Client, owner: TestUser) -> None:
    secrets = {(await new_token(client, owner))["token"] for _ in range(20)}
    assert len(secrets) == 20


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"expires_in_days": 0}, "expires_in_days"),
        ({"expires_in_days": 366}, "expires_in_days"),
        ({"name": "  "}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"scope": "admin"}, "scope"),
        ({"project_ids": []}, "project_ids"),
    ],
)
async def test_bad_token_requests_are_422(
    client: Client, owner: TestUser, fields: dict[str, Any], field: str
) -> None:
    body = {"name": "CI", "scope": "write", **fields}
    response = await client.post("/auth/tokens", json=body, headers=owner.headers)
    problem = await response.get_json()
    problem_of(response, problem, 422, "validation_failed")
    assert [error["field"] for error in problem["errors"]] == [field]


async def test_expiry_is_1_to_365_days(client: Client, owner: TestUser) -> None:
    for days in (1, 365):
        created = await new_token(client, owner, expires_in_days=days)
        span = datetime.fromisoformat(created["expires_at"]) - datetime.fromisoformat(
            created["created_at"]
        )
        assert span == timedelta(days=days)


async def test_a_token_may_be_limited_only_to_the_callers_projects(
    client: Client, owner: TestUser, stranger: TestUser, project: dict[str, Any]
) -> None:
    theirs = await create_project(client, stranger, "Not yours")
    response = await client.post(
        "/auth/tokens",
        json={"name": "CI", "scope": "read", "project_ids": [project["id"], theirs["id"]]},
        headers=owner.headers,
    )
    problem = await response.get_json()
    problem_of(response, problem, 422, "validation_failed")
    assert problem["errors"][0]["field"] == "project_ids"


async def test_a_token_works_as_its_user_and_its_last_use_is_written_once_a_minute(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    token = await new_token(client, owner)
    me = await (await client.get("/auth/me", headers=bearer(token))).get_json()
    assert me["id"] == owner.id
    listed = await (await client.get("/projects", headers=bearer(token))).get_json()
    assert [p["id"] for p in listed["items"]] == [project["id"]]
    first_use = await last_used_at(client, owner, token)
    assert first_use is not None
    for _ in range(3):
        assert (await client.get("/projects", headers=bearer(token))).status_code == 200
    assert await last_used_at(client, owner, token) == first_use  # no write per request


async def last_used_at(client: Client, owner: TestUser, token: dict[str, Any]) -> str | None:
    listed = await (await client.get("/auth/tokens", headers=owner.headers)).get_json()
    used: str | None = next(t for t in listed["items"] if t["id"] == token["id"])["last_used_at"]
    return used


async def test_malformed_unknown_and_expired_tokens_are_401(
    app: Quart, client: Client, owner: TestUser
) -> None:
    token = await new_token(client, owner)
    secret = token["token"]
    broken = secret[:-1] + ("A" if secret[-1] != "A" else "B")  # the checksum fails
    random_part = "x" * 32
    unknown = f"tfp_{random_part}{checksum_of(random_part)}"  # well formed, never issued
    for presented in (broken, unknown, "tfp_", "tfp_" + "a" * 60):
        response = await client.get("/projects", headers={"Authorization": f"Bearer {presented}"})
        problem_of(response, await response.get_json(), 401, "unauthorized")
    expired = await new_token(client, owner)
    async with app.app_context(), backends().sessionmaker() as db_session:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await db_session.execute(
            update(ApiToken).where(ApiToken.id == uuid.UUID(expired["id"])).values(expires_at=past)
        )
        await db_session.commit()
    response = await client.get("/projects", headers=bearer(expired))
    problem_of(response, await response.get_json(), 401, "token_expired")


async def test_a_well_formed_unknown_token_costs_one_lookup(app: Quart, client: Client) -> None:
    # What a flood of guessed tokens with valid checksums costs the database:
    # the token is looked up once a request, not once for the rate limiter's
    # key and again for the route.
    random_part = "y" * 32
    unknown = f"tfp_{random_part}{checksum_of(random_part)}"
    async with statements(app) as sent:
        response = await client.get("/projects", headers={"Authorization": f"Bearer {unknown}"})
    problem_of(response, await response.get_json(), 401, "unauthorized")
    assert len(sent) == 1, sent


async def test_a_deleted_token_is_refused_and_a_strangers_is_not_found(
    client: Client, owner: TestUser, stranger: TestUser
) -> None:
    token = await new_token(client, owner)
    assert (await client.get("/projects", headers=bearer(token))).status_code == 200
    refused = await client.delete(f"/auth/tokens/{token['id']}", headers=stranger.headers)
    problem_of(refused, await refused.get_json(), 404, "not_found")
    assert (await client.get("/projects", headers=bearer(token))).status_code == 200
    deleted = await client.delete(f"/auth/tokens/{token['id']}", headers=owner.headers)
    assert deleted.status_code == 204
    response = await client.get("/projects", headers=bearer(token))
    problem_of(response, await response.get_json(), 401, "session_revoked")
    again = await client.delete(f"/auth/tokens/{token['id']}", headers=owner.headers)
    assert again.status_code == 404


async def test_a_read_token_only_reads(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    token = await new_token(client, owner, scope="read")
    task = await create_task(client, project, owner)
    for path in (f"/tasks/{task['id']}", f"/projects/{project['id']}/tasks",
                 f"/projects/{project['id']}/events"):  # fmt: skip
        assert (await client.get(path, headers=bearer(token))).status_code == 200
    for method, path, body in (
        ("POST", f"/projects/{project['id']}/tasks", {"title": "No"}),
        ("PATCH", f"/tasks/{task['id']}", {"title": "No"}),
        ("DELETE", f"/tasks/{task['id']}", None),
        ("POST", "/projects", {"name": "No"}),
    ):
        response = await client.open(path, method=method, json=body, headers=bearer(token))
        problem_of(response, await response.get_json(), 403, "forbidden")


async def test_a_token_limited_to_projects_sees_no_other(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    other = await create_project(client, owner, "Other")
    other_task = await create_task(client, other, owner)
    token = await new_token(client, owner, project_ids=[project["id"]])
    listed = await (await client.get("/projects", headers=bearer(token))).get_json()
    assert [p["id"] for p in listed["items"]] == [project["id"]]
    for path in (f"/projects/{other['id']}", f"/projects/{other['id']}/tasks",
                 f"/tasks/{other_task['id']}", f"/projects/{other['id']}/events"):  # fmt: skip
        response = await client.get(path, headers=bearer(token))
        problem_of(response, await response.get_json(), 404, "not_found")
    write = await client.post(
        f"/projects/{other['id']}/tasks", json={"title": "No"}, headers=bearer(token)
    )
    problem_of(write, await write.get_json(), 404, "not_found")
    created = await client.post(
        f"/projects/{project['id']}/tasks", json={"title": "Yes"}, headers=bearer(token)
    )
    assert created.status_code == 201
    refused = await client.post("/projects", json={"name": "No"}, headers=bearer(token))
    problem_of(refused, await refused.get_json(), 403, "forbidden")


async def test_an_api_token_cannot_manage_tokens_refresh_or_log_out(
    client: Client, owner: TestUser
) -> None:
    token = await new_token(client, owner)
    for method, path, body in (
        ("POST", "/auth/tokens", {"name": "x", "scope": "read"}),
        ("GET", "/auth/tokens", None),
        ("DELETE", f"/auth/tokens/{token['id']}", None),
        ("POST", "/auth/logout", None),
    ):
        response = await client.open(path, method=method, json=body, headers=bearer(token))
        problem_of(response, await response.get_json(), 403, "forbidden")
    refresh = await client.post("/auth/refresh", json={"refresh_token": token["token"]})
    problem_of(refresh, await refresh.get_json(), 403, "forbidden")
    assert (await client.get("/auth/me", headers=bearer(token))).status_code == 200


async def test_logging_out_leaves_api_tokens_alone(client: Client, owner: TestUser) -> None:
    token = await new_token(client, owner)
    assert (await client.post("/auth/logout", headers=owner.headers)).status_code == 204
    assert (await client.get("/auth/me", headers=bearer(token))).status_code == 200


async def test_tokens_across_instances_and_on_the_websocket(environ: dict[str, str]) -> None:
    """Created on one instance, used on another and on its WebSocket (a read
    token subscribes and gets live events); deleted on the first, refused by
    the second at once, and its socket closed with 4401."""
    async with hypercorn(environ) as (url_a, _), hypercorn(environ) as (url_b, _):
        async with httpx.AsyncClient(base_url=url_a) as a, httpx.AsyncClient(base_url=url_b) as b:
            owner = await register_user(a)
            project = (await a.post("/projects", json={"name": "P"}, headers=owner.headers)).json()
            created = await a.post(
                "/auth/tokens", json={"name": "bot", "scope": "read"}, headers=owner.headers
            )
            token = created.json()
            assert (await b.get("/projects", headers=bearer(token))).status_code == 200
            ws_url = url_b.replace("http://", "ws://") + "/ws"
            async with websockets.connect(ws_url, additional_headers=bearer(token)) as ws:
                assert json.loads(await asyncio.wait_for(ws.recv(), 5))["type"] == "ready"
                await ws.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
                frame = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert frame["type"] == "subscribed"
                # Through the socket's instance: the embedded default shares no pub/sub.
                await b.post(
                    f"/projects/{project['id']}/tasks", json={"title": "Hi"}, headers=owner.headers
                )
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
                assert (event["type"], event["event"]) == ("event", "task.created")
                deleted = await a.delete(f"/auth/tokens/{token['id']}", headers=owner.headers)
                assert deleted.status_code == 204
                refused = await b.get("/projects", headers=bearer(token))
                assert refused.status_code == 401
                started = time.monotonic()
                try:
                    async with asyncio.timeout(10):
                        async for _ in ws:
                            pass
                except websockets.ConnectionClosed:
                    pass
                assert ws.close_code == 4401
                assert time.monotonic() - started < 8
