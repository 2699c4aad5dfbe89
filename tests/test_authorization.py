"""The authorization matrix: every route of ``app.url_map`` by owner, member,
stranger and anonymous. A route without a row fails the test, and every
refused request is shown to change nothing."""

import uuid
from dataclasses import dataclass
from typing import Any

from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.db import backends

from .support import (
    PASSWORD,
    TestUser,
    add_member,
    create_project,
    create_task,
    create_user,
    empty_tables,
    snapshot,
)

ROLES = ("owner", "member", "stranger", "anonymous")


@dataclass
class World:
    owner: TestUser
    member: TestUser
    other_member: TestUser
    stranger: TestUser
    newcomer: TestUser
    project: dict[str, Any]
    task: dict[str, Any]
    token_id: str  # an API token of the owner's
    webhook_id: str  # a webhook of the project's, inactive (no delivery to make)

    def caller(self, role: str) -> TestUser | None:
        return None if role == "anonymous" else getattr(self, role)


async def build_world(app: Quart, client: Client) -> World:
    """A fresh world in empty tables, so that every attempt starts alike
    (and the snapshots around it hold this world alone, not every earlier
    one: they were most of the matrices' time)."""
    async with app.app_context():
        await empty_tables(backends().engine)
    owner, member, other_member, stranger, newcomer = [await create_user(client) for _ in range(5)]
    project = await create_project(client, owner)
    await add_member(client, project, owner, member)
    await add_member(client, project, owner, other_member)
    task = await create_task(client, project, member)
    token = await create_api_token(client, owner, "read")
    webhook_id = await create_webhook(client, owner, project)
    return World(
        owner, member, other_member, stranger, newcomer, project, task, token["id"], webhook_id
    )


# A public address written as such: no DNS lookup is needed to accept it.
WEBHOOK_URL = "https://93.184.215.14/hook"


async def create_webhook(client: Client, owner: TestUser, project: dict[str, Any]) -> str:
    webhooks = f"/projects/{project['id']}/webhooks"
    response = await client.post(webhooks, json={"url": WEBHOOK_URL}, headers=owner.headers)
    assert response.status_code == 201, await response.get_json()
    webhook_id: str = (await response.get_json())["id"]
    paused = await client.patch(
        f"{webhooks}/{webhook_id}", json={"active": False}, headers=owner.headers
    )
    assert paused.status_code == 200
    return webhook_id


async def create_api_token(
    client: Client, user: TestUser, scope: str, project_ids: list[str] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {"name": f"{scope} token", "scope": scope}
    if project_ids is not None:
        body["project_ids"] = project_ids
    response = await client.post("/auth/tokens", json=body, headers=user.headers)
    assert response.status_code == 201, await response.get_json()
    token: dict[str, Any] = await response.get_json()
    return token


def body_for(endpoint: str, world: World) -> Any:
    return {
        "auth.register": {"email": f"fresh-{uuid.uuid4().hex}@example.com", "password": PASSWORD},
        "auth.login": {"email": world.owner.email, "password": PASSWORD},
        "auth.refresh": {"refresh_token": world.owner.refresh_token},
        "projects.create_project": {"name": "New"},
        "projects.replace_project": {"name": "Renamed"},
        "projects.patch_project": {"description": "Changed"},
        "projects.add_member": {"email": world.newcomer.email},
        "tasks.create_task": {"title": "New task"},
        "tasks.replace_task": {"title": "Replaced"},
        "tasks.patch_task": {"status": "completed"},
        "auth.create_token": {"name": "CI", "scope": "write"},
        "webhooks.create_webhook": {"url": WEBHOOK_URL},
        "webhooks.patch_webhook": {"description": "Changed"},
        "webhooks.replay": {"since": 0},
    }.get(endpoint)


def url_for(rule: str, world: World) -> str:
    return (
        rule.replace("<uuid:project_id>", world.project["id"])
        .replace("<uuid:task_id>", world.task["id"])
        .replace("<uuid:user_id>", world.other_member.id)
        .replace("<uuid:token_id>", world.token_id)
        .replace("<uuid:webhook_id>", world.webhook_id)
        .replace("<path:filename>", "swagger-ui.css")
    )


EVERYONE = dict.fromkeys(ROLES, 200)
SIGNED_IN = {"owner": 200, "member": 200, "stranger": 200, "anonymous": 401}
MEMBERS = {"owner": 200, "member": 200, "stranger": 404, "anonymous": 401}
OWNER_ONLY = {"owner": 200, "member": 403, "stranger": 404, "anonymous": 401}
# The owner's API token: anyone else's id is a 404.
NOT_YOURS = {"owner": 204, "member": 404, "stranger": 404, "anonymous": 401}


def with_success(statuses: dict[str, int], success: int) -> dict[str, int]:
    return {role: success if status == 200 else status for role, status in statuses.items()}


# (endpoint, method) → the status each caller gets.
MATRIX: dict[tuple[str, str], dict[str, int]] = {
    ("ops.healthz", "GET"): EVERYONE,
    ("ops.readyz", "GET"): EVERYONE,
    ("ops.docs_asset", "GET"): EVERYONE,
    ("openapi", "GET"): EVERYONE,
    ("swagger_ui", "GET"): EVERYONE,
    ("auth.register", "POST"): dict.fromkeys(ROLES, 201),
    ("auth.login", "POST"): EVERYONE,
    ("auth.refresh", "POST"): EVERYONE,
    ("auth.logout", "POST"): with_success(SIGNED_IN, 204),
    ("auth.me", "GET"): SIGNED_IN,
    ("auth.create_token", "POST"): with_success(SIGNED_IN, 201),
    ("auth.list_tokens", "GET"): SIGNED_IN,
    ("auth.delete_token", "DELETE"): NOT_YOURS,
    ("projects.list_projects", "GET"): SIGNED_IN,
    ("projects.create_project", "POST"): with_success(SIGNED_IN, 201),
    ("projects.get_project", "GET"): MEMBERS,
    ("projects.replace_project", "PUT"): OWNER_ONLY,
    ("projects.patch_project", "PATCH"): OWNER_ONLY,
    ("projects.delete_project", "DELETE"): with_success(OWNER_ONLY, 204),
    ("projects.list_members", "GET"): MEMBERS,
    ("projects.add_member", "POST"): with_success(OWNER_ONLY, 201),
    ("projects.remove_member", "DELETE"): with_success(OWNER_ONLY, 204),
    ("projects.list_events", "GET"): MEMBERS,
    ("tasks.list_tasks", "GET"): MEMBERS,
    ("tasks.create_task", "POST"): with_success(MEMBERS, 201),
    ("tasks.get_task", "GET"): MEMBERS,
    ("tasks.replace_task", "PUT"): MEMBERS,
    ("tasks.patch_task", "PATCH"): MEMBERS,
    ("tasks.delete_task", "DELETE"): with_success(MEMBERS, 204),
    ("webhooks.create_webhook", "POST"): with_success(OWNER_ONLY, 201),
    ("webhooks.list_webhooks", "GET"): OWNER_ONLY,
    ("webhooks.patch_webhook", "PATCH"): OWNER_ONLY,
    ("webhooks.delete_webhook", "DELETE"): with_success(OWNER_ONLY, 204),
    ("webhooks.rotate_secret", "POST"): OWNER_ONLY,
    ("webhooks.list_deliveries", "GET"): OWNER_ONLY,
    ("webhooks.replay", "POST"): with_success(OWNER_ONLY, 202),
}


def served_routes(app: Quart) -> dict[tuple[str, str], str]:
    routes = {}
    for rule in app.url_map.iter_rules():
        if rule.websocket:
            continue
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            routes[(rule.endpoint, method)] = rule.rule
    return routes


async def test_every_route_has_a_row(app: Quart) -> None:
    assert set(served_routes(app)) == set(MATRIX)


async def test_authorization_matrix(app: Quart, client: Client) -> None:
    for (endpoint, method), rule in sorted(served_routes(app).items()):
        for role, expected in MATRIX[(endpoint, method)].items():
            world = await build_world(app, client)
            caller = world.caller(role)
            headers = caller.headers if caller else {}
            before = await snapshot(app)
            response = await client.open(
                url_for(rule, world),
                method=method,
                json=body_for(endpoint, world),
                headers=headers,
            )
            assert response.status_code == expected, (endpoint, method, role)
            if expected >= 400:
                assert await snapshot(app) == before, (endpoint, method, role)


# The same routes called with an API token of the owner's instead of a login:
# a write token may do what the login may, but not what only a login may; a
# read token only reads; a token limited to another project finds nothing of
# this one and cannot create projects.
LOGIN_ONLY = {("auth.logout", "POST"), ("auth.create_token", "POST"),
              ("auth.list_tokens", "GET"), ("auth.delete_token", "DELETE")}  # fmt: skip
PUBLIC = {endpoint for (endpoint, _), row in MATRIX.items() if row["anonymous"] != 401}


def with_token(kind: str, endpoint: str, method: str) -> int:
    owner = MATRIX[(endpoint, method)]["owner"]
    if endpoint in PUBLIC:
        return owner  # a bearer token changes nothing there
    if (endpoint, method) in LOGIN_ONLY:
        return 403
    if kind == "read":
        return owner if method == "GET" else 403
    if kind == "elsewhere":
        if (endpoint, method) == ("projects.create_project", "POST"):
            return 403
        if "project" in endpoint or endpoint.startswith(("tasks.", "webhooks.")):
            return owner if endpoint == "projects.list_projects" else 404
    return owner


async def test_api_tokens_matrix(app: Quart, client: Client) -> None:
    for (endpoint, method), rule in sorted(served_routes(app).items()):
        for kind in ("write", "read", "elsewhere"):
            world = await build_world(app, client)
            if kind == "elsewhere":
                other = await create_project(client, world.owner, "Elsewhere")
                token = await create_api_token(client, world.owner, "write", [other["id"]])
            else:
                token = await create_api_token(client, world.owner, kind)
            bearer = {"Authorization": f"Bearer {token['token']}"}
            await client.get("/auth/me", headers=bearer)  # its last use noted, for a minute
            before = await snapshot(app)
            response = await client.open(
                url_for(rule, world), method=method, json=body_for(endpoint, world), headers=bearer
            )
            expected = with_token(kind, endpoint, method)
            assert response.status_code == expected, (endpoint, method, kind)
            if expected >= 400:
                assert await snapshot(app) == before, (endpoint, method, kind)
