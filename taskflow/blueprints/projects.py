"""Projects and their members.

Authorization is in the queries: a project is found only through the
caller's membership, so a stranger's project is simply not there (404), and
what only the owner may do is a 403 for a member.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, Field
from quart import Blueprint
from quart_schema import validate_querystring, validate_request
from sqlalchemy import and_, bindparam, delete, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .. import cache
from ..db import AnySelect, after_commit, rows, session
from ..errors import APIError
from ..events import events_after, record_event
from ..models import MemberRole, Project, ProjectMember, Task, User
from ..openapi import documents, responds
from ..pagination import decode_cursor, encode_cursor, invalid_cursor
from ..schemas import Description, Email, Page, ProjectName, RequestModel
from ..security import Auth, require_auth
from .auth import find_user_by_email

blueprint = Blueprint("projects", __name__)


# Authorization


def project_not_found() -> APIError:
    return APIError(404, "not_found", "Project not found.")


ROLE_OF_MEMBER = select(ProjectMember.role).where(
    ProjectMember.project_id == bindparam("project_id"),
    ProjectMember.user_id == bindparam("user_id"),
)
LOCKED_ROLE_OF_MEMBER = ROLE_OF_MEMBER.join(
    Project, Project.id == ProjectMember.project_id
).with_for_update(of=Project)


async def project_role(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID, *, for_write: bool = False
) -> MemberRole:
    """The caller's role in the project, or a 404 when they are not a member.

    A write also locks the project's row until the transaction ends, so that
    the project's events commit in the order of their ids.
    """
    role: MemberRole | None
    if for_write:
        params = {"project_id": project_id, "user_id": user_id}
        role = (await rows(db_session, LOCKED_ROLE_OF_MEMBER, params)).scalar_one_or_none()
    else:
        role = await member_role(db_session, project_id, user_id)
    if role is None:
        raise project_not_found()
    return role


async def member_role(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> MemberRole | None:
    """The user's role in the project, if any, for a read: from the cache."""

    async def load() -> bytes:
        params = {"project_id": project_id, "user_id": user_id}
        found = (await rows(db_session, ROLE_OF_MEMBER, params)).scalar_one_or_none()
        return found.encode() if found is not None else b""

    cached = await cache.through(cache.membership(project_id, user_id), load)
    return MemberRole(cached.decode()) if cached else None


def require_owner(role: MemberRole, action: str) -> None:
    if role is not MemberRole.OWNER:
        raise APIError(403, "forbidden", f"Only the project's owner may {action}.")


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
async def list_projects(auth: Auth, query_args: ProjectQuery) -> dict[str, Any]:
    """List the projects the caller owns or is a member of, newest first."""
    return await project_page(session(), auth.user_id, query_args.limit, query_args.cursor)


class ProjectFields(RequestModel):
    """A project's writable fields, as POST and PUT take them."""

    name: ProjectName
    description: Description | None = None


@blueprint.post("/projects")
@require_auth
@validate_request(ProjectFields)
@responds(ProjectOut, 201)
async def create_project(auth: Auth, data: ProjectFields) -> tuple[dict[str, Any], int, Any]:
    """Create a project; the caller becomes its owner."""
    project = await insert_project(session(), auth.user_id, data.name, data.description)
    return project, 201, {"Location": f"/projects/{project['id']}"}


@blueprint.get("/projects/<uuid:project_id>")
@require_auth
@responds(ProjectOut)
async def get_project(auth: Auth, project_id: uuid.UUID) -> dict[str, Any]:
    """Get a project the caller is a member of."""
    return await visible_project(session(), project_id, auth.user_id)


@blueprint.put("/projects/<uuid:project_id>")
@require_auth
@documents(403)
@validate_request(ProjectFields)
@responds(ProjectOut)
async def replace_project(auth: Auth, project_id: uuid.UUID, data: ProjectFields) -> dict[str, Any]:
    """Replace a project's name and description (an omitted description becomes null).

    Owner only.
    """
    return await update_project(
        session(), project_id, auth.user_id, data.model_dump(include={"name", "description"})
    )


class ProjectPatch(RequestModel):
    name: ProjectName = None  # type: ignore[assignment]  # may be omitted, never null
    description: Description | None = None


@blueprint.patch("/projects/<uuid:project_id>")
@require_auth
@documents(403)
@validate_request(ProjectPatch)
@responds(ProjectOut)
async def patch_project(auth: Auth, project_id: uuid.UUID, data: ProjectPatch) -> dict[str, Any]:
    """Change the fields sent (`null` clears the description). Owner only."""
    return await update_project(
        session(), project_id, auth.user_id, data.model_dump(include=data.model_fields_set)
    )


@blueprint.delete("/projects/<uuid:project_id>")
@require_auth
@documents(403)
@responds(None, 204)
async def delete_project(auth: Auth, project_id: uuid.UUID) -> tuple[str, int]:
    """Delete a project with its tasks, members and events. Owner only."""
    await remove_project(session(), project_id, auth.user_id)
    return "", 204


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
async def list_members(auth: Auth, project_id: uuid.UUID) -> dict[str, Any]:
    """List a project's members, the owner included, in the order they joined."""
    db_session = session()
    await project_role(db_session, project_id, auth.user_id)
    return {"items": await select_members(db_session, project_id)}


class MemberAdd(RequestModel):
    email: Email


@blueprint.post("/projects/<uuid:project_id>/members")
@require_auth
@documents(403, 409)
@validate_request(MemberAdd)
@responds(MemberOut, 201)
async def add_member(auth: Auth, project_id: uuid.UUID, data: MemberAdd) -> tuple[Any, int]:
    """Add a registered user by email. Owner only; an unknown email is a 404."""
    return await insert_member(session(), project_id, auth.user_id, data.email), 201


@blueprint.delete("/projects/<uuid:project_id>/members/<uuid:user_id>")
@require_auth
@documents(403)
@responds(None, 204)
async def remove_member(auth: Auth, project_id: uuid.UUID, user_id: uuid.UUID) -> tuple[str, int]:
    """Remove a member, or leave.

    The owner may remove any member, a member only themself; the owner cannot
    be removed. The removed member's tasks in the project become unassigned.
    """
    await delete_member(session(), project_id, auth.user_id, user_id)
    return "", 204


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
async def list_events(auth: Auth, project_id: uuid.UUID, query_args: EventQuery) -> dict[str, Any]:
    """The project's events after `since`, oldest first: the catch-up feed.

    `next_cursor` is the `since` of the next page, or null on the last one.
    """
    db_session = session()
    await project_role(db_session, project_id, auth.user_id)
    events = await events_after(db_session, project_id, query_args.since, query_args.limit + 1)
    more = len(events) > query_args.limit
    events = events[: query_args.limit]
    return {"items": events, "next_cursor": str(events[-1]["id"]) if more else None}


# Data functions: they take the session and never commit.

PROJECT_FIELDS = (
    Project.id,
    Project.name,
    Project.description,
    Project.owner_id,
    ProjectMember.role,
    Project.created_at,
    Project.updated_at,
)


def projects_of(user_id: uuid.UUID) -> AnySelect:
    return select(*PROJECT_FIELDS).join(
        ProjectMember,
        and_(ProjectMember.project_id == Project.id, ProjectMember.user_id == user_id),
    )


def as_event_data(project: dict[str, Any]) -> dict[str, Any]:
    """A project as events carry it: without `role`, which is each reader's own."""
    return {key: value for key, value in project.items() if key != "role"}


async def visible_project(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> dict[str, Any]:
    """The project as its member *user_id* sees it, or a 404."""
    row = (await db_session.execute(projects_of(user_id).where(Project.id == project_id))).first()
    if row is None:
        raise project_not_found()
    return row._asdict()


async def project_page(
    db_session: AsyncSession, user_id: uuid.UUID, limit: int, cursor: str | None
) -> dict[str, Any]:
    query = projects_of(user_id).order_by(Project.created_at.desc(), Project.id.desc())
    if cursor is not None:
        created_at, last_id = decode_position(decode_cursor(cursor, f"projects:{user_id}"))
        query = query.where(tuple_(Project.created_at, Project.id) < (created_at, last_id))
    items = [row._asdict() for row in await db_session.execute(query.limit(limit + 1))]
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        next_cursor = encode_cursor(f"projects:{user_id}", [last["created_at"], last["id"]])
    return {"items": items, "next_cursor": next_cursor}


def decode_position(position: list[Any]) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, last_id = position
        return datetime.fromisoformat(created_at), uuid.UUID(last_id)
    except (TypeError, ValueError):
        raise invalid_cursor() from None


async def insert_project(
    db_session: AsyncSession, owner_id: uuid.UUID, name: str, description: str | None
) -> dict[str, Any]:
    now = datetime.now(UTC)
    project = Project(
        name=name, description=description, owner_id=owner_id, created_at=now, updated_at=now
    )
    db_session.add(project)
    await db_session.flush()
    db_session.add(
        ProjectMember(project_id=project.id, user_id=owner_id, role=MemberRole.OWNER, added_at=now)
    )
    await db_session.flush()
    after_commit(db_session, cache.invalidate, cache.membership(project.id, owner_id))
    data = {
        "id": project.id,
        "name": name,
        "description": description,
        "owner_id": owner_id,
        "role": MemberRole.OWNER,
        "created_at": now,
        "updated_at": now,
    }
    await record_event(db_session, "project.created", project.id, owner_id, as_event_data(data))
    return data


async def update_project(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID, values: dict[str, Any]
) -> dict[str, Any]:
    require_owner(await project_role(db_session, project_id, user_id, for_write=True), "edit it")
    before = await visible_project(db_session, project_id, user_id)
    await db_session.execute(
        update(Project)
        .where(Project.id == project_id)
        .values(**values, updated_at=datetime.now(UTC))
    )
    after = await visible_project(db_session, project_id, user_id)
    changes = {key: [before[key], after[key]] for key in values if before[key] != after[key]}
    await record_event(
        db_session, "project.updated", project_id, user_id, as_event_data(after), changes
    )
    return after


async def remove_project(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    require_owner(await project_role(db_session, project_id, user_id, for_write=True), "delete it")
    project = await visible_project(db_session, project_id, user_id)
    # The event row goes with the project (its log is deleted too); it is
    # still published to the project's live subscribers after the commit.
    await record_event(db_session, "project.deleted", project_id, user_id, as_event_data(project))
    members = await db_session.execute(
        delete(ProjectMember)
        .where(ProjectMember.project_id == project_id)
        .returning(ProjectMember.user_id)
    )
    names = [cache.membership(project_id, member_id) for member_id in members.scalars()]
    await db_session.execute(delete(Project).where(Project.id == project_id))
    after_commit(db_session, cache.invalidate, *names)


MEMBER_FIELDS = (ProjectMember.user_id, User.email, ProjectMember.role, ProjectMember.added_at)


async def select_members(db_session: AsyncSession, project_id: uuid.UUID) -> list[dict[str, Any]]:
    rows = await db_session.execute(
        select(*MEMBER_FIELDS)
        .join(User, User.id == ProjectMember.user_id)
        .where(ProjectMember.project_id == project_id)
        .order_by(ProjectMember.added_at, ProjectMember.user_id)
    )
    return [row._asdict() for row in rows]


async def insert_member(
    db_session: AsyncSession, project_id: uuid.UUID, owner_id: uuid.UUID, email: str
) -> dict[str, Any]:
    role = await project_role(db_session, project_id, owner_id, for_write=True)
    require_owner(role, "add members")
    user = await find_user_by_email(db_session, email)
    if user is None:
        raise APIError(404, "not_found", "No user is registered with that email.")
    member = ProjectMember(
        project_id=project_id, user_id=user.id, role=MemberRole.MEMBER, added_at=datetime.now(UTC)
    )
    db_session.add(member)
    try:
        await db_session.flush()
    except IntegrityError:
        raise APIError(409, "conflict", "That user is already a member.") from None
    after_commit(db_session, cache.invalidate, cache.membership(project_id, user.id))
    data = {
        "user_id": user.id,
        "email": user.email,
        "role": member.role,
        "added_at": member.added_at,
    }
    await record_event(db_session, "member.added", project_id, owner_id, data)
    return data


async def delete_member(
    db_session: AsyncSession, project_id: uuid.UUID, caller_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    caller_role = await project_role(db_session, project_id, caller_id, for_write=True)
    row = (
        await db_session.execute(
            select(*MEMBER_FIELDS)
            .join(User, User.id == ProjectMember.user_id)
            .where(ProjectMember.project_id == project_id, ProjectMember.user_id == user_id)
        )
    ).first()
    if row is None:
        raise APIError(404, "not_found", "That user is not a member of this project.")
    if row.role is MemberRole.OWNER:
        raise APIError(403, "forbidden", "The owner cannot be removed; delete the project.")
    if caller_role is not MemberRole.OWNER and caller_id != user_id:
        raise APIError(403, "forbidden", "Only the owner may remove other members.")
    await db_session.execute(
        delete(ProjectMember).where(
            ProjectMember.project_id == project_id, ProjectMember.user_id == user_id
        )
    )
    unassigned = await db_session.execute(
        update(Task)
        .where(Task.project_id == project_id, Task.assignee_id == user_id)
        .values(assignee_id=None, version=Task.version + 1, updated_at=datetime.now(UTC))
        .returning(Task.id)
    )
    names = [cache.task(task_id) for task_id in unassigned.scalars()]
    after_commit(db_session, cache.invalidate, cache.membership(project_id, user_id), *names)
    await record_event(db_session, "member.removed", project_id, caller_id, row._asdict())
