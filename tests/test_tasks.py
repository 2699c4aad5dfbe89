"""CONTRACT "Tasks" and "Pagination"."""

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.blueprints.tasks import TaskOut
from taskflow.db import backends

from .support import (
    ON_POSTGRES,
    TestUser,
    create_project,
    create_task,
    problem_of,
    redis_only,
    snapshot,
    statements,
    tampered,
)


async def test_create_and_get(client: Client, project: dict[str, Any], member: TestUser) -> None:
    body = {
        "title": "  Write the docs ",
        "description": "all of them",
        "status": "in_progress",
        "assignee_id": member.id,
        "due_date": "2026-12-24T18:00:00+01:00",
    }
    response = await client.post(
        f"/projects/{project['id']}/tasks", json=body, headers=member.headers
    )
    assert response.status_code == 201
    task = await response.get_json()
    TaskOut.model_validate(task)
    assert response.headers["Location"] == f"/tasks/{task['id']}"
    assert (task["title"], task["status"], task["assignee_id"]) == (
        "Write the docs",
        "in_progress",
        member.id,
    )
    assert task["due_date"] == "2026-12-24T17:00:00Z"
    assert task["project_id"] == project["id"]

    fetched = await client.get(response.headers["Location"], headers=member.headers)
    assert (fetched.status_code, await fetched.get_json()) == (200, task)
    assert fetched.headers["ETag"] == response.headers["ETag"]


async def test_defaults(client: Client, project: dict[str, Any], owner: TestUser) -> None:
    task = await create_task(client, project, owner, title="Bare")
    assert (task["description"], task["status"], task["assignee_id"], task["due_date"]) == (
        None,
        "pending",
        None,
        None,
    )


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"title": ""}, "title"),
        ({"title": "   "}, "title"),
        ({"title": "x" * 501}, "title"),
        ({"title": None}, "title"),
        ({}, "title"),
        ({"title": "ok", "description": "d" * 10_001}, "description"),
        ({"title": "ok", "status": "done"}, "status"),
        ({"title": "ok", "status": None}, "status"),
        ({"title": "ok", "due_date": "2026-12-24T18:00:00"}, "due_date"),
        ({"title": "ok", "due_date": "2026-12-24"}, "due_date"),
        ({"title": "ok", "due_date": 0}, "due_date"),
        ({"title": "ok", "due_date": 1767225600}, "due_date"),
        ({"title": "ok", "due_date": "2026-12-24T18:00Z"}, "due_date"),
        ({"title": "ok", "due_date": "0000-01-01T00:00:00Z"}, "due_date"),
        ({"title": "ok", "due_date": "10000-01-01T00:00:00Z"}, "due_date"),
        ({"title": "ok", "due_date": "0001-01-01T00:30:00+01:00"}, "due_date"),
        ({"title": "ok", "assignee_id": "not-a-uuid"}, "assignee_id"),
        ({"title": "ok", "assignee_id": str(uuid.uuid4())}, "assignee_id"),
        ({"title": "ok", "id": str(uuid.uuid4())}, "id"),
        ({"title": "ok", "project_id": str(uuid.uuid4())}, "project_id"),
        ({"title": "ok", "created_at": "2026-01-01T00:00:00Z"}, "created_at"),
        ({"title": "ok", "updated_at": "2026-01-01T00:00:00Z"}, "updated_at"),
        ({"title": "tab\x00nul"}, "title"),
    ],
)
async def test_task_fields_are_bounded(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser, body: Any, field: str
) -> None:
    before = await snapshot(app)
    response = await client.post(
        f"/projects/{project['id']}/tasks", json=body, headers=owner.headers
    )
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert field in [error["field"] for error in payload["errors"]], payload
    assert await snapshot(app) == before


async def test_task_bounds_are_inclusive(
    client: Client, project: dict[str, Any], owner: TestUser
) -> None:
    task = await create_task(
        client,
        project,
        owner,
        title=" " + "t" * 500 + " ",
        description="d" * 10_000,
        due_date="9999-12-31T23:59:59Z",
    )
    assert task["title"] == "t" * 500


async def test_the_assignee_must_be_a_member(
    client: Client, project: dict[str, Any], owner: TestUser, stranger: TestUser
) -> None:
    response = await client.post(
        f"/projects/{project['id']}/tasks",
        json={"title": "x", "assignee_id": stranger.id},
        headers=owner.headers,
    )
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert payload["errors"][0]["field"] == "assignee_id"
    task = await create_task(client, project, owner)
    response = await client.patch(
        f"/tasks/{task['id']}", json={"assignee_id": stranger.id}, headers=owner.headers
    )
    problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_put_replaces_and_patch_changes_only_what_is_sent(
    client: Client, project: dict[str, Any], owner: TestUser, member: TestUser
) -> None:
    task = await create_task(
        client,
        project,
        owner,
        description="d",
        status="in_progress",
        assignee_id=member.id,
        due_date="2027-01-01T00:00:00Z",
    )
    url = f"/tasks/{task['id']}"
    patched = await (
        await client.patch(url, json={"status": "completed"}, headers=member.headers)
    ).get_json()
    assert {k: v for k, v in patched.items() if k not in ("status", "updated_at")} == {
        k: v for k, v in task.items() if k not in ("status", "updated_at")
    }
    assert patched["status"] == "completed" and patched["updated_at"] > task["updated_at"]

    cleared = await (
        await client.patch(url, json={"due_date": None, "assignee_id": None}, headers=owner.headers)
    ).get_json()
    assert (cleared["due_date"], cleared["assignee_id"], cleared["description"]) == (
        None,
        None,
        "d",
    )

    replaced = await (
        await client.put(url, json={"title": "New"}, headers=owner.headers)
    ).get_json()
    assert (replaced["title"], replaced["description"], replaced["status"]) == (
        "New",
        None,
        "pending",
    )

    for body in ({"title": None}, {"status": None}, {"title": ""}, {"bogus": 1}):
        response = await client.patch(url, json=body, headers=owner.headers)
        problem_of(response, await response.get_json(), 422, "validation_failed")
    response = await client.put(url, json={"status": "pending"}, headers=owner.headers)
    problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_if_match(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser
) -> None:
    task = await create_task(client, project, owner)
    url = f"/tasks/{task['id']}"
    first_etag = (await client.get(url, headers=owner.headers)).headers["ETag"]

    response = await client.patch(
        url, json={"title": "v2"}, headers={**owner.headers, "If-Match": first_etag}
    )
    assert response.status_code == 200
    second_etag = response.headers["ETag"]
    assert second_etag != first_etag
    assert (await client.get(url, headers=owner.headers)).headers["ETag"] == second_etag

    before = await snapshot(app)
    for method, body in (
        ("PATCH", {"title": "lost"}),
        ("PUT", {"title": "lost"}),
        ("DELETE", None),
    ):
        response = await client.open(
            url, method=method, json=body, headers={**owner.headers, "If-Match": first_etag}
        )
        problem_of(response, await response.get_json(), 412, "precondition_failed")
    assert await snapshot(app) == before

    response = await client.put(
        url, json={"title": "v3"}, headers={**owner.headers, "If-Match": f'"x", {second_etag}'}
    )
    assert response.status_code == 200
    response = await client.delete(url, headers={**owner.headers, "If-Match": "*"})
    assert response.status_code == 204
    response = await client.get(url, headers=owner.headers)
    problem_of(response, await response.get_json(), 404, "not_found")


async def test_strangers_get_404_wherever_the_id_appears(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser, stranger: TestUser
) -> None:
    task = await create_task(client, project, owner, assignee_id=owner.id)
    before = await snapshot(app)
    attempts = [
        ("GET", f"/tasks/{task['id']}", None),
        ("PATCH", f"/tasks/{task['id']}", {"title": "x"}),
        ("PUT", f"/tasks/{task['id']}", {"title": "x"}),
        ("DELETE", f"/tasks/{task['id']}", None),
        ("GET", f"/projects/{project['id']}/tasks", None),
        ("POST", f"/projects/{project['id']}/tasks", {"title": "x"}),
        ("POST", f"/projects/{project['id']}/tasks", {"title": "x", "assignee_id": owner.id}),
    ]
    for method, url, body in attempts:
        response = await client.open(url, method=method, json=body, headers=stranger.headers)
        problem_of(response, await response.get_json(), 404, "not_found")
    assert await snapshot(app) == before

    # In their own project, someone else's user id as a filter simply matches nothing.
    theirs = await create_project(client, stranger, "Theirs")
    await create_task(client, theirs, stranger)
    response = await client.get(
        f"/projects/{theirs['id']}/tasks?assignee_id={owner.id}", headers=stranger.headers
    )
    assert (await response.get_json())["items"] == []


async def titles(client: Client, user: TestUser, project: dict[str, Any], query: str) -> list[str]:
    response = await client.get(f"/projects/{project['id']}/tasks?{query}", headers=user.headers)
    assert response.status_code == 200, await response.get_json()
    return [task["title"] for task in (await response.get_json())["items"]]


async def test_filters_and_search(
    client: Client, project: dict[str, Any], owner: TestUser, member: TestUser
) -> None:
    await create_task(
        client,
        project,
        owner,
        title="alpha",
        status="pending",
        assignee_id=owner.id,
        due_date="2027-01-10T00:00:00Z",
    )
    await create_task(
        client,
        project,
        owner,
        title="beta",
        status="in_progress",
        assignee_id=member.id,
        due_date="2027-01-20T00:00:00Z",
        description="Release notes for the launch",
    )
    await create_task(client, project, member, title="gamma", status="completed")
    await create_task(client, project, member, title="Launch party", status="pending")  # fmt: skip

    async def matching(query: str) -> set[str]:
        return set(await titles(client, owner, project, query))

    assert await matching("status=pending") == {"alpha", "Launch party"}
    assert await matching("status=in_progress,completed") == {"beta", "gamma"}
    assert await matching("assignee_id=me") == {"alpha"}
    assert await matching(f"assignee_id={member.id}") == {"beta"}
    assert await matching("assignee_id=none") == {"gamma", "Launch party"}
    assert await matching("due_before=2027-01-15T00:00:00Z") == {"alpha"}
    assert await matching("due_after=2027-01-15T00:00:00%2B01:00") == {"beta"}
    assert await matching("q=launch") == {"beta", "Launch party"}
    assert await matching("q=release%20launch") == {"beta"}
    assert await matching("q=PARTY") == {"Launch party"}
    assert await matching("q=launch&status=pending") == {"Launch party"}
    assert await matching("q=nothing-like-it") == set()
    # Words are separated by white space as the OpenAPI pattern has it: U+3000
    # separates, a control character such as U+001C is a (matchless) word.
    assert await matching("q=release%E3%80%80launch") == {"beta"}
    assert await matching("q=%1C") == set()


@pytest.mark.parametrize(
    "query",
    [
        "status=done",
        "status=pending,",
        "status=",
        "assignee_id=someone",
        "assignee_id=123",
        "due_before=2027-01-01T00:00:00",
        "due_after=tomorrow",
        "due_before=0",
        "due_after=1767225600",
        "sort=priority",
        "sort=--title",
        "limit=0",
        "limit=101",
        "limit=-1",
        "limit=1000000000",
        "limit=1.5",
        "cursor=not-a-cursor",
        "cursor=YWJj.ZGVm",
        "q=",
        "q=%00",
        "q=%20%09",
        "q=%E2%80%A8",  # U+2028, white space too (found by schemathesis)
        "unknown=1",
        "limit=1&limit=2",
    ],
)
async def test_bad_list_parameters_are_422(
    client: Client, project: dict[str, Any], owner: TestUser, query: str
) -> None:
    response = await client.get(f"/projects/{project['id']}/tasks?{query}", headers=owner.headers)
    problem_of(response, await response.get_json(), 422, "validation_failed")


SORTED_TASKS = [
    # title, due date: ties in every sort key, and tasks with no due date.
    ("d", "2027-03-01T00:00:00Z"),
    ("b", None),
    ("a", "2027-01-01T00:00:00Z"),
    ("c", "2027-01-01T00:00:00Z"),
    ("a", None),
    ("e", "2027-02-01T00:00:00Z"),
    ("b", "2027-02-01T00:00:00Z"),
]


async def every_page(
    client: Client, user: TestUser, project: dict[str, Any], sort: str, limit: int
) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    cursor = None
    while True:
        query = f"sort={sort}&limit={limit}" + (f"&cursor={cursor}" if cursor else "")
        response = await client.get(
            f"/projects/{project['id']}/tasks?{query}", headers=user.headers
        )
        page = await response.get_json()
        assert response.status_code == 200, page
        assert len(page["items"]) <= limit
        items += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return items


@pytest.mark.parametrize(
    "sort",
    ["created_at", "-created_at", "updated_at", "-updated_at", "due_date", "-due_date", "title",
     "-title"],
)  # fmt: skip
async def test_paging_visits_every_task_once_in_order(
    client: Client, project: dict[str, Any], owner: TestUser, sort: str
) -> None:
    created = [
        await create_task(client, project, owner, title=title, due_date=due)
        for title, due in SORTED_TASKS
    ]
    one_page = await every_page(client, owner, project, sort, 100)
    for limit in (1, 2, 3):
        paged = await every_page(client, owner, project, sort, limit)
        assert [t["id"] for t in paged] == [t["id"] for t in one_page]
    assert sorted(t["id"] for t in one_page) == sorted(t["id"] for t in created)

    field = sort.lstrip("-")
    values = [task[field] for task in one_page]
    present = [value for value in values if value is not None]
    assert present == sorted(present, reverse=sort.startswith("-"))
    if field == "due_date":  # tasks with no due date come last, both ways
        assert values[len(present) :] == [None] * (len(values) - len(present))


async def test_paging_never_repeats_when_tasks_are_added_meanwhile(
    client: Client, project: dict[str, Any], owner: TestUser
) -> None:
    for n in range(6):
        await create_task(client, project, owner, title=f"old {n}")
    seen: list[str] = []
    cursor = None
    while True:
        query = "limit=2" + (f"&cursor={cursor}" if cursor else "")
        page = await (
            await client.get(f"/projects/{project['id']}/tasks?{query}", headers=owner.headers)
        ).get_json()
        seen += [task["id"] for task in page["items"]]
        await create_task(client, project, owner, title="new")  # lands on a page already served
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == 6


async def test_a_cursor_belongs_to_its_list(
    client: Client, project: dict[str, Any], owner: TestUser
) -> None:
    for n in range(3):
        await create_task(client, project, owner, title=f"t{n}")
    other = await create_project(client, owner, "Other")
    page = await (
        await client.get(f"/projects/{project['id']}/tasks?limit=1", headers=owner.headers)
    ).get_json()
    cursor = page["next_cursor"]
    for url in (
        f"/projects/{project['id']}/tasks?sort=title&cursor={cursor}",
        f"/projects/{other['id']}/tasks?cursor={cursor}",
        f"/projects/{project['id']}/tasks?cursor={tampered(cursor)}",
    ):
        response = await client.get(url, headers=owner.headers)
        problem_of(response, await response.get_json(), 422, "validation_failed")


async def test_reads_take_few_round_trips_and_the_cache_takes_the_rest(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser
) -> None:
    for n in range(30):
        await create_task(client, project, owner, title=f"t{n}")
    task = await create_task(client, project, owner)
    # Without Redis the session check is a query too; with it, it is not SQL,
    # and memberships and tasks come from the cache once read.
    cached = app.config["TASKFLOW"].redis_url is not None
    session_check = 0 if cached else 1
    await client.get("/auth/me", headers=owner.headers)  # warm the session mark

    for read in range(2):
        async with statements(app) as sent:
            response = await client.get(
                f"/projects/{project['id']}/tasks?limit=25&sort=due_date", headers=owner.headers
            )
        assert len((await response.get_json())["items"]) == 25
        membership = 0 if cached and read else 1
        assert len(sent) == session_check + membership + 1, sent  # + the page
        assert not any("count(" in statement.lower() for statement in sent)
        if ON_POSTGRES:  # SQLAlchemy's SQLite dialect always writes LIMIT ? OFFSET ? (0)
            assert not any("OFFSET" in statement.upper() for statement in sent), sent

    for read in range(2):
        async with statements(app) as sent:
            response = await client.get(f"/tasks/{task['id']}", headers=owner.headers)
        assert response.status_code == 200
        # With the cache: the membership is cached by now, the task after one read.
        task_and_membership = (0 if read else 1) if cached else 2
        assert len(sent) == session_check + task_and_membership, sent


@asynccontextmanager
async def redis_round_trips(app: Quart) -> AsyncIterator[list[int]]:
    """How many round trips to Redis the app makes meanwhile (one list item each)."""
    made: list[int] = []
    async with app.app_context():
        gate = backends().redis
    original = gate.call

    async def counted(command: Any) -> Any:
        made.append(1)
        return await original(command)

    gate.call = counted  # type: ignore[method-assign]
    try:
        yield made
    finally:
        del gate.call


@redis_only
async def test_an_authenticated_read_takes_one_round_trip_to_redis(
    client: Client, app: Quart, project: dict[str, Any], owner: TestUser, stranger: TestUser
) -> None:
    """The session check, the rate limit and the caller's membership (and the
    task, whose project names the membership): one step."""
    task = await create_task(client, project, owner)
    urls = [f"/projects/{project['id']}/tasks", f"/tasks/{task['id']}"]
    for url in urls:  # the session's mark, the task and the role cached
        await client.get(url, headers=owner.headers)
    for url in urls * 3:
        async with redis_round_trips(app) as made:
            response = await client.get(url, headers=owner.headers)
        assert response.status_code == 200
        assert len(made) == 1, url
    # A stranger to the project reads the task as absent, in one step too.
    for _ in range(2):
        async with redis_round_trips(app) as made:
            response = await client.get(urls[1], headers=stranger.headers)
        assert response.status_code == 404
    assert len(made) == 1
    # Its session's mark says revoked once it is: the step spends and reads nothing.
    await client.post("/auth/logout", headers=owner.headers)
    response = await client.get(urls[0], headers=owner.headers)
    assert response.status_code == 401


async def test_a_cursor_past_long_wide_titles_is_accepted(
    client: Client, project: dict[str, Any], owner: TestUser
) -> None:
    """A title-sorted cursor holds the title: 500 characters of 4 bytes."""
    for n in range(3):
        await create_task(client, project, owner, title="𠜎" * 499 + str(n))
    url = f"/projects/{project['id']}/tasks?sort=title&limit=1"
    seen = []
    cursor = None
    for _ in range(3):
        page = await (
            await client.get(url + (f"&cursor={cursor}" if cursor else ""), headers=owner.headers)
        ).get_json()
        seen += [task["title"][-1] for task in page["items"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
        assert len(cursor) > 2048
    assert seen == ["0", "1", "2"]


@pytest.mark.parametrize(
    "title", ["\u200b", "\u200e\u200f", "\u202e\u2066\u2069", "\u3164", " \u2800 "]
)
async def test_a_title_that_shows_nothing_is_refused(
    client: Client, project: dict[str, Any], owner: TestUser, title: str
) -> None:
    response = await client.post(
        f"/projects/{project['id']}/tasks", json={"title": title}, headers=owner.headers
    )
    body = await response.get_json()
    problem_of(response, body, 422, "validation_failed")
    assert body["errors"][0]["field"] == "title"
    # Direction marks around words that show are fine.
    task = await create_task(client, project, owner, title="\u202b\u05e9\u05dc\u05d5\u05dd\u202c")
    patch = await client.patch(f"/tasks/{task['id']}", json={"title": title}, headers=owner.headers)
    problem_of(patch, await patch.get_json(), 422, "validation_failed")
