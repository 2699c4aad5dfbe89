"""The whole journey of two users, and the event log it leaves behind."""

import asyncio
from typing import Any

from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.broker import RedisBroker
from taskflow.db import backends

from .support import create_project, create_user


async def test_two_users_work_on_a_project(app: Quart, client: Client) -> None:
    ada = await create_user(client, "ada@example.com")
    bob = await create_user(client, "bob@example.com")
    project = await create_project(client, ada, "Release")
    pid = project["id"]

    published: list[dict[str, Any]] = []
    async with app.app_context():
        broker = backends().broker
    # The project's creation was published before this subscription, and
    # through Redis may still be on its way: only the writes below count.
    broker.subscribe(
        lambda message: (
            published.append(message["envelope"])
            if message["project_id"] == pid and message["envelope"]["event"] != "project.created"
            else None
        )
    )
    if isinstance(broker, RedisBroker):
        await asyncio.wait_for(broker.subscribed.wait(), 5)

    writes: list[str] = []

    async def write(user: Any, method: str, url: str, body: Any = None, headers: Any = None) -> Any:
        response = await client.open(
            url, method=method, json=body, headers={**user.headers, **(headers or {})}
        )
        assert response.status_code < 300, await response.get_json()
        return response

    await write(ada, "POST", f"/projects/{pid}/members", {"email": "bob@example.com"})
    writes.append("member.added")
    bob_task = await (
        await write(bob, "POST", f"/projects/{pid}/tasks", {"title": "Draft notes"})
    ).get_json()
    writes.append("task.created")
    ada_task = await (
        await write(
            ada,
            "POST",
            f"/projects/{pid}/tasks",
            {"title": "Ship", "assignee_id": bob.id, "due_date": "2027-01-01T09:00:00Z"},
        )
    ).get_json()
    writes.append("task.created")

    mine = await (
        await client.get(f"/projects/{pid}/tasks?assignee_id=me", headers=bob.headers)
    ).get_json()
    assert [task["id"] for task in mine["items"]] == [ada_task["id"]]
    first_page = await (
        await client.get(f"/projects/{pid}/tasks?limit=1&sort=title", headers=bob.headers)
    ).get_json()
    assert first_page["items"][0]["title"] == "Draft notes" and first_page["next_cursor"]

    response = await client.get(f"/tasks/{ada_task['id']}", headers=bob.headers)
    await write(
        bob,
        "PATCH",
        f"/tasks/{ada_task['id']}",
        {"status": "in_progress"},
        {"If-Match": response.headers["ETag"]},
    )
    writes.append("task.updated")
    await write(
        ada, "PUT", f"/tasks/{bob_task['id']}", {"title": "Final notes", "status": "completed"}
    )
    writes.append("task.updated")
    await write(bob, "DELETE", f"/tasks/{bob_task['id']}")
    writes.append("task.deleted")
    await write(ada, "PATCH", f"/projects/{pid}", {"name": "Release 1.0"})
    writes.append("project.updated")
    await write(bob, "DELETE", f"/projects/{pid}/members/{bob.id}")  # bob leaves
    writes.append("member.removed")

    feed = await (await client.get(f"/projects/{pid}/events", headers=ada.headers)).get_json()
    events = feed["items"]
    assert [e["event"] for e in events] == ["project.created", *writes]
    assert [e["id"] for e in events] == sorted(e["id"] for e in events)
    assert len({e["id"] for e in events}) == len(events)
    actors = [e["actor_id"] for e in events]
    assert actors == [ada.id, ada.id, bob.id, ada.id, bob.id, ada.id, bob.id, ada.id, bob.id]
    assert all(e["type"] == "event" and e["project_id"] == pid for e in events)
    assert all(e["occurred_at"].endswith("Z") for e in events)

    by_kind = [(e["event"], e.get("changes")) for e in events]
    assert by_kind[4] == ("task.updated", {"status": ["pending", "in_progress"]})
    assert by_kind[5] == (
        "task.updated",
        {"title": ["Draft notes", "Final notes"], "status": ["pending", "completed"]},
    )
    assert by_kind[7] == ("project.updated", {"name": ["Release", "Release 1.0"]})
    assert all("changes" not in e for e in events if not e["event"].endswith(".updated"))
    # data is the thing as GET returns it, after the change.
    assert (
        events[4]["data"]["status"] == "in_progress" and events[4]["data"]["id"] == ada_task["id"]
    )
    assert events[6]["data"]["title"] == "Final notes"
    assert events[8]["data"]["user_id"] == bob.id
    # Bob's assignment went with him.
    after = await (await client.get(f"/tasks/{ada_task['id']}", headers=ada.headers)).get_json()
    assert after["assignee_id"] is None

    await write(ada, "DELETE", f"/projects/{pid}")
    for _ in range(100):
        if published and published[-1]["event"] == "project.deleted":
            break
        await asyncio.sleep(0.02)
    # Every write was published once, in order, after its commit.
    assert [e["event"] for e in published] == [*writes, "project.deleted"]
    assert published[:-1] == events[1:]
    assert published[-1]["id"] > events[-1]["id"]
