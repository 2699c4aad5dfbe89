"""The event log: every write appends one event in its own transaction, and
the event is handed to the broker only once that transaction has committed.

Names: an *event* is a row of the log; its *kind* is what happened
(``task.created``…); its *envelope* is how clients receive it (the contract
calls the kind ``event`` there); a ``Published`` message is what the broker
carries between instances: the envelope and the id of the event before it.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Literal, NotRequired, TypedDict

import orjson
from sqlalchemy import bindparam, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from ..access import ProjectLock
from ..db import AnyRow, after_commit, backends, rows
from ..jsonio import dumps
from ..models import Event

# Pages in which the log is read back for a catch-up or a replay: events are
# at most about 120 KiB, so a page holds a few MiB at most.
READ_PAGE_SIZE = 50


class EventKind(StrEnum):
    PROJECT_CREATED = "project.created"
    PROJECT_UPDATED = "project.updated"
    PROJECT_DELETED = "project.deleted"
    MEMBER_ADDED = "member.added"
    MEMBER_REMOVED = "member.removed"
    TASK_CREATED = "task.created"
    TASK_UPDATED = "task.updated"
    TASK_DELETED = "task.deleted"


class Envelope(TypedDict):
    """An event as clients receive it, over the WebSocket and from the feed."""

    type: Literal["event"]
    id: int
    event: str
    project_id: str
    actor_id: str | None
    occurred_at: str
    data: dict[str, Any]
    changes: NotRequired[dict[str, Any]]


class Published(TypedDict):
    """What the broker carries: a committed event, and the project's event
    before it (0 for none), which lets a listener tell a gap from the next in line."""

    project_id: str
    prev_id: int
    envelope: Envelope


@dataclass(frozen=True)
class EventPage:
    items: list[Envelope]
    next_since: int | None  # where the next page starts; None on the last one


def jsonable(value: Any) -> Any:
    """*value* as plain JSON types, exactly as a client will read it."""
    return orjson.loads(dumps(value))


def envelope(
    event_id: int,
    kind: str,
    project_id: uuid.UUID,
    actor_id: uuid.UUID | None,
    occurred_at: datetime,
    data: dict[str, Any],
    changes: dict[str, Any] | None,
) -> Envelope:
    message: Envelope = {
        "type": "event",
        "id": event_id,
        "event": kind,
        "project_id": str(project_id),
        "actor_id": str(actor_id) if actor_id else None,
        "occurred_at": jsonable(occurred_at),
        "data": data,
    }
    if changes is not None:
        message["changes"] = changes
    return message


def envelope_of(row: AnyRow) -> Envelope:
    return envelope(
        row.id, row.kind, row.project_id, row.actor_id, row.occurred_at, row.data, row.changes
    )


async def record_event(
    db_session: AsyncSession,
    lock: ProjectLock,
    kind: EventKind,
    actor_id: uuid.UUID,
    data: Mapping[str, Any],
    changes: Mapping[str, Any] | None = None,
) -> None:
    """Append an event to the project's log; publish it after the transaction commits.

    The project's lock, held until the commit, makes the project's latest event
    the one before this; it travels along as ``prev_id``.
    """
    project_id = lock.project_id
    prev_id = await latest_event_id(db_session, project_id)
    occurred_at = datetime.now(UTC)
    plain_data = jsonable(data)
    plain_changes = jsonable(changes) if changes is not None else None
    event_id = (
        await db_session.execute(
            insert(Event)
            .values(
                project_id=project_id,
                kind=kind,
                actor_id=actor_id,
                occurred_at=occurred_at,
                data=plain_data,
                changes=plain_changes,
            )
            .returning(Event.id)
        )
    ).scalar_one()
    message: Published = {
        "project_id": str(project_id),
        "prev_id": prev_id,
        "envelope": envelope(
            event_id, kind, project_id, actor_id, occurred_at, plain_data, plain_changes
        ),
    }
    after_commit(db_session, backends().broker.publish, message)


LATEST_EVENT_ID = select(func.max(Event.id)).where(Event.project_id == bindparam("project_id"))


async def latest_event_id(db_session: AsyncSession, project_id: uuid.UUID) -> int:
    """The id of the project's latest event, 0 when it has none."""
    latest = await rows(db_session, LATEST_EVENT_ID, {"project_id": project_id})
    return latest.scalar_one() or 0


LATEST_IDS_PER_STATEMENT = 100


async def latest_event_ids(
    db_session: AsyncSession, project_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, int]:
    """The id of each project's latest event (0 when it has none), in one
    round trip per hundred projects: a column per project, each its own
    lookup of the (project_id, id) index."""
    latest: dict[uuid.UUID, int] = {}
    for start in range(0, len(project_ids), LATEST_IDS_PER_STATEMENT):
        chunk = project_ids[start : start + LATEST_IDS_PER_STATEMENT]
        statement = select(
            *(
                select(func.max(Event.id)).where(Event.project_id == project_id).scalar_subquery()
                for project_id in chunk
            )
        )
        row = (await rows(db_session, statement)).one()
        latest.update(zip(chunk, (value or 0 for value in row), strict=True))
    return latest


EVENTS_AFTER = (
    select(
        Event.id,
        Event.kind.label("kind"),
        Event.project_id,
        Event.actor_id,
        Event.occurred_at,
        Event.data,
        Event.changes,
    )
    .where(Event.project_id == bindparam("project_id"), Event.id > bindparam("since"))
    .order_by(Event.id)
    .limit(bindparam("limit"))
)


async def event_page(
    db_session: AsyncSession, project_id: uuid.UUID, since: int, limit: int
) -> EventPage:
    """The project's first *limit* events with ``id > since``, oldest first."""
    params = {"project_id": project_id, "since": since, "limit": limit + 1}
    items = [envelope_of(row) for row in await rows(db_session, EVENTS_AFTER, params)]
    if len(items) <= limit:
        return EventPage(items, None)
    items = items[:limit]
    return EventPage(items, items[-1]["id"])


async def events_after(
    db_session: AsyncSession, project_id: uuid.UUID, since: int
) -> AsyncIterator[Envelope]:
    """Every event of the project with ``id > since``, oldest first, read page by page."""
    next_since: int | None = since
    while next_since is not None:
        page = await event_page(db_session, project_id, next_since, READ_PAGE_SIZE)
        for item in page.items:
            yield item
        next_since = page.next_since
