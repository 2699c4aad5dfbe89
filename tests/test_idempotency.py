"""Idempotency keys, sentence by sentence of the contract, in process (on
PostgreSQL+Redis or the embedded default, as the run is configured).

The races across real processes, and a crash between attempts, are in
``test_idempotency_live.py``.
"""

from __future__ import annotations

import asyncio
import gzip
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from quart import Blueprint, Quart, Response
from quart.typing import TestClientProtocol as Client
from sqlalchemy import update

from taskflow.config import Config
from taskflow.db import backends, session
from taskflow.idempotency import parse_key
from taskflow.jsonio import json_response
from taskflow.models import Event, IdempotencyKey, Task
from taskflow.openapi import KEY_PATTERN
from taskflow.security import require_auth
from taskflow.tokens import Caller

from .support import (
    ON_POSTGRES,
    TestUser,
    count_rows,
    create_project,
    create_user,
    problem_of,
    running,
)


def keyed(user: TestUser, key: str) -> dict[str, str]:
    return {**user.headers, "Idempotency-Key": key}


async def post_task(
    client: Client, project: dict[str, Any], user: TestUser, key: str, title: str = "Ship it"
) -> Any:
    return await client.post(
        f"/projects/{project['id']}/tasks", json={"title": title}, headers=keyed(user, key)
    )


async def test_a_repeat_is_answered_with_the_first_response_and_changes_nothing(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    first = await post_task(client, project, owner, "create-1")
    assert first.status_code == 201
    assert "Idempotent-Replayed" not in first.headers
    events = await count_rows(app, Event)

    again = await post_task(client, project, owner, "create-1")

    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.get_data() == await first.get_data()
    for header in ("Location", "ETag", "Content-Type"):
        assert again.headers[header] == first.headers[header]
    assert await count_rows(app, Task) == 1
    assert await count_rows(app, Event) == events  # no second event


async def test_a_patch_repeat_does_not_apply_twice(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    task = await (await post_task(client, project, owner, "create")).get_json()
    path = f"/tasks/{task['id']}"
    first = await client.patch(path, json={"status": "completed"}, headers=keyed(owner, "p"))
    # Someone else changes it meanwhile; the retry must not undo that.
    await client.patch(path, json={"status": "in_progress"}, headers=owner.headers)

    again = await client.patch(path, json={"status": "completed"}, headers=keyed(owner, "p"))

    assert again.headers["Idempotent-Replayed"] == "true"
    assert await again.get_data() == await first.get_data()
    current = await (await client.get(path, headers=owner.headers)).get_json()
    assert current["status"] == "in_progress"


@pytest.mark.parametrize(
    ("sent_first", "sent_again"),
    [("abc", '"abc"'), ('"abc"', "abc"), ('a"b\\c', r'"a\"b\\c"'), ("x" * 255, f'"{"x" * 255}"')],
)
async def test_the_quoted_form_names_the_same_key(
    client: Client, owner: TestUser, project: dict[str, Any], sent_first: str, sent_again: str
) -> None:
    first = await post_task(client, project, owner, sent_first)
    again = await post_task(client, project, owner, sent_again)
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert await again.get_data() == await first.get_data()


@pytest.mark.parametrize(
    "key",
    ["", " ", "a b", "x" * 256, "ключ", "tab\tkey", '""', '"a\\qb"', '"a"b"', '"a b"'],
    ids=["empty", "space", "inner-space", "256", "non-ascii", "tab", "empty-quoted",
         "bad-escape", "unescaped-quote", "quoted-space"],
)  # fmt: skip
async def test_a_malformed_key_is_a_400_and_nothing_is_written(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any], key: str
) -> None:
    response = await client.post(
        f"/projects/{project['id']}/tasks",
        json={"title": "Ship it"},
        headers={**owner.headers, "Idempotency-Key": key.encode().decode("latin-1")},
    )
    problem_of(response, await response.get_json(), 400, "invalid_idempotency_key")
    assert await count_rows(app, Task) == 0


async def test_two_key_headers_are_a_400(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    response = await client.post(
        f"/projects/{project['id']}/tasks",
        json={"title": "Ship it"},
        headers=[*owner.headers.items(), ("Idempotency-Key", "a"), ("Idempotency-Key", "a")],
    )
    problem_of(response, await response.get_json(), 400, "invalid_idempotency_key")
    assert await count_rows(app, Task) == 0


async def test_the_same_key_for_another_request_is_a_422(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    created = await post_task(client, project, owner, "k")
    task = await created.get_json()
    other_body = await post_task(client, project, owner, "k", title="Another title")
    other_path = await client.post(
        "/projects", json={"title": "Ship it"}, headers=keyed(owner, "k")
    )
    other_method = await client.patch(
        f"/tasks/{task['id']}", json={"title": "Ship it"}, headers=keyed(owner, "k")
    )
    for response in (other_body, other_path, other_method):
        problem_of(response, await response.get_json(), 422, "idempotency_key_reused")
    assert await count_rows(app, Task) == 1
    current = await (await client.get(f"/tasks/{task['id']}", headers=owner.headers)).get_json()
    assert current == task


async def test_keys_belong_to_the_caller(
    app: Quart, client: Client, owner: TestUser, member: TestUser, project: dict[str, Any]
) -> None:
    mine = await (await post_task(client, project, owner, "shared-key")).get_json()
    theirs = await post_task(client, project, member, "shared-key")
    assert theirs.status_code == 201
    assert "Idempotent-Replayed" not in theirs.headers
    assert (await theirs.get_json())["id"] != mine["id"]
    assert await count_rows(app, Task) == 2


async def test_refusals_are_kept_too(
    app: Quart, client: Client, owner: TestUser, stranger: TestUser, project: dict[str, Any]
) -> None:
    """A 404, 412 or 422 is the answer to that request: its repeat gets it
    again, even once the request would now succeed; a new key runs anew."""
    refused = await post_task(client, project, stranger, "join")
    problem_of(refused, await refused.get_json(), 404, "not_found")
    invalid = await client.post(
        f"/projects/{project['id']}/tasks", json={"title": ""}, headers=keyed(owner, "bad")
    )
    assert invalid.status_code == 422
    task = await (await post_task(client, project, owner, "create")).get_json()
    stale = await client.patch(
        f"/tasks/{task['id']}",
        json={"status": "completed"},
        headers={**keyed(owner, "stale"), "If-Match": '"99"'},
    )
    assert stale.status_code == 412
    await client.post(
        f"/projects/{project['id']}/members", json={"email": stranger.email}, headers=owner.headers
    )

    again = await post_task(client, project, stranger, "join")
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (404, "true")
    assert await again.get_data() == await refused.get_data()
    again = await client.post(
        f"/projects/{project['id']}/tasks", json={"title": ""}, headers=keyed(owner, "bad")
    )
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (422, "true")
    again = await client.patch(
        f"/tasks/{task['id']}",
        json={"status": "completed"},
        headers={**keyed(owner, "stale"), "If-Match": '"1"'},
    )
    assert (again.status_code, again.headers["Idempotent-Replayed"]) == (412, "true")
    assert await count_rows(app, Task) == 1
    assert (await post_task(client, project, stranger, "join-again")).status_code == 201


async def test_unauthorized_and_rate_limited_requests_are_not_kept(
    environ: dict[str, str],
) -> None:
    environ = {**environ, "TASKFLOW_RATE_LIMIT_PER_MINUTE": "4"}
    async with running(Config.from_env(environ)) as app:
        client = app.test_client()
        owner = await create_user(client)
        project = await create_project(client, owner)
        unauthorized = await client.post(
            f"/projects/{project['id']}/tasks",
            json={"title": "Ship it"},
            headers={"Authorization": "Bearer nope", "Idempotency-Key": "k"},
        )
        assert unauthorized.status_code == 401
        for _ in range(4):  # the route's limit, per user
            await client.get(f"/projects/{project['id']}/tasks", headers=owner.headers)
            await client.post(
                f"/projects/{project['id']}/tasks", json={"title": "t"}, headers=owner.headers
            )
        limited = await post_task(client, project, owner, "k")
        assert limited.status_code == 429
        assert await count_rows(app, IdempotencyKey) == 0


failures = 0
entered = asyncio.Event()
gate = asyncio.Event()
probe = Blueprint("idempotency_probe", __name__)


@probe.post("/probe/fails-once")
@require_auth
async def fails_once(caller: Caller) -> Response:
    global failures
    failures += 1
    if failures == 1:
        raise RuntimeError("a bug, once")
    return json_response({"attempt": failures}, 201)


@probe.post("/probe/waits")
@require_auth
async def waits(caller: Caller) -> Response:
    await session().connection()  # the transaction has begun, as a write's would
    entered.set()
    await gate.wait()
    return json_response({"id": str(uuid.uuid4())}, 201)


@pytest.fixture
async def probed(config: Config) -> AsyncIterator[Quart]:
    async with running(config, probe) as app:
        yield app


async def test_a_5xx_is_not_kept_and_the_retry_runs_anew(probed: Quart) -> None:
    client = probed.test_client()
    user = await create_user(client)
    first = await client.post("/probe/fails-once", headers=keyed(user, "k"))
    assert first.status_code == 500
    again = await client.post("/probe/fails-once", headers=keyed(user, "k"))
    assert (again.status_code, await again.get_json()) == (201, {"attempt": 2})
    assert "Idempotent-Replayed" not in again.headers


async def test_the_same_key_while_the_first_request_runs(probed: Quart) -> None:
    """PostgreSQL: a 409 with Retry-After, and another key is not held up.
    The embedded default writes one transaction at a time: the repeat waits
    for the first and gets its replay."""
    client = probed.test_client()
    user = await create_user(client)
    entered.clear()
    gate.clear()
    first = asyncio.create_task(client.post("/probe/waits", headers=keyed(user, "k")))
    try:
        await asyncio.wait_for(entered.wait(), 10)
        if ON_POSTGRES:
            during = await client.post("/probe/waits", headers=keyed(user, "k"))
            problem_of(during, await during.get_json(), 409, "conflict")
            assert during.headers["Retry-After"] == "1"
            other_key = client.post("/probe/waits", headers=keyed(user, "k2"))
            repeat = asyncio.create_task(other_key)
        else:
            repeat = asyncio.create_task(client.post("/probe/waits", headers=keyed(user, "k")))
            await asyncio.sleep(0.3)
            assert not repeat.done()
    finally:
        gate.set()
    answered = await asyncio.wait_for(first, 10)
    repeated = await asyncio.wait_for(repeat, 10)
    assert repeated.status_code == 201
    after = await client.post("/probe/waits", headers=keyed(user, "k"))
    assert after.headers["Idempotent-Replayed"] == "true"
    assert await after.get_data() == await answered.get_data()
    if not ON_POSTGRES:
        assert await repeated.get_data() == await answered.get_data()


async def test_keys_expire_after_24_hours_and_are_purged_without_a_cron(
    app: Quart, client: Client, owner: TestUser, member: TestUser, project: dict[str, Any]
) -> None:
    first = await (await post_task(client, project, owner, "old")).get_json()
    for n in range(3):
        await post_task(client, project, member, f"member-old-{n}")
    async with app.app_context(), backends().sessionmaker() as db_session:
        day_ago = datetime.now(UTC) - timedelta(seconds=1)
        await db_session.execute(update(IdempotencyKey).values(expires_at=day_ago))
        await db_session.commit()

    again = await post_task(client, project, owner, "old")

    assert again.status_code == 201
    assert "Idempotent-Replayed" not in again.headers
    assert (await again.get_json())["id"] != first["id"]
    # The expired keys of everyone went; the new one stays, for 24 hours.
    assert await count_rows(app, IdempotencyKey) == 1
    async with app.app_context(), backends().sessionmaker() as db_session:
        kept = (await db_session.execute(IdempotencyKey.__table__.select())).one()
    assert (
        timedelta(hours=23, minutes=59) < kept.expires_at - datetime.now(UTC) <= timedelta(hours=24)
    )


async def test_routes_without_a_bearer_token_check_the_key_but_keep_nothing(
    app: Quart, client: Client
) -> None:
    credentials = {"email": "keyed@example.com", "password": "a long password"}
    malformed = await client.post(
        "/auth/register", json=credentials, headers={"Idempotency-Key": "a b"}
    )
    problem_of(malformed, await malformed.get_json(), 400, "invalid_idempotency_key")
    registered = await client.post(
        "/auth/register", json=credentials, headers={"Idempotency-Key": "r"}
    )
    assert registered.status_code == 201
    logged_in = await client.post("/auth/login", json=credentials, headers={"Idempotency-Key": "l"})
    assert logged_in.status_code == 200
    assert await count_rows(app, IdempotencyKey) == 0


@settings(max_examples=3000, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x1F, max_codepoint=0x80), max_size=260))
def test_the_openapi_pattern_states_exactly_the_keys_accepted(value: str) -> None:
    for candidate in (value, f'"{value}"'):
        accepted = parse_key(candidate) is not None
        assert accepted == (re.fullmatch(KEY_PATTERN, candidate) is not None), candidate


async def test_the_kept_body_is_the_identity_one_whatever_the_encoding(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    body = {"title": "Long", "description": "words " * 500}
    path = f"/projects/{project['id']}/tasks"
    headers = keyed(owner, "long")
    first = await client.post(path, json=body, headers={**headers, "Accept-Encoding": "gzip"})
    assert first.headers["Content-Encoding"] == "gzip"
    again = await client.post(path, json=body, headers=headers)
    assert "Content-Encoding" not in again.headers
    assert await again.get_data() == gzip.decompress(await first.get_data())
    packed = await client.post(path, json=body, headers={**headers, "Accept-Encoding": "gzip"})
    assert packed.headers["Idempotent-Replayed"] == "true"
    assert gzip.decompress(await packed.get_data()) == await again.get_data()


async def test_an_expired_key_serves_a_new_refusal_too(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    await post_task(client, project, owner, "reused-later")
    async with app.app_context(), backends().sessionmaker() as db_session:
        past = datetime.now(UTC) - timedelta(seconds=1)
        await db_session.execute(update(IdempotencyKey).values(expires_at=past))
        await db_session.commit()
    path, headers = f"/projects/{project['id']}/tasks", keyed(owner, "reused-later")
    refused = await client.post(path, json={"title": ""}, headers=headers)
    assert refused.status_code == 422
    again = await client.post(path, json={"title": ""}, headers=headers)
    assert (again.status_code, again.headers.get("Idempotent-Replayed")) == (422, "true")
    assert await again.get_data() == await refused.get_data()
