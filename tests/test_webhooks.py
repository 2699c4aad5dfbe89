"""Webhook routes, as the contract has them: registration, filtering,
secrets and their rotation, the delivery log, replay, owner only; and the
SSRF rule at registration. Deliveries themselves: tests/test_webhook_delivery.py."""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client
from sqlalchemy import insert, select

from taskflow import outbound
from taskflow.config import Config
from taskflow.db import backends
from taskflow.models import Event, IdempotencyKey, Webhook, WebhookDelivery

from .support import (
    TestUser,
    count_rows,
    create_project,
    create_task,
    create_user,
    problem_of,
    running,
    tampered,
)

# A receiver that is never there: registration here checks only the form.
URL = "http://127.0.0.1:9/hook"
FIELDS = {
    "id", "url", "events", "description", "active", "disabled_reason", "last_success_at",
    "failing_since", "created_at",
}  # fmt: skip


@pytest.fixture
def environ(environ: dict[str, str]) -> dict[str, str]:
    return {**environ, "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "true"}


def hooks_of(project: dict[str, Any]) -> str:
    return f"/projects/{project['id']}/webhooks"


async def register(
    client: Client, project: dict[str, Any], owner: TestUser, **fields: Any
) -> dict[str, Any]:
    response = await client.post(
        hooks_of(project), json={"url": URL, **fields}, headers=owner.headers
    )
    assert response.status_code == 201, await response.get_json()
    webhook: dict[str, Any] = await response.get_json()
    return webhook


async def listed(client: Client, project: dict[str, Any], owner: TestUser) -> list[dict[str, Any]]:
    response = await client.get(hooks_of(project), headers=owner.headers)
    assert response.status_code == 200
    items: list[dict[str, Any]] = (await response.get_json())["items"]
    return items


def assert_secret(secret: str) -> None:
    prefix, encoded = secret[:6], secret[6:]
    assert prefix == "whsec_"
    assert len(base64.b64decode(encoded, validate=True)) >= 24


async def test_registration_answers_the_secret_once(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    response = await client.post(
        hooks_of(project),
        json={"url": URL, "events": ["task.created", "task.updated"], "description": "CI"},
        headers=owner.headers,
    )
    assert response.status_code == 201
    created = await response.get_json()
    assert set(created) == FIELDS | {"secret"}
    assert_secret(created["secret"])
    assert created["url"] == URL
    assert created["events"] == ["task.created", "task.updated"]
    assert (created["description"], created["active"]) == ("CI", True)
    assert created["disabled_reason"] is created["last_success_at"] is created["failing_since"]
    assert created["created_at"].endswith("Z")

    default = await register(client, project, owner)
    assert default["events"] is None  # every kind
    assert default["secret"] != created["secret"]
    items = await listed(client, project, owner)
    assert [item["id"] for item in items] == [created["id"], default["id"]]
    assert all(set(item) == FIELDS for item in items)  # no secret


async def test_the_secret_is_not_kept_for_an_idempotent_retry(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    headers = {**owner.headers, "Idempotency-Key": "hook-1"}
    first = await client.post(hooks_of(project), json={"url": URL}, headers=headers)
    assert first.status_code == 201
    rotated = await client.post(
        f"{hooks_of(project)}/{(await first.get_json())['id']}/rotate-secret",
        headers={**owner.headers, "Idempotency-Key": "rotate-1"},
    )
    assert rotated.status_code == 200
    assert "Idempotent-Replayed" not in rotated.headers
    assert await count_rows(app, IdempotencyKey) == 0


async def test_a_new_webhook_starts_after_the_latest_event(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    await create_task(client, project, owner)
    webhook = await register(client, project, owner)
    position, latest = await position_and_latest_event(app, webhook)
    assert position == latest


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": URL, "events": ["task.exploded"]}, "events.0"),
        ({"url": URL, "events": []}, "events"),
        ({"url": URL, "events": None, "secret": "whsec_mine"}, "secret"),
        ({"url": "ftp://127.0.0.1/hook"}, "url"),
        ({"url": "http://user:pass@127.0.0.1/hook"}, "url"),
        ({"url": "http://127.0.0.1/hook#part"}, "url"),
        ({"url": "https:///nohost"}, "url"),
        ({"url": "https://127.0.0.1/" + "x" * 2048}, "url"),
        ({"url": "http://127.0.0.1/\u0000"}, "url"),
        ({}, "url"),
    ],
)
async def test_bad_registrations_are_422_on_their_field(
    client: Client, owner: TestUser, project: dict[str, Any], body: dict[str, Any], field: str
) -> None:
    response = await client.post(hooks_of(project), json=body, headers=owner.headers)
    problem = await response.get_json()
    problem_of(response, problem, 422, "validation_failed")
    assert field in {error["field"] for error in problem["errors"]}, problem


async def test_patch_changes_what_is_sent_and_delete_removes(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    webhook = await register(client, project, owner, events=["task.created"])
    path = f"{hooks_of(project)}/{webhook['id']}"
    patched = await client.patch(
        path,
        json={"url": "http://127.0.0.1:10/other", "events": None, "description": "Ops"},
        headers=owner.headers,
    )
    assert patched.status_code == 200
    body = await patched.get_json()
    assert set(body) == FIELDS
    assert (body["url"], body["events"], body["description"]) == (
        "http://127.0.0.1:10/other",
        None,
        "Ops",
    )
    async with app.app_context(), backends().sessionmaker() as db_session:
        row = (
            await db_session.execute(select(Webhook).where(Webhook.id == uuid.UUID(webhook["id"])))
        ).scalar_one()
    assert row.attempt == 0 and row.next_attempt_at <= datetime.now(UTC)  # a new URL: at once
    unchanged = await client.patch(path, json={}, headers=owner.headers)
    assert await unchanged.get_json() == body
    for bad in (
        {"url": None},
        {"active": None},
        {"active": "true"},
        {"url": "gopher://x"},
        {"id": "x"},
    ):
        refused = await client.patch(path, json=bad, headers=owner.headers)
        assert refused.status_code == 422, bad

    paused = await (
        await client.patch(path, json={"active": False}, headers=owner.headers)
    ).get_json()
    assert (paused["active"], paused["disabled_reason"]) == (
        False,
        "disabled by the project's owner",
    )
    resumed = await (
        await client.patch(path, json={"active": True}, headers=owner.headers)
    ).get_json()
    assert (resumed["active"], resumed["disabled_reason"]) == (True, None)

    assert (await client.delete(path, headers=owner.headers)).status_code == 204
    assert await listed(client, project, owner) == []
    for method in ("PATCH", "DELETE"):
        gone = await client.open(path, method=method, json={}, headers=owner.headers)
        problem_of(gone, await gone.get_json(), 404, "not_found")


async def test_reactivation_resumes_where_delivery_stopped(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    webhook = await register(client, project, owner)
    webhook_id = uuid.UUID(webhook["id"])
    stopped_at = datetime.now(UTC) - timedelta(days=3)
    async with app.app_context(), backends().sessionmaker.begin() as db_session:
        await db_session.execute(
            Webhook.__table__.update()
            .where(Webhook.id == webhook_id)
            .values(
                active=False,
                disabled_reason="every delivery failed for 3 days",
                attempt=7,
                failing_since=stopped_at,
                next_attempt_at=datetime.now(UTC) + timedelta(hours=5),
                position=3,
            )
        )
    (item,) = await listed(client, project, owner)
    assert (item["active"], item["disabled_reason"]) == (False, "every delivery failed for 3 days")
    assert item["failing_since"] is not None
    resumed = await client.patch(
        f"{hooks_of(project)}/{webhook_id}", json={"active": True}, headers=owner.headers
    )
    assert (await resumed.get_json())["failing_since"] is None
    async with app.app_context(), backends().sessionmaker() as db_session:
        row = (
            await db_session.execute(select(Webhook).where(Webhook.id == webhook_id))
        ).scalar_one()
    assert (row.position, row.attempt, row.active) == (3, 0, True)
    assert row.next_attempt_at <= datetime.now(UTC)


async def test_rotation_gives_a_new_secret_and_keeps_the_old_for_a_day(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    webhook = await register(client, project, owner)
    response = await client.post(
        f"{hooks_of(project)}/{webhook['id']}/rotate-secret", headers=owner.headers
    )
    assert response.status_code == 200
    rotated = await response.get_json()
    assert set(rotated) == {"secret"}
    assert_secret(rotated["secret"])
    assert rotated["secret"] != webhook["secret"]
    async with app.app_context(), backends().sessionmaker() as db_session:
        row = (
            await db_session.execute(select(Webhook).where(Webhook.id == uuid.UUID(webhook["id"])))
        ).scalar_one()
    assert (row.secret, row.previous_secret) == (rotated["secret"], webhook["secret"])
    assert row.previous_secret_until is not None
    remaining = row.previous_secret_until - datetime.now(UTC)
    assert timedelta(hours=23, minutes=59) < remaining <= timedelta(hours=24)


async def test_replay_moves_the_position_back(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    await create_task(client, project, owner)
    webhook = await register(client, project, owner)
    await client.patch(
        f"{hooks_of(project)}/{webhook['id']}", json={"active": False}, headers=owner.headers
    )
    path = f"{hooks_of(project)}/{webhook['id']}/replay"
    for since in (0, 10**12):  # at most the project's latest event
        response = await client.post(path, json={"since": since}, headers=owner.headers)
        assert response.status_code == 202
    for bad in ({"since": -1}, {}, {"since": "1"}):
        refused = await client.post(path, json=bad, headers=owner.headers)
        assert refused.status_code == 422, bad
    position, latest = await position_and_latest_event(app, webhook)
    assert position == latest


async def test_the_delivery_log_pages_newest_first(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    webhook = await register(client, project, owner)
    other = await register(client, project, owner)
    start = datetime.now(UTC) - timedelta(minutes=10)
    async with app.app_context(), backends().sessionmaker.begin() as db_session:
        for n in range(5):
            for target in (webhook, other):
                await db_session.execute(
                    insert(WebhookDelivery).values(
                        id=uuid.uuid4(),
                        webhook_id=uuid.UUID(target["id"]),
                        event_id=n + 1,
                        attempt=1,
                        status_code=500 if n % 2 else 200,
                        error=None,
                        duration_ms=12,
                        attempted_at=start + timedelta(seconds=n),
                    )
                )
    path = f"{hooks_of(project)}/{webhook['id']}/deliveries"
    seen: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = {"limit": "2", **({"cursor": cursor} if cursor else {})}
        response = await client.get(path, query_string=query, headers=owner.headers)
        assert response.status_code == 200
        page = await response.get_json()
        seen += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert [item["event_id"] for item in seen] == [5, 4, 3, 2, 1]
    assert set(seen[0]) == {
        "id", "event_id", "attempt", "status_code", "error", "duration_ms", "attempted_at",
    }  # fmt: skip
    first = await (
        await client.get(path, query_string={"limit": "2"}, headers=owner.headers)
    ).get_json()
    for cursor_value in (tampered(first["next_cursor"]), "nonsense"):
        refused = await client.get(
            path, query_string={"cursor": cursor_value}, headers=owner.headers
        )
        problem_of(refused, await refused.get_json(), 422, "validation_failed")
    # Another webhook's cursor is not this one's.
    other_page = await (
        await client.get(
            f"{hooks_of(project)}/{other['id']}/deliveries",
            query_string={"limit": "1"},
            headers=owner.headers,
        )
    ).get_json()
    refused = await client.get(
        path, query_string={"cursor": other_page["next_cursor"]}, headers=owner.headers
    )
    assert refused.status_code == 422


async def test_owner_only_a_member_403_a_stranger_404(
    client: Client,
    owner: TestUser,
    member: TestUser,
    stranger: TestUser,
    project: dict[str, Any],
) -> None:
    webhook = await register(client, project, owner)
    one = f"{hooks_of(project)}/{webhook['id']}"
    routes = [
        ("POST", hooks_of(project), {"url": URL}),
        ("GET", hooks_of(project), None),
        ("PATCH", one, {"description": "x"}),
        ("DELETE", one, None),
        ("POST", f"{one}/rotate-secret", None),
        ("GET", f"{one}/deliveries", None),
        ("POST", f"{one}/replay", {"since": 0}),
    ]
    for caller, status, code in ((member, 403, "forbidden"), (stranger, 404, "not_found")):
        for method, path, body in routes:
            response = await client.open(path, method=method, json=body, headers=caller.headers)
            problem_of(response, await response.get_json(), status, code)
    # Another project's webhook is not found through this one.
    elsewhere = await create_project(client, owner, "Elsewhere")
    for method, path, body in routes[2:]:
        path = path.replace(project["id"], elsewhere["id"])
        response = await client.open(path, method=method, json=body, headers=owner.headers)
        problem_of(response, await response.get_json(), 404, "not_found")


async def test_a_project_has_at_most_twenty_webhooks(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    for _ in range(20):
        await register(client, project, owner)
    response = await client.post(hooks_of(project), json={"url": URL}, headers=owner.headers)
    problem_of(response, await response.get_json(), 409, "conflict")


async def test_deleting_the_project_deletes_its_webhooks(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    await register(client, project, owner)
    assert (
        await client.delete(f"/projects/{project['id']}", headers=owner.headers)
    ).status_code == 204
    assert await count_rows(app, Webhook) == 0


# The SSRF rule with the setting off (the default).

REFUSED = [
    "https://127.0.0.1/hook",
    "https://10.0.0.1/hook",
    "https://172.16.5.4/hook",
    "https://192.168.1.1/hook",
    "https://169.254.169.254/latest/meta-data",
    "https://100.64.0.1/hook",
    "https://0.0.0.0/hook",
    "https://224.0.0.1/hook",
    "https://[::1]/hook",
    "https://[::]/hook",
    "https://[::ffff:127.0.0.1]/hook",
    "https://[::ffff:169.254.169.254]/hook",
    "https://[fe80::1]/hook",
    "https://[fc00::1]/hook",
    "https://[fd12:3456::1]/hook",
    "https://[ff02::1]/hook",
    "https://[2002:7f00:1::1]/hook",
    "https://[64:ff9b::a00:1]/hook",
    "https://localhost/hook",
    "https://localhost.:8443/hook",
    "http://example.com/hook",
    "http://93.184.215.14/hook",
]


async def test_registration_refuses_private_addresses_and_http(environ: dict[str, str]) -> None:
    config = Config.from_env({**environ, "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "false"})
    async with running(config) as app:
        client = app.test_client()
        owner = await create_user(client)
        project = await create_project(client, owner)
        for url in REFUSED:
            response = await client.post(
                hooks_of(project), json={"url": url}, headers=owner.headers
            )
            problem = await response.get_json()
            problem_of(response, problem, 422, "validation_failed")
            assert [error["field"] for error in problem["errors"]] == ["url"], url
        # A public address literal needs no DNS: accepted.
        accepted = await client.post(
            hooks_of(project), json={"url": "https://93.184.215.14/hook"}, headers=owner.headers
        )
        assert accepted.status_code == 201
        webhook_path = f"{hooks_of(project)}/{(await accepted.get_json())['id']}"
        refused = await client.patch(
            webhook_path, json={"url": "https://[::1]:8443/x"}, headers=owner.headers
        )
        assert refused.status_code == 422
        assert await count_rows(app, Webhook) == 1


@pytest.mark.parametrize(
    ("address", "refused"),
    [
        ("8.8.8.8", False),
        ("2606:4700:4700::1111", False),
        ("127.0.0.1", True),
        ("10.1.2.3", True),
        ("169.254.169.254", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("::ffff:10.0.0.1", True),
        ("::127.0.0.1", True),
        ("fe80::1", True),
        ("fc00::1", True),
        ("fec0::1", True),
        ("ff02::1", True),
        ("2002:a00:1::", True),  # 6to4 of 10.0.0.1
        ("64:ff9b::7f00:1", True),  # NAT64 of 127.0.0.1
        ("192.0.2.10", True),  # documentation
        ("240.0.0.1", True),
    ],
)
def test_which_addresses_are_refused(address: str, refused: bool) -> None:
    assert (outbound.refusal(ipaddress.ip_address(address)) is not None) is refused


async def test_a_name_is_refused_if_any_of_its_addresses_is_private(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A DNS name is judged by every address it resolves to (a resolver
    faked here: the tests need no internet)."""
    answers = {
        "public.example": ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c"],
        "mixed.example": ["93.184.215.14", "10.0.0.7"],
        "rebound.example": ["::ffff:127.0.0.1"],
    }

    async def getaddrinfo(host: str, port: int, **_kwargs: Any) -> list[Any]:
        return [(0, 0, 0, "", (address, port)) for address in answers[host]]

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    assert await outbound.check_url("https://public.example/hook", False)
    for name in ("mixed", "rebound"):
        with pytest.raises(outbound.Refused):
            await outbound.check_url(f"https://{name}.example/hook", False)
    target = await outbound.destination("https://public.example:8443/a?b=c", False)
    first = target.addresses[0]
    assert str(target.request_url(first)) == "https://93.184.215.14:8443/a?b=c"
    assert target.host_header == "public.example:8443"
    assert target.extensions == {"sni_hostname": "public.example"}
    with pytest.raises(outbound.Refused):
        await outbound.destination("https://mixed.example/hook", False)
    # Allowed, the private address is delivered to, and still connected to directly.
    allowed = await outbound.destination("http://mixed.example/hook", True)
    assert [str(address) for address in allowed.addresses] == answers["mixed.example"]
    assert allowed.extensions == {}


async def position_and_latest_event(app: Quart, webhook: dict[str, Any]) -> tuple[int, int | None]:
    """The webhook's position, and the latest event id of the database."""
    async with app.app_context(), backends().sessionmaker() as db_session:
        latest = (await db_session.execute(select(Event.id).order_by(Event.id.desc()))).scalar()
        position = (
            await db_session.execute(
                select(Webhook.position).where(Webhook.id == uuid.UUID(webhook["id"]))
            )
        ).scalar_one()
    return position, latest
