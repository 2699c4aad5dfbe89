"""The event log: every write appends one event in its own transaction, and
the event is handed to the broker only once that transaction has committed."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

import orjson
from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from .db import AnyRow, after_commit, backends
from .jsonio import dumps
from .models import Event

EVENT_COLUMNS = (
    Event.id,
    Event.event,
    Event.project_id,
    Event.actor_id,
    Event.occurred_at,
    Event.data,
    Event.changes,
)


def jsonable(value: Any) -> Any:
    """*value* as plain JSON types, exactly as a client will read it."""
    return orjson.loads(dumps(value))


def envelope(
    event_id: int,
    event: str,
    project_id: uuid.UUID,
    actor_id: uuid.UUID | None,
    occurred_at: datetime,
    data: dict[str, Any],
    changes: dict[str, Any] | None,
) -> dict[str, Any]:
    """The event as clients receive it, over the WebSocket and from the feed."""
    message: dict[str, Any] = {
        "type": "event",
        "id": event_id,
        "event": event,
        "project_id": str(project_id),
        "actor_id": str(actor_id) if actor_id else None,
        "occurred_at": jsonable(occurred_at),
        "data": data,
    }
    if changes is not None:
        message["changes"] = changes
    return message


def envelope_of(row: AnyRow) -> dict[str, Any]:
    return envelope(
        row.id, row.event, row.project_id, row.actor_id, row.occurred_at, row.data, row.changes
    )


async def record_event(
    db_session: AsyncSession,
    event: str,
    project_id: uuid.UUID,
    actor_id: uuid.UUID,
    data: dict[str, Any],
    changes: dict[str, Any] | None = None,
) -> None:
    """Append *event* to the log; publish it after the transaction commits.

    The caller holds the project's lock, so the project's latest event is the
    one before this; it travels along as ``prev_id``, which lets every listener
    tell a gap (a message still on its way, or lost while Redis was away) from
    the next event in line.
    """
    prev_id = await latest_event_id(db_session, project_id)
    occurred_at = datetime.now(UTC)
    data = jsonable(data)
    changes = jsonable(changes) if changes is not None else None
    event_id = (
        await db_session.execute(
            insert(Event)
            .values(
                project_id=project_id,
                event=event,
                actor_id=actor_id,
                occurred_at=occurred_at,
                data=data,
                changes=changes,
            )
            .returning(Event.id)
        )
    ).scalar_one()
    message = envelope(event_id, event, project_id, actor_id, occurred_at, data, changes)
    after_commit(
        db_session,
        backends().broker.publish,
        {"project_id": str(project_id), "prev_id": prev_id, "event": message},
    )


async def latest_event_id(db_session: AsyncSession, project_id: uuid.UUID) -> int:
    """The id of the project's latest event, 0 when it has none."""
    latest = await db_session.execute(
        select(func.max(Event.id)).where(Event.project_id == project_id)
    )
    return latest.scalar_one() or 0


async def events_after(
    db_session: AsyncSession, project_id: uuid.UUID, since: int, limit: int
) -> list[dict[str, Any]]:
    """The project's events with ``id > since``, oldest first."""
    rows = await db_session.execute(
        select(*EVENT_COLUMNS)
        .where(Event.project_id == project_id, Event.id > since)
        .order_by(Event.id)
        .limit(limit)
    )
    return [envelope_of(row) for row in rows]
