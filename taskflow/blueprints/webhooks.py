"""A project's webhooks: its events POSTed to URLs its owner registers.

Owner only: a member gets 403, a stranger 404. Writes take the project's lock
and check the owner under it; reads check the caller's role. A URL is checked
against the SSRF rule (``outbound``) before any of that, so that no database
connection waits on a DNS lookup. Deliveries themselves are ``delivery``'s.
"""

from __future__ import annotations

import uuid
from typing import Annotated

from pydantic import AwareDatetime, BaseModel, Field, StringConstraints
from quart import Blueprint, Response, current_app
from quart_schema import validate_querystring, validate_request
from sqlalchemy.ext.asyncio import AsyncSession

from ..access import lock_project, require_member, require_owner
from ..config import Config
from ..data import webhooks
from ..data.events import EventKind
from ..db import session
from ..errors import APIError, validation_failed
from ..idempotency import answers_with_a_secret
from ..jsonio import json_response, no_content
from ..models import MemberRole
from ..openapi import documents, responds
from ..outbound import MAX_URL_LENGTH, Refused, check_url
from ..schemas import Description, NoNul, Page, RequestModel
from ..security import require_auth
from ..tokens import Caller

blueprint = Blueprint("webhooks", __name__)

OWNER_ACTION = "manage its webhooks"


class WebhookOut(BaseModel):
    id: uuid.UUID
    url: str
    events: list[str] | None = Field(description="The kinds of event sent; null: every kind.")
    description: str | None
    active: bool
    disabled_reason: str | None = Field(
        description="Why the webhook is inactive: its owner, a 410, or 3 days of failures."
    )
    last_success_at: AwareDatetime | None
    failing_since: AwareDatetime | None = Field(
        description="Since when every delivery has failed; null while they succeed."
    )
    created_at: AwareDatetime


class CreatedWebhookOut(WebhookOut):
    secret: str = Field(
        description="The signing secret (`whsec_…`), shown this once: keep it to verify "
        "`webhook-signature`."
    )


class WebhookList(BaseModel):
    items: list[WebhookOut]


WebhookURL = Annotated[
    str,
    StringConstraints(max_length=MAX_URL_LENGTH, pattern="^[Hh][Tt][Tt][Pp][Ss]?://"),
    NoNul,
    Field(
        json_schema_extra={
            "format": "uri",
            "description": (
                "An https:// URL whose host resolves only to public addresses (checked "
                "again at every delivery); http:// and private addresses only where the "
                "server allows them (TASKFLOW_WEBHOOK_ALLOW_PRIVATE). No credentials, no "
                "fragment."
            ),
        }
    ),
]
EventKinds = Annotated[
    list[EventKind],
    Field(min_length=1, max_length=len(EventKind), description="Kinds of event to send."),
]


async def checked_url(url: str) -> str:
    """*url* if the SSRF rule lets TaskFlow deliver to it; else a 422 on `url`."""
    config: Config = current_app.config["TASKFLOW"]
    try:
        return await check_url(url, config.webhook_allow_private)
    except Refused as refused:
        raise validation_failed([{"field": "url", "message": str(refused)}]) from None


def kinds_of(events: list[EventKind] | None) -> list[str] | None:
    return list(dict.fromkeys(events)) if events is not None else None


async def require_owner_to_read(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> None:
    if await require_member(db_session, project_id, caller) is not MemberRole.OWNER:
        raise APIError(403, "forbidden", f"Only the project's owner may {OWNER_ACTION}.")


class WebhookCreate(RequestModel):
    url: WebhookURL
    events: EventKinds | None = None
    description: Description | None = None


@blueprint.post("/projects/<uuid:project_id>/webhooks")
@require_auth
@answers_with_a_secret
@documents(403, 409)
@validate_request(WebhookCreate)
@responds(CreatedWebhookOut, 201)
async def create_webhook(caller: Caller, project_id: uuid.UUID, data: WebhookCreate) -> Response:
    """Register a webhook: the project's events after now are POSTed to `url`. Owner only.

    `events` limits them to those kinds (default: every kind). `secret`, which
    signs every delivery, is in this response only. A project has at most 20
    webhooks (409 beyond).
    """
    url = await checked_url(data.url)
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, OWNER_ACTION)
    created = await webhooks.insert_webhook(
        db_session, lock, url, kinds_of(data.events), data.description
    )
    return json_response(created, 201)


@blueprint.get("/projects/<uuid:project_id>/webhooks")
@require_auth
@documents(403)
@responds(WebhookList)
async def list_webhooks(caller: Caller, project_id: uuid.UUID) -> Response:
    """List the project's webhooks, oldest first, without their secrets. Owner only."""
    db_session = session()
    await require_owner_to_read(db_session, project_id, caller)
    return json_response({"items": await webhooks.webhooks_of(db_session, project_id)})


class WebhookPatch(RequestModel):
    url: WebhookURL = None  # type: ignore[assignment]  # may be omitted, never null
    events: EventKinds | None = None
    description: Description | None = None
    active: bool = Field(None, strict=True)  # type: ignore[assignment]  # never null


@blueprint.patch("/projects/<uuid:project_id>/webhooks/<uuid:webhook_id>")
@require_auth
@documents(403)
@validate_request(WebhookPatch)
@responds(WebhookOut)
async def patch_webhook(
    caller: Caller, project_id: uuid.UUID, webhook_id: uuid.UUID, data: WebhookPatch
) -> Response:
    """Change the fields sent (`events: null`: every kind). Owner only.

    `active: true` re-activates a disabled webhook: delivery resumes at the
    event where it stopped, at once. `active: false` stops it after any
    delivery under way. A new `url` is tried at once too.
    """
    values = data.model_dump(include=data.model_fields_set)
    if "url" in values:
        values["url"] = await checked_url(data.url)
    if "events" in values:
        values["events"] = kinds_of(data.events)
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, OWNER_ACTION)
    return json_response(await webhooks.update_webhook(db_session, lock, webhook_id, values))


@blueprint.delete("/projects/<uuid:project_id>/webhooks/<uuid:webhook_id>")
@require_auth
@documents(403)
@responds(None, 204)
async def delete_webhook(caller: Caller, project_id: uuid.UUID, webhook_id: uuid.UUID) -> Response:
    """Delete a webhook and its delivery log. Owner only."""
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, OWNER_ACTION)
    await webhooks.delete_webhook(db_session, lock, webhook_id)
    return no_content()


class SecretOut(BaseModel):
    secret: str = Field(description="The new signing secret, shown this once.")


@blueprint.post("/projects/<uuid:project_id>/webhooks/<uuid:webhook_id>/rotate-secret")
@require_auth
@answers_with_a_secret
@documents(403)
@responds(SecretOut)
async def rotate_secret(caller: Caller, project_id: uuid.UUID, webhook_id: uuid.UUID) -> Response:
    """Replace the webhook's signing secret. Owner only.

    For 24 hours deliveries carry two signatures, by the new secret and the
    old one, so that receivers can switch without missing one.
    """
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, OWNER_ACTION)
    secret = await webhooks.rotate_secret(db_session, lock, webhook_id)
    return json_response({"secret": secret})


class DeliveryOut(BaseModel):
    id: uuid.UUID
    event_id: int
    attempt: int = Field(description="1 for the first attempt at this event, then each retry.")
    status_code: int | None = Field(description="The receiver's answer; null if there was none.")
    error: str | None = Field(
        description="What went wrong short of an answer, or what followed "
        "(given up, disabled); null for an answer alone."
    )
    duration_ms: int
    attempted_at: AwareDatetime


class DeliveryQuery(RequestModel):
    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = Field(None, max_length=1024)


@blueprint.get("/projects/<uuid:project_id>/webhooks/<uuid:webhook_id>/deliveries")
@require_auth
@documents(403)
@validate_querystring(DeliveryQuery)
@responds(Page[DeliveryOut])
async def list_deliveries(
    caller: Caller, project_id: uuid.UUID, webhook_id: uuid.UUID, query_args: DeliveryQuery
) -> Response:
    """The webhook's delivery log, newest first: every attempt, its answer or error.

    The newest 1,000 attempts of each webhook are kept. Owner only.
    """
    db_session = session()
    await require_owner_to_read(db_session, project_id, caller)
    page = await webhooks.delivery_page(
        db_session, project_id, webhook_id, query_args.limit, query_args.cursor
    )
    return json_response(page)


class Replay(RequestModel):
    since: int = Field(
        ge=0, le=2**63 - 1, strict=True, description="An event id: delivery resumes after it."
    )


@blueprint.post("/projects/<uuid:project_id>/webhooks/<uuid:webhook_id>/replay")
@require_auth
@documents(403)
@validate_request(Replay)
@responds(None, 202)
async def replay(
    caller: Caller, project_id: uuid.UUID, webhook_id: uuid.UUID, data: Replay
) -> Response:
    """Deliver every event of the project after `since` again, in order. Owner only.

    The webhook's position moves to `since` (a delivery under way finishes
    first); a `since` after the events not yet delivered skips them. Events
    keep their `webhook-id`, so receivers can tell a replay from a new event.
    """
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, OWNER_ACTION)
    await webhooks.replay_from(db_session, lock, webhook_id, data.since)
    return Response("", status=202)
