"""Projects and their members.

Reads are scoped by the caller's membership (``projects_of``); writes take the
project's ``ProjectLock`` from ``access`` and record one event each.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import and_, delete, select, tuple_, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from .. import cache
from ..access import ProjectLock, project_not_found, role_key
from ..db import AnySelect, after_commit
from ..errors import APIError
from ..models import MemberRole, Project, ProjectMember, Task, User
from ..pagination import Paged, decode_cursor, encode_cursor, invalid_cursor
from ..preconditions import IfMatch, etag
from ..tokens import Caller
from .accounts import find_user_by_email
from .events import EventKind, record_event
from .tasks import task_key


class ProjectData(TypedDict):
    """A project as events carry it: without `role`, which is each reader's own."""

    id: uuid.UUID
    name: str
    description: str | None
    owner_id: uuid.UUID
    created_at: datetime
    updated_at: datetime


class ProjectRecord(ProjectData):
    """A project as its member sees it."""

    role: MemberRole


class MemberRecord(TypedDict):
    user_id: uuid.UUID
    email: str
    role: MemberRole
    added_at: datetime


PROJECT_FIELDS = (
    Project.id,
    Project.name,
    Project.description,
    Project.owner_id,
    ProjectMember.role,
    Project.created_at,
    Project.updated_at,
)
PROJECT_FIELD_NAMES = tuple(column.key for column in PROJECT_FIELDS)
MEMBER_FIELDS = (ProjectMember.user_id, User.email, ProjectMember.role, ProjectMember.added_at)


def projects_of(caller: Caller) -> AnySelect:
    """The projects the caller is a member of, within their reach: the scope
    of every project read."""
    query = select(*PROJECT_FIELDS).join(
        ProjectMember,
        and_(ProjectMember.project_id == Project.id, ProjectMember.user_id == caller.user_id),
    )
    if caller.project_ids is not None:
        query = query.where(Project.id.in_(caller.project_ids))
    return query


def project_data(project: ProjectRecord) -> ProjectData:
    return {
        "id": project["id"],
        "name": project["name"],
        "description": project["description"],
        "owner_id": project["owner_id"],
        "created_at": project["created_at"],
        "updated_at": project["updated_at"],
    }


@dataclass(frozen=True)
class VersionedProject:
    """A project as its member sees it, with the version its ETag names."""

    project: ProjectRecord
    version: int

    @property
    def etag(self) -> str:
        return etag(self.version)


async def visible_project(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> VersionedProject:
    """The project as its member *caller* sees it, or a 404."""
    query = projects_of(caller).add_columns(Project.version).where(Project.id == project_id)
    row = (await db_session.execute(query)).first()
    if row is None:
        raise project_not_found()
    *fields, version = row
    project: ProjectRecord = dict(zip(PROJECT_FIELD_NAMES, fields, strict=True))  # type: ignore[assignment]
    return VersionedProject(project, version)


async def project_page(
    db_session: AsyncSession, caller: Caller, limit: int, cursor: str | None
) -> Paged[ProjectRecord]:
    """The projects the caller is a member of (within reach), newest first."""
    scope = f"projects:{caller.user_id}"
    query = projects_of(caller).order_by(Project.created_at.desc(), Project.id.desc())
    if cursor is not None:
        created_at, last_id = decode_position(decode_cursor(cursor, scope))
        query = query.where(tuple_(Project.created_at, Project.id) < (created_at, last_id))
    items: list[ProjectRecord] = [
        row._asdict()  # type: ignore[misc]
        for row in await db_session.execute(query.limit(limit + 1))
    ]
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        next_cursor = encode_cursor(scope, [last["created_at"], last["id"]])
    return {"items": items, "next_cursor": next_cursor}


def decode_position(position: list[Any]) -> tuple[datetime, uuid.UUID]:
    try:
        created_at, last_id = position
        return datetime.fromisoformat(created_at), uuid.UUID(last_id)
    except (AttributeError, TypeError, ValueError):
        raise invalid_cursor() from None


async def insert_project(
    db_session: AsyncSession, owner_id: uuid.UUID, name: str, description: str | None
) -> VersionedProject:
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
    after_commit(db_session, cache.invalidate, role_key(project.id, owner_id))
    record: ProjectRecord = {
        "id": project.id,
        "name": name,
        "description": description,
        "owner_id": owner_id,
        "role": MemberRole.OWNER,
        "created_at": now,
        "updated_at": now,
    }
    # No other transaction sees the new row before this one commits: the
    # insert holds it as a lock would.
    lock = ProjectLock(project.id, MemberRole.OWNER)
    await record_event(db_session, lock, EventKind.PROJECT_CREATED, owner_id, project_data(record))
    return VersionedProject(record, project.version)


async def update_project(
    db_session: AsyncSession,
    lock: ProjectLock,
    caller: Caller,
    values: dict[str, Any],
    if_match: IfMatch,
) -> VersionedProject:
    """Set the project's fields in *values* (name, description)."""
    current = await visible_project(db_session, lock.project_id, caller)
    if_match.check(current.version, "project")
    await db_session.execute(
        update(Project)
        .where(Project.id == lock.project_id)
        .values(**values, version=Project.version + 1, updated_at=datetime.now(UTC))
    )
    updated = await visible_project(db_session, lock.project_id, caller)
    before, after = current.project, updated.project
    changes = {
        key: [before[key], after[key]]  # type: ignore[literal-required]
        for key in values
        if before[key] != after[key]  # type: ignore[literal-required]
    }
    await record_event(
        db_session, lock, EventKind.PROJECT_UPDATED, caller.user_id, project_data(after), changes
    )
    return updated


async def remove_project(
    db_session: AsyncSession, lock: ProjectLock, caller: Caller, if_match: IfMatch
) -> None:
    """Delete the project with its tasks, members and events."""
    current = await visible_project(db_session, lock.project_id, caller)
    if_match.check(current.version, "project")
    # The event row goes with the project (its log is deleted too); it is
    # still published to the project's live subscribers after the commit.
    await record_event(
        db_session, lock, EventKind.PROJECT_DELETED, caller.user_id, project_data(current.project)
    )
    members = await db_session.execute(
        delete(ProjectMember)
        .where(ProjectMember.project_id == lock.project_id)
        .returning(ProjectMember.user_id)
    )
    keys = [role_key(lock.project_id, member_id) for member_id in members.scalars()]
    await db_session.execute(delete(Project).where(Project.id == lock.project_id))
    after_commit(db_session, cache.invalidate, *keys)


async def select_members(db_session: AsyncSession, project_id: uuid.UUID) -> list[MemberRecord]:
    """The project's members, the owner included, in the order they joined."""
    result = await db_session.execute(
        select(*MEMBER_FIELDS)
        .join(User, User.id == ProjectMember.user_id)
        .where(ProjectMember.project_id == project_id)
        .order_by(ProjectMember.added_at, ProjectMember.user_id)
    )
    return [row._asdict() for row in result]  # type: ignore[misc]


async def insert_member(
    db_session: AsyncSession, lock: ProjectLock, owner_id: uuid.UUID, email: str
) -> MemberRecord:
    """Add the user registered with *email*; a 404 for an unknown email, 409 for a member."""
    user = await find_user_by_email(db_session, email)
    if user is None:
        raise APIError(404, "not_found", "No user is registered with that email.")
    member = ProjectMember(
        project_id=lock.project_id,
        user_id=user.id,
        role=MemberRole.MEMBER,
        added_at=datetime.now(UTC),
    )
    db_session.add(member)
    try:
        await db_session.flush()
    except IntegrityError:
        raise APIError(409, "conflict", "That user is already a member.") from None
    after_commit(db_session, cache.invalidate, role_key(lock.project_id, user.id))
    record: MemberRecord = {
        "user_id": user.id,
        "email": user.email,
        "role": member.role,
        "added_at": member.added_at,
    }
    await record_event(db_session, lock, EventKind.MEMBER_ADDED, owner_id, record)
    return record


async def delete_member(
    db_session: AsyncSession, lock: ProjectLock, caller_id: uuid.UUID, user_id: uuid.UUID
) -> None:
    """Remove *user_id* from the project; their tasks in it become unassigned.

    The owner may remove any member, a member only themself; the owner
    cannot be removed.
    """
    row = (
        await db_session.execute(
            select(*MEMBER_FIELDS)
            .join(User, User.id == ProjectMember.user_id)
            .where(ProjectMember.project_id == lock.project_id, ProjectMember.user_id == user_id)
        )
    ).first()
    if row is None:
        raise APIError(404, "not_found", "That user is not a member of this project.")
    if row.role is MemberRole.OWNER:
        raise APIError(403, "forbidden", "The owner cannot be removed; delete the project.")
    if lock.role is not MemberRole.OWNER and caller_id != user_id:
        raise APIError(403, "forbidden", "Only the owner may remove other members.")
    await db_session.execute(
        delete(ProjectMember).where(
            ProjectMember.project_id == lock.project_id, ProjectMember.user_id == user_id
        )
    )
    unassigned = await db_session.execute(
        update(Task)
        .where(Task.project_id == lock.project_id, Task.assignee_id == user_id)
        .values(assignee_id=None, version=Task.version + 1, updated_at=datetime.now(UTC))
        .returning(Task.id)
    )
    keys = [task_key(task_id) for task_id in unassigned.scalars()]
    after_commit(db_session, cache.invalidate, role_key(lock.project_id, user_id), *keys)
    removed: MemberRecord = row._asdict()  # type: ignore[assignment]
    await record_event(db_session, lock, EventKind.MEMBER_REMOVED, caller_id, removed)
