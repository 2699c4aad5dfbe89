"""CONTRACT "Projects" and "Members"."""

import uuid
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.blueprints.projects import MemberOut, ProjectOut
from taskflow.models import Event, Project, ProjectMember, Task

from .support import (
    TestUser,
    add_member,
    count_rows,
    create_project,
    create_task,
    create_user,
    problem_of,
    snapshot,
    tampered,
)


async def test_create_get_and_list(client: Client, owner: TestUser) -> None:
    response = await client.post(
        "/projects", json={"name": "  Roadmap  ", "description": "Q3"}, headers=owner.headers
    )
    assert response.status_code == 201
    project = await response.get_json()
    ProjectOut.model_validate(project)
    assert response.headers["Location"] == f"/projects/{project['id']}"
    assert project["name"] == "Roadmap"
    assert (project["description"], project["role"], project["owner_id"]) == (
        "Q3",
        "owner",
        owner.id,
    )
    assert project["created_at"].endswith("Z") and project["updated_at"] == project["created_at"]

    fetched = await client.get(response.headers["Location"], headers=owner.headers)
    assert (fetched.status_code, await fetched.get_json()) == (200, project)
    listed = await (await client.get("/projects", headers=owner.headers)).get_json()
    assert listed == {"items": [project], "next_cursor": None}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": ""}, "name"),
        ({"name": "    "}, "name"),
        ({"name": "x" * 201}, "name"),
        ({"name": "ok", "description": "x" * 10_001}, "description"),
        ({"name": "nul\x00byte"}, "name"),
        ({"name": None}, "name"),
        ({}, "name"),
        ({"name": "ok", "owner_id": str(uuid.uuid4())}, "owner_id"),
        ({"name": "ok", "id": str(uuid.uuid4())}, "id"),
        ({"name": "ok", "role": "owner"}, "role"),
        ({"name": "ok", "created_at": "2026-01-01T00:00:00Z"}, "created_at"),
    ],
)
async def test_project_fields_are_bounded(
    client: Client, owner: TestUser, body: dict[str, Any], field: str
) -> None:
    response = await client.post("/projects", json=body, headers=owner.headers)
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert field in [error["field"] for error in payload["errors"]]


async def test_project_bounds_are_inclusive(client: Client, owner: TestUser) -> None:
    body = {"name": " " + "n" * 200 + " ", "description": "d" * 10_000}
    response = await client.post("/projects", json=body, headers=owner.headers)
    assert response.status_code == 201
    assert (await response.get_json())["name"] == "n" * 200


async def test_put_replaces_and_patch_changes_only_what_is_sent(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    url = f"/projects/{project['id']}"
    patched = await client.patch(url, json={"description": "notes"}, headers=owner.headers)
    assert patched.status_code == 200
    body = await patched.get_json()
    assert (body["name"], body["description"]) == ("Launch", "notes")
    assert body["updated_at"] > project["updated_at"]

    replaced = await client.put(url, json={"name": "Renamed"}, headers=owner.headers)
    assert (await replaced.get_json())["description"] is None  # omitted in PUT: null
    assert (await replaced.get_json())["name"] == "Renamed"

    await client.patch(url, json={"description": "again"}, headers=owner.headers)
    cleared = await client.patch(url, json={"description": None}, headers=owner.headers)
    assert (await cleared.get_json())["description"] is None
    assert (await cleared.get_json())["name"] == "Renamed"

    response = await client.patch(url, json={"name": None}, headers=owner.headers)
    problem_of(response, await response.get_json(), 422, "validation_failed")
    response = await client.put(url, json={"description": "no name"}, headers=owner.headers)
    problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_members_may_read_but_only_the_owner_may_change_the_project(
    client: Client, app: Quart, member: TestUser, stranger: TestUser, project: dict[str, Any]
) -> None:
    url = f"/projects/{project['id']}"
    seen = await (await client.get(url, headers=member.headers)).get_json()
    assert seen["role"] == "member" and seen["name"] == "Launch"

    before = await snapshot(app)
    for method, body in (("PUT", {"name": "x"}), ("PATCH", {"name": "x"}), ("DELETE", None)):
        response = await client.open(url, method=method, json=body, headers=member.headers)
        problem_of(response, await response.get_json(), 403, "forbidden")
        response = await client.open(url, method=method, json=body, headers=stranger.headers)
        problem_of(response, await response.get_json(), 404, "not_found")
    response = await client.get(url, headers=stranger.headers)
    problem_of(response, await response.get_json(), 404, "not_found")
    assert await snapshot(app) == before


async def test_unknown_and_malformed_ids_are_404(client: Client, owner: TestUser) -> None:
    for project_id in (str(uuid.uuid4()), "not-a-uuid", "123"):
        response = await client.get(f"/projects/{project_id}", headers=owner.headers)
        problem_of(response, await response.get_json(), 404, "not_found")


async def test_project_list_pages_newest_first_and_only_mine(
    client: Client, owner: TestUser, stranger: TestUser
) -> None:
    created = [await create_project(client, owner, f"p{n}") for n in range(5)]
    await create_project(client, stranger, "not yours")
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(f"/projects{query}", headers=owner.headers)).get_json()
        assert len(page["items"]) <= 2
        seen += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == [project["name"] for project in reversed(created)]

    first = await (await client.get("/projects?limit=1", headers=owner.headers)).get_json()
    # Another user's cursor, or a tampered one, is not a cursor for this list.
    response = await client.get(
        f"/projects?cursor={first['next_cursor']}", headers=stranger.headers
    )
    problem_of(response, await response.get_json(), 422, "validation_failed")
    response = await client.get(
        f"/projects?cursor={tampered(first['next_cursor'])}", headers=owner.headers
    )
    problem_of(response, await response.get_json(), 422, "validation_failed")
    for query in ("limit=0", "limit=101", "limit=-1", "limit=abc", "cursor=garbage", "bogus=1"):
        response = await client.get(f"/projects?{query}", headers=owner.headers)
        problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_add_list_and_remove_members(
    client: Client, owner: TestUser, member: TestUser, stranger: TestUser, project: dict[str, Any]
) -> None:
    members_url = f"/projects/{project['id']}/members"
    listed = await (await client.get(members_url, headers=member.headers)).get_json()
    assert [(m["email"], m["role"]) for m in listed["items"]] == [
        (owner.email, "owner"),
        (member.email, "member"),
    ]
    for item in listed["items"]:
        MemberOut.model_validate(item)

    third = await create_user(client)
    response = await client.post(
        members_url, json={"email": third.email.upper()}, headers=owner.headers
    )
    assert response.status_code == 201
    added = await response.get_json()
    assert (added["user_id"], added["email"], added["role"]) == (third.id, third.email, "member")

    response = await client.post(members_url, json={"email": third.email}, headers=owner.headers)
    problem_of(response, await response.get_json(), 409, "conflict")
    response = await client.post(members_url, json={"email": owner.email}, headers=owner.headers)
    problem_of(response, await response.get_json(), 409, "conflict")
    response = await client.post(
        members_url, json={"email": "ghost@example.com"}, headers=owner.headers
    )
    problem_of(response, await response.get_json(), 404, "not_found")
    response = await client.post(
        members_url, json={"email": stranger.email}, headers=member.headers
    )
    problem_of(response, await response.get_json(), 403, "forbidden")
    response = await client.get(members_url, headers=stranger.headers)
    problem_of(response, await response.get_json(), 404, "not_found")

    # A member may not remove another; the owner may; nobody removes the owner.
    response = await client.delete(f"{members_url}/{third.id}", headers=member.headers)
    problem_of(response, await response.get_json(), 403, "forbidden")
    for who in (owner, member):
        response = await client.delete(f"{members_url}/{owner.id}", headers=who.headers)
        problem_of(response, await response.get_json(), 403, "forbidden")
    response = await client.delete(f"{members_url}/{stranger.id}", headers=owner.headers)
    problem_of(response, await response.get_json(), 404, "not_found")
    response = await client.delete(f"{members_url}/{third.id}", headers=stranger.headers)
    problem_of(response, await response.get_json(), 404, "not_found")

    assert (
        await client.delete(f"{members_url}/{third.id}", headers=owner.headers)
    ).status_code == 204
    assert (
        await client.delete(f"{members_url}/{member.id}", headers=member.headers)
    ).status_code == 204
    remaining = await (await client.get(members_url, headers=owner.headers)).get_json()
    assert [m["user_id"] for m in remaining["items"]] == [owner.id]
    response = await client.get(f"/projects/{project['id']}", headers=member.headers)
    problem_of(response, await response.get_json(), 404, "not_found")


async def test_a_removed_members_tasks_become_unassigned(
    client: Client, owner: TestUser, member: TestUser, project: dict[str, Any]
) -> None:
    theirs = await create_task(client, project, owner, assignee_id=member.id)
    mine = await create_task(client, project, owner, assignee_id=owner.id)
    other = await create_project(client, owner, "Other")
    await add_member(client, other, owner, member)
    elsewhere = await create_task(client, other, owner, assignee_id=member.id)
    etag_before = (await client.get(f"/tasks/{theirs['id']}", headers=owner.headers)).headers[
        "ETag"
    ]

    response = await client.delete(
        f"/projects/{project['id']}/members/{member.id}", headers=owner.headers
    )
    assert response.status_code == 204
    after = await client.get(f"/tasks/{theirs['id']}", headers=owner.headers)
    assert (await after.get_json())["assignee_id"] is None
    assert after.headers["ETag"] != etag_before
    kept = await (await client.get(f"/tasks/{mine['id']}", headers=owner.headers)).get_json()
    assert kept["assignee_id"] == owner.id
    untouched = await client.get(f"/tasks/{elsewhere['id']}", headers=owner.headers)
    assert (await untouched.get_json())["assignee_id"] == member.id


async def test_deleting_a_project_takes_tasks_members_and_events(
    client: Client, app: Quart, owner: TestUser, member: TestUser, project: dict[str, Any]
) -> None:
    task = await create_task(client, project, member)
    keep = await create_project(client, owner, "Keep")
    response = await client.delete(f"/projects/{project['id']}", headers=owner.headers)
    assert response.status_code == 204
    for url in (f"/projects/{project['id']}", f"/tasks/{task['id']}"):
        response = await client.get(url, headers=owner.headers)
        problem_of(response, await response.get_json(), 404, "not_found")
    gone = uuid.UUID(project["id"])
    for model in (Task, ProjectMember, Event):
        assert await count_rows(app, model, model.project_id == gone) == 0
    assert await count_rows(app, Project, Project.id == uuid.UUID(keep["id"])) == 1


async def test_event_feed_pages_oldest_first(
    client: Client, owner: TestUser, stranger: TestUser, project: dict[str, Any]
) -> None:
    for n in range(3):
        await create_task(client, project, owner, title=f"t{n}")
    url = f"/projects/{project['id']}/events"
    everything = await (await client.get(url, headers=owner.headers)).get_json()
    kinds = [event["event"] for event in everything["items"]]
    assert kinds == ["project.created", "member.added"] + ["task.created"] * 3
    assert everything["next_cursor"] is None
    ids = [event["id"] for event in everything["items"]]
    assert ids == sorted(ids)

    page = await (await client.get(f"{url}?limit=2", headers=owner.headers)).get_json()
    assert [e["id"] for e in page["items"]] == ids[:2]
    rest = await (
        await client.get(f"{url}?since={page['next_cursor']}", headers=owner.headers)
    ).get_json()
    assert [e["id"] for e in rest["items"]] == ids[2:]

    response = await client.get(url, headers=stranger.headers)
    problem_of(response, await response.get_json(), 404, "not_found")
    for query in ("since=-1", "since=x", "limit=0", "limit=1001"):
        response = await client.get(f"{url}?{query}", headers=owner.headers)
        problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_a_name_that_shows_nothing_is_refused(client: Client, owner: TestUser) -> None:
    for name in ("\u200b\u200b", "\u2066\u2069", "\u115f"):
        response = await client.post("/projects", json={"name": name}, headers=owner.headers)
        body = await response.get_json()
        problem_of(response, body, 422, "validation_failed")
        assert body["errors"][0]["field"] == "name"
    assert (
        await client.post("/projects", json={"name": "ok\u200d"}, headers=owner.headers)
    ).status_code == 201
