"""Webhooks: what their owner registers and reads (the routes hold the
project's lock for every write), and where each one's delivery stands, for
the deliverer (``taskflow.webhooks``): claiming due webhooks, reading the
next event, recording an attempt.

A webhook's ``position`` is the last event of its project it has finished;
the event after it is the only one it may be sent. A claim is a lease on the
webhook (``lease_until``, with a token in ``lease_owner``); an attempt's
outcome is recorded only while the lease is still the claim's, and moves the
position only if nothing (a replay) moved it meanwhile.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

from sqlalchemy import and_, bindparam, delete, func, insert, or_, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased

from ..access import ProjectLock
from ..db import rows
from ..errors import APIError
from ..models import Event, Webhook, WebhookDelivery
from ..outbound import new_secret
from ..pagination import Paged, decode_cursor, encode_cursor
from .events import Envelope, event_page, latest_event_id
from .projects import decode_position

# A project's webhooks, at most: each one is a request per event.
MAX_WEBHOOKS_PER_PROJECT = 20
# The previous secret signs too for this long after a rotation.
ROTATION_OVERLAP = timedelta(hours=24)
# Each webhook's delivery log keeps its newest attempts; each attempt
# recorded deletes up to a batch of those beyond.
KEPT_DELIVERIES = 1000
PURGE_BATCH = 100
# Events read at once to find the next one a webhook's filter lets through.
SCAN_EVENTS = 100
DISABLED_BY_OWNER = "disabled by the project's owner"


class WebhookRecord(TypedDict):
    id: uuid.UUID
    url: str
    events: list[str] | None
    description: str | None
    active: bool
    disabled_reason: str | None
    last_success_at: datetime | None
    failing_since: datetime | None
    created_at: datetime


class CreatedWebhook(WebhookRecord):
    secret: str


class DeliveryRecord(TypedDict):
    id: uuid.UUID
    event_id: int
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: int
    attempted_at: datetime


WEBHOOK_FIELDS = (
    Webhook.id,
    Webhook.url,
    Webhook.events,
    Webhook.description,
    Webhook.active,
    Webhook.disabled_reason,
    Webhook.last_success_at,
    Webhook.failing_since,
    Webhook.created_at,
)
DELIVERY_FIELDS = (
    WebhookDelivery.id,
    WebhookDelivery.event_id,
    WebhookDelivery.attempt,
    WebhookDelivery.status_code,
    WebhookDelivery.error,
    WebhookDelivery.duration_ms,
    WebhookDelivery.attempted_at,
)


def webhook_not_found() -> APIError:
    return APIError(404, "not_found", "Webhook not found.")


def _of_project(project_id: uuid.UUID, webhook_id: uuid.UUID) -> Any:
    return and_(Webhook.id == webhook_id, Webhook.project_id == project_id)


# The owner's side.


async def insert_webhook(
    db_session: AsyncSession,
    lock: ProjectLock,
    url: str,
    kinds: list[str] | None,
    description: str | None,
) -> CreatedWebhook:
    """Register a webhook; it receives the events after the project's latest
    (under the lock, no event can commit in between)."""
    count = select(func.count()).where(Webhook.project_id == lock.project_id)
    if (await rows(db_session, count)).scalar_one() >= MAX_WEBHOOKS_PER_PROJECT:
        raise APIError(
            409, "conflict", f"A project has at most {MAX_WEBHOOKS_PER_PROJECT} webhooks."
        )
    now = datetime.now(UTC)
    secret = new_secret()
    created = await rows(
        db_session,
        insert(Webhook)
        .values(
            id=uuid.uuid4(),
            project_id=lock.project_id,
            url=url,
            events=kinds,
            description=description,
            secret=secret,
            active=True,
            position=await latest_event_id(db_session, lock.project_id),
            attempt=0,
            next_attempt_at=now,
            created_at=now,
        )
        .returning(*WEBHOOK_FIELDS),
    )
    return {**created.one()._asdict(), "secret": secret}  # type: ignore[typeddict-item]


async def webhooks_of(db_session: AsyncSession, project_id: uuid.UUID) -> list[WebhookRecord]:
    """The project's webhooks, oldest first."""
    query = (
        select(*WEBHOOK_FIELDS)
        .where(Webhook.project_id == project_id)
        .order_by(Webhook.created_at, Webhook.id)
    )
    return [row._asdict() for row in await rows(db_session, query)]  # type: ignore[misc]


async def update_webhook(
    db_session: AsyncSession, lock: ProjectLock, webhook_id: uuid.UUID, values: dict[str, Any]
) -> WebhookRecord:
    """Change the fields in *values* (url, events, description, active).

    Re-activating a disabled webhook resumes at the event where it stopped,
    at once and with a fresh count of attempts, as a new URL does (the old
    one was perhaps why it failed); disabling it stops it after any delivery
    under way.
    """
    where = _of_project(lock.project_id, webhook_id)
    active = (
        await rows(db_session, select(Webhook.active).where(where).with_for_update())
    ).scalar_one_or_none()
    if active is None:
        raise webhook_not_found()
    changes = dict(values)
    now = datetime.now(UTC)
    if "url" in changes:
        changes.update(attempt=0, next_attempt_at=now)
    if changes.get("active") is False and active:
        changes["disabled_reason"] = DISABLED_BY_OWNER
    elif changes.get("active") is True and not active:
        changes.update(disabled_reason=None, attempt=0, next_attempt_at=now, failing_since=None)
    if changes:
        statement = update(Webhook).where(where).values(**changes).returning(*WEBHOOK_FIELDS)
        result = await rows(db_session, statement)
    else:
        result = await rows(db_session, select(*WEBHOOK_FIELDS).where(where))
    updated: WebhookRecord = result.one()._asdict()  # type: ignore[assignment]
    return updated


async def delete_webhook(
    db_session: AsyncSession, lock: ProjectLock, webhook_id: uuid.UUID
) -> None:
    """Delete a webhook with its delivery log (a delivery under way finishes unrecorded)."""
    deleted = await rows(
        db_session,
        delete(Webhook).where(_of_project(lock.project_id, webhook_id)).returning(Webhook.id),
    )
    if deleted.first() is None:
        raise webhook_not_found()


async def rotate_secret(db_session: AsyncSession, lock: ProjectLock, webhook_id: uuid.UUID) -> str:
    """A new secret; the one it replaces signs too for ``ROTATION_OVERLAP``
    (a rotation within that time ends the overlap of the one before)."""
    secret = new_secret()
    rotated = await rows(
        db_session,
        update(Webhook)
        .where(_of_project(lock.project_id, webhook_id))
        .values(
            secret=secret,
            previous_secret=Webhook.secret,
            previous_secret_until=datetime.now(UTC) + ROTATION_OVERLAP,
        )
        .returning(Webhook.id),
    )
    if rotated.first() is None:
        raise webhook_not_found()
    return secret


async def replay_from(
    db_session: AsyncSession, lock: ProjectLock, webhook_id: uuid.UUID, since: int
) -> None:
    """Deliver every event of the project after *since* again, in order: the
    webhook's position goes back to *since* (at most the project's latest
    event: ids are shared by all projects, so a later one would skip events
    still to come). A delivery under way finishes, and the replay follows."""
    position = min(since, await latest_event_id(db_session, lock.project_id))
    replayed = await rows(
        db_session,
        update(Webhook)
        .where(_of_project(lock.project_id, webhook_id))
        .values(position=position, attempt=0, next_attempt_at=datetime.now(UTC))
        .returning(Webhook.id),
    )
    if replayed.first() is None:
        raise webhook_not_found()


async def delivery_page(
    db_session: AsyncSession,
    project_id: uuid.UUID,
    webhook_id: uuid.UUID,
    limit: int,
    cursor: str | None,
) -> Paged[DeliveryRecord]:
    """The webhook's delivery log, newest first."""
    found = select(Webhook.id).where(_of_project(project_id, webhook_id))
    if (await rows(db_session, found)).first() is None:
        raise webhook_not_found()
    scope = f"deliveries:{webhook_id}"
    order = (WebhookDelivery.attempted_at, WebhookDelivery.id)
    query = select(*DELIVERY_FIELDS).where(WebhookDelivery.webhook_id == webhook_id)
    if cursor is not None:
        attempted_at, last_id = decode_position(decode_cursor(cursor, scope))
        query = query.where(tuple_(*order) < (attempted_at, last_id))
    query = query.order_by(*(column.desc() for column in order)).limit(limit + 1)
    items: list[DeliveryRecord] = [row._asdict() for row in await rows(db_session, query)]  # type: ignore[misc]
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        next_cursor = encode_cursor(scope, [items[-1]["attempted_at"], items[-1]["id"]])
    return {"items": items, "next_cursor": next_cursor}


# The deliverer's side.


@dataclass(frozen=True)
class Claim:
    """A webhook leased for one delivery, as it stood when claimed."""

    webhook_id: uuid.UUID
    project_id: uuid.UUID
    url: str
    kinds: frozenset[str] | None
    signing_secrets: tuple[str, ...]  # the current one first
    position: int
    attempt: int
    failing_since: datetime | None
    token: uuid.UUID


_due = aliased(Webhook, name="due")
# Active, its retry time come, not leased (or its lease run out: a process
# that died mid-delivery), and an event of its project after its position.
_DUE = and_(
    _due.active.is_(True),
    _due.next_attempt_at <= bindparam("now"),
    or_(_due.lease_until.is_(None), _due.lease_until < bindparam("now")),
    select(Event.id).where(Event.project_id == _due.project_id, Event.id > _due.position).exists(),
)
ANY_DUE = select(_due.id).where(_DUE).limit(1)
# Rows another process is claiming are skipped, not waited for (PostgreSQL;
# SQLite runs one writing transaction at a time and renders no FOR UPDATE).
CLAIM = (
    update(Webhook)
    .where(
        Webhook.id.in_(
            select(_due.id)
            .where(_DUE)
            .order_by(_due.next_attempt_at)
            .limit(bindparam("limit"))
            .with_for_update(skip_locked=True)
        )
    )
    .values(lease_until=bindparam("until"), lease_owner=bindparam("token"))
    .returning(
        Webhook.id,
        Webhook.project_id,
        Webhook.url,
        Webhook.events,
        Webhook.secret,
        Webhook.previous_secret,
        Webhook.previous_secret_until,
        Webhook.position,
        Webhook.attempt,
        Webhook.failing_since,
    )
)


async def any_due(db_session: AsyncSession, now: datetime) -> bool:
    """Whether a webhook has an event to be sent now (one indexed look)."""
    return (await rows(db_session, ANY_DUE, {"now": now})).first() is not None


async def claim_due(
    db_session: AsyncSession, now: datetime, limit: int, lease: timedelta
) -> list[Claim]:
    """Lease up to *limit* webhooks that have an event to be sent now."""
    token = uuid.uuid4()
    params = {"now": now, "limit": limit, "until": now + lease, "token": token}
    claims = []
    for row in await rows(db_session, CLAIM, params):
        signing_secrets = [row.secret]
        if row.previous_secret and row.previous_secret_until and row.previous_secret_until > now:
            signing_secrets.append(row.previous_secret)
        claims.append(
            Claim(
                webhook_id=row.id,
                project_id=row.project_id,
                url=row.url,
                kinds=frozenset(row.events) if row.events is not None else None,
                signing_secrets=tuple(signing_secrets),
                position=row.position,
                attempt=row.attempt,
                failing_since=row.failing_since,
                token=token,
            )
        )
    return claims


async def next_event(db_session: AsyncSession, claim: Claim) -> tuple[Envelope | None, int]:
    """The next event the claim's webhook is to be sent, if any, and the
    position just before it: past the events its filter leaves out."""
    page = await event_page(db_session, claim.project_id, claim.position, SCAN_EVENTS)
    passed = claim.position
    for event in page.items:
        if claim.kinds is None or event["event"] in claim.kinds:
            return event, passed
        passed = event["id"]
    return None, passed


@dataclass(frozen=True)
class Attempt:
    """One request to a webhook, for its delivery log."""

    event_id: int
    number: int  # 1 for the first attempt at this event
    status_code: int | None
    error: str | None
    duration_ms: int
    attempted_at: datetime


_LEASED = and_(Webhook.id == bindparam("webhook_id"), Webhook.lease_owner == bindparam("token"))
RELEASE = update(Webhook).where(_LEASED).values(lease_until=None, lease_owner=None)
_PURGED = (
    select(WebhookDelivery.id)
    .where(WebhookDelivery.webhook_id == bindparam("webhook_id"))
    .order_by(WebhookDelivery.attempted_at.desc(), WebhookDelivery.id.desc())
    .offset(KEPT_DELIVERIES)
    .limit(PURGE_BATCH)
)
PURGE = delete(WebhookDelivery).where(WebhookDelivery.id.in_(_PURGED))


async def record(
    db_session: AsyncSession, claim: Claim, changes: dict[str, Any], attempt: Attempt | None
) -> bool:
    """End the claim: apply *changes* (position, attempt, timing, state) and
    log *attempt*, if the lease is still the claim's; *changes* only if no
    replay moved the position meanwhile. False when the lease was lost."""
    leased = {"webhook_id": claim.webhook_id, "token": claim.token}
    moved = await rows(
        db_session,
        update(Webhook)
        .where(_LEASED, Webhook.position == claim.position)
        .values(lease_until=None, lease_owner=None, **changes)
        .returning(Webhook.id),
        leased,
    )
    if moved.first() is None:
        released = await rows(db_session, RELEASE.returning(Webhook.id), leased)
        if released.first() is None:
            return False
    if attempt is not None:
        await rows(
            db_session,
            insert(WebhookDelivery).values(
                id=uuid.uuid4(),
                webhook_id=claim.webhook_id,
                event_id=attempt.event_id,
                attempt=attempt.number,
                status_code=attempt.status_code,
                error=attempt.error,
                duration_ms=attempt.duration_ms,
                attempted_at=attempt.attempted_at,
            ),
        )
        await rows(db_session, PURGE, {"webhook_id": claim.webhook_id})
    return True


async def release(db_session: AsyncSession, claims: list[Claim]) -> None:
    """Give the claims' webhooks back at once (a process stopping mid-delivery)."""
    for claim in claims:
        await rows(db_session, RELEASE, {"webhook_id": claim.webhook_id, "token": claim.token})
