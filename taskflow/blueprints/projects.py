"""Projects, their members, and their event feed.

Each route parses, authorizes (``access``), calls one data function
(``data.projects``, ``data.events``) and responds.
"""

from __future__ import annotations

import uuid
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from ..access import lock_project, require_member, require_owner
from ..data import projects
from ..data.events import event_page
from ..db import session
from ..errors import APIError
from ..jsonio import json_response, no_content
from ..models import MemberRole
from ..openapi import documents, responds
from ..preconditions import IfMatch, not_modified
from ..schemas import Description, Email, Page, ProjectName, RequestModel
from ..security import require_auth
from ..tokens import Caller

blueprint = Blueprint("projects", __name__)


# Projects


class ProjectOut(BaseModel):
    id: uuid.UUID
    name: str
    description: str | None
    owner_id: uuid.UUID
    role: MemberRole
    created_at: AwareDatetime
    updated_at: AwareDatetime


class ProjectQuery(RequestModel):
    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = Field(None, max_length=1024)


@blueprint.get("/projects")
@require_auth
@validate_querystring(ProjectQuery)
@responds(Page[ProjectOut])
async def list_projects(caller: Caller, query_args: ProjectQuery) -> Response:
    """List the projects the caller owns or is a member of, newest first."""
    page = await projects.project_page(session(), caller, query_args.limit, query_args.cursor)
    return json_response(page)


class ProjectFields(RequestModel):
    """A project's writable fields, as POST and PUT take them."""

    name: ProjectName
    description: Description | None = None


@blueprint.post("/projects")
@require_auth
@documents(403)
@validate_request(ProjectFields)
@responds(ProjectOut, 201, headers=("Location", "ETag"))
async def create_project(caller: Caller, data: ProjectFields) -> Response:
    """Create a project; the caller becomes its owner (not with a token
    limited to projects: 403)."""
    if caller.project_ids is not None:
        raise APIError(403, "forbidden", "A token limited to projects cannot create one.")
    created = await projects.insert_project(session(), caller.user_id, data.name, data.description)
    headers = {"Location": f"/projects/{created.project['id']}", "ETag": created.etag}
    return json_response(created.project, 201, headers)


@blueprint.get("/projects/<uuid:project_id>")
@require_auth
@responds(ProjectOut, headers=("ETag",))
@responds(None, 304, headers=("ETag",))
async def get_project(caller: Caller, project_id: uuid.UUID) -> Response:
    """Get a project the caller is a member of, with its `ETag`.

    With `If-None-Match` naming the current `ETag`: 304, no body.
    """
    found = await projects.visible_project(session(), project_id, caller)
    return not_modified(found.etag) or json_response(found.project, headers={"ETag": found.etag})


@blueprint.put("/projects/<uuid:project_id>")
@require_auth
@documents(403, 412)
@validate_request(ProjectFields)
@responds(ProjectOut, headers=("ETag",))
async def replace_project(caller: Caller, project_id: uuid.UUID, data: ProjectFields) -> Response:
    """Replace a project's name and description (an omitted description becomes null).

    Owner only. With `If-Match`, a stale `ETag` is a 412 and nothing changes.
    """
    return await edit_project(caller, project_id, data.model_dump(include={"name", "description"}))


class ProjectPatch(RequestModel):
    name: ProjectName = None  # type: ignore[assignment]  # may be omitted, never null
    description: Description | None = None


@blueprint.patch("/projects/<uuid:project_id>")
@require_auth
@documents(403, 412)
@validate_request(ProjectPatch)
@responds(ProjectOut, headers=("ETag",))
async def patch_project(caller: Caller, project_id: uuid.UUID, data: ProjectPatch) -> Response:
    """Change the fields sent (`null` clears the description). Owner only; `If-Match` as for PUT."""
    return await edit_project(caller, project_id, data.model_dump(include=data.model_fields_set))


async def edit_project(caller: Caller, project_id: uuid.UUID, values: dict[str, Any]) -> Response:
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, "edit it")
    updated = await projects.update_project(db_session, lock, caller, values, IfMatch.of_request())
    return json_response(updated.project, headers={"ETag": updated.etag})


@blueprint.delete("/projects/<uuid:project_id>")
@require_auth
@documents(403, 412)
@responds(None, 204)
async def delete_project(caller: Caller, project_id: uuid.UUID) -> Response:
    """Delete a project with its tasks, members and events. Owner only; `If-Match` as for PUT."""
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, "delete it")
    await projects.remove_project(db_session, lock, caller, IfMatch.of_request())
    return no_content()


# Members


class MemberOut(BaseModel):
    user_id: uuid.UUID
    email: str
    role: MemberRole
    added_at: AwareDatetime


class MemberList(BaseModel):
    items: list[MemberOut]


@blueprint.get("/projects/<uuid:project_id>/members")
@require_auth
@responds(MemberList)
async def list_members(caller: Caller, project_id: uuid.UUID) -> Response:
    """List a project's members, the owner included, in the order they joined."""
    db_session = session()
    await require_member(db_session, project_id, caller)
    return json_response({"items": await projects.select_members(db_session, project_id)})


class MemberAdd(RequestModel):
    email: Email


@blueprint.post("/projects/<uuid:project_id>/members")
@require_auth
@documents(403, 409)
@validate_request(MemberAdd)
@responds(MemberOut, 201)
async def add_member(caller: Caller, project_id: uuid.UUID, data: MemberAdd) -> Response:
    """Add a registered user by email. Owner only; an unknown email is a 404."""
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    require_owner(lock, "add members")
    member = await projects.insert_member(db_session, lock, caller.user_id, data.email)
    return json_response(member, 201)


@blueprint.delete("/projects/<uuid:project_id>/members/<uuid:user_id>")
@require_auth
@documents(403)
@responds(None, 204)
async def remove_member(caller: Caller, project_id: uuid.UUID, user_id: uuid.UUID) -> Response:
    """Remove a member, or leave.

    The owner may remove any member, a member only themself; the owner cannot
    be removed. The removed member's tasks in the project become unassigned.
    """
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    await projects.delete_member(db_session, lock, caller.user_id, user_id)
    return no_content()


# Events


class EventOut(BaseModel):
    type: str
    id: int
    event: str
    project_id: uuid.UUID
    actor_id: uuid.UUID | None
    occurred_at: AwareDatetime
    data: dict[str, Any]
    changes: dict[str, list[Any]] | None = None


class EventQuery(RequestModel):
    since: int = Field(0, ge=0, le=2**63 - 1)
    limit: int = Field(100, ge=1, le=1000)


@blueprint.get("/projects/<uuid:project_id>/events")
@require_auth
@validate_querystring(EventQuery)
@responds(Page[EventOut])
async def list_events(caller: Caller, project_id: uuid.UUID, query_args: EventQuery) -> Response:
    """The project's events after `since`, oldest first: the catch-up feed.

    `next_cursor` is the `since` of the next page, or null on the last one.
    """
    db_session = session()
    await require_member(db_session, project_id, caller)
    page = await event_page(db_session, project_id, query_args.since, query_args.limit)
    next_cursor = str(page.next_since) if page.next_since is not None else None
    return json_response({"items": page.items, "next_cursor": next_cursor})
