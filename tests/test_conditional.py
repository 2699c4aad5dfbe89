"""Conditional requests on a task and on a project: strong ETags,
``If-None-Match`` → 304, ``If-Match`` → 412 on writes."""

from __future__ import annotations

from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.models import Event, Project

from .support import TestUser, count_rows, create_task, problem_of


@pytest.fixture
async def task(client: Client, project: dict[str, Any], member: TestUser) -> dict[str, Any]:
    return await create_task(client, project, member)


def resource_paths(project: dict[str, Any], task: dict[str, Any]) -> list[str]:
    return [f"/tasks/{task['id']}", f"/projects/{project['id']}"]


async def test_reads_carry_a_strong_etag_and_answer_if_none_match_with_304(
    client: Client, owner: TestUser, project: dict[str, Any], task: dict[str, Any]
) -> None:
    for path in resource_paths(project, task):
        read = await client.get(path, headers=owner.headers)
        etag = read.headers["ETag"]
        assert etag.startswith('"') and etag.endswith('"')  # strong: no W/
        for sent in (etag, f"W/{etag}", f'"nope", {etag}', "*"):
            cached = await client.get(path, headers={**owner.headers, "If-None-Match": sent})
            assert cached.status_code == 304, (path, sent)
            assert cached.headers["ETag"] == etag
            assert await cached.get_data() == b""
        for sent in ('"nope"', etag.strip('"'), f'"{etag}"'):
            fresh = await client.get(path, headers={**owner.headers, "If-None-Match": sent})
            assert fresh.status_code == 200, (path, sent)
            assert await fresh.get_data() == await read.get_data()


async def test_a_write_changes_the_etag_and_ends_the_304s(
    client: Client, owner: TestUser, project: dict[str, Any], task: dict[str, Any]
) -> None:
    changes = {f"/tasks/{task['id']}": {"status": "completed"},
               f"/projects/{project['id']}": {"name": "Renamed"}}  # fmt: skip
    for path, change in changes.items():
        etag = (await client.get(path, headers=owner.headers)).headers["ETag"]
        written = await client.patch(path, json=change, headers=owner.headers)
        assert written.status_code == 200
        assert written.headers["ETag"] != etag
        read = await client.get(path, headers={**owner.headers, "If-None-Match": etag})
        assert read.status_code == 200
        assert read.headers["ETag"] == written.headers["ETag"]
        assert (await read.get_json()).items() >= change.items()


async def test_created_resources_carry_their_etag(
    client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    created = await client.post("/projects", json={"name": "New"}, headers=owner.headers)
    read = await client.get(created.headers["Location"], headers=owner.headers)
    assert created.headers["ETag"] == read.headers["ETag"]


async def test_a_stranger_gets_404_whatever_they_send(
    client: Client,
    stranger: TestUser,
    owner: TestUser,
    project: dict[str, Any],
    task: dict[str, Any],
) -> None:
    for path in resource_paths(project, task):
        etag = (await client.get(path, headers=owner.headers)).headers["ETag"]
        for header in ("If-None-Match", "If-Match"):
            response = await client.get(path, headers={**stranger.headers, header: etag})
            problem_of(response, await response.get_json(), 404, "not_found")


async def test_a_stale_if_match_on_a_project_write_is_412_and_changes_nothing(
    app: Quart, client: Client, owner: TestUser, project: dict[str, Any]
) -> None:
    path = f"/projects/{project['id']}"
    stale = (await client.get(path, headers=owner.headers)).headers["ETag"]
    current = (await client.patch(path, json={"description": "v2"}, headers=owner.headers)).headers[
        "ETag"
    ]
    events = await count_rows(app, Event)
    before = await (await client.get(path, headers=owner.headers)).get_json()
    for method, body in (
        ("PUT", {"name": "Stale"}),
        ("PATCH", {"name": "Stale"}),
        ("DELETE", None),
    ):
        response = await client.open(
            path, method=method, json=body, headers={**owner.headers, "If-Match": stale}
        )
        problem_of(response, await response.get_json(), 412, "precondition_failed")
    assert await (await client.get(path, headers=owner.headers)).get_json() == before
    assert await count_rows(app, Event) == events
    weak = await client.patch(
        path, json={"name": "Weak"}, headers={**owner.headers, "If-Match": f"W/{current}"}
    )
    assert weak.status_code == 412  # If-Match compares strongly
    replaced = await client.put(
        path, json={"name": "Fresh"}, headers={**owner.headers, "If-Match": current}
    )
    assert replaced.status_code == 200
    deleted = await client.delete(
        path, headers={**owner.headers, "If-Match": replaced.headers["ETag"]}
    )
    assert deleted.status_code == 204
    assert await count_rows(app, Project) == 0
