"""Authorization: a caller's role in a project, and the project's write lock.

Authorization is in the queries: a project is found only through the caller's
membership, so a stranger's project is simply not there (404), and what only
the owner may do is a 403 for a member. Reads take the role from the cache;
writes take it under the project's row lock, as a ``ProjectLock``, which the
event log requires of every event it records.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import and_, bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from . import cache
from .db import rows
from .errors import APIError
from .models import MemberRole, Project, ProjectMember, Task
from .tokens import Caller


def project_not_found() -> APIError:
    return APIError(404, "not_found", "Project not found.")


def _encode_role(role: MemberRole | None) -> bytes:
    return role.encode() if role is not None else b""


def _decode_role(stored: bytes) -> MemberRole | None:
    return MemberRole(stored.decode()) if stored else None


def role_key(project_id: uuid.UUID, user_id: uuid.UUID) -> cache.CacheKey[MemberRole | None]:
    """The cache key of a user's role in a project (or of their having none)."""
    return cache.CacheKey(f"member:{project_id}:{user_id}", _encode_role, _decode_role)


ROLE_OF_MEMBER = select(ProjectMember.role).where(
    ProjectMember.project_id == bindparam("project_id"),
    ProjectMember.user_id == bindparam("user_id"),
)
_OF_MEMBER = and_(
    ProjectMember.project_id == Project.id, ProjectMember.user_id == bindparam("user_id")
)
# A project's row, locked, found only through the caller's membership (so a
# stranger locks nothing); by the project's id, or by one of its tasks'.
LOCK_PROJECT = (
    select(Project.id)
    .join(ProjectMember, _OF_MEMBER)
    .where(Project.id == bindparam("project_id"))
    .with_for_update(of=Project)
)
LOCK_PROJECT_OF_TASK = (
    select(Project.id)
    .join(ProjectMember, _OF_MEMBER)
    .join(Task, Task.project_id == Project.id)
    .where(Task.id == bindparam("task_id"))
    .with_for_update(of=Project)
)


async def member_role(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> MemberRole | None:
    """The caller's role in the project, if any and within their reach, for a
    read: from the cache."""
    if not caller.reaches(project_id):
        return None

    async def load() -> MemberRole | None:
        params = {"project_id": project_id, "user_id": caller.user_id}
        role: MemberRole | None = (
            await rows(db_session, ROLE_OF_MEMBER, params)
        ).scalar_one_or_none()
        return role

    return await cache.through(role_key(project_id, caller.user_id), load)


async def require_member(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> MemberRole:
    """The caller's role in the project, for a read; a 404 when they are not a member."""
    role = await member_role(db_session, project_id, caller)
    if role is None:
        raise project_not_found()
    return role


@dataclass(frozen=True)
class ProjectLock:
    """Proof that this transaction holds the project's row lock, and the
    caller's role read under it.

    Made by ``lock_project`` and ``lock_project_of_task``, which lock the
    project's row ``FOR UPDATE`` (and by ``data.projects.insert_project`` for a
    project its transaction inserted). Holding the lock until the commit is
    what makes a project's events commit in the order of their ids, and what
    keeps a member removed meanwhile from writing.
    """

    project_id: uuid.UUID
    role: MemberRole


async def lock_project(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> ProjectLock:
    """Lock the project for a write by its member *caller*; a 404 for anyone else."""
    if not caller.reaches(project_id):
        raise project_not_found()
    params = {"project_id": project_id, "user_id": caller.user_id}
    locked = (await rows(db_session, LOCK_PROJECT, params)).first() is not None
    role = await current_role(db_session, project_id, caller) if locked else None
    if role is None:
        raise project_not_found()
    return ProjectLock(project_id, role)


async def lock_project_of_task(
    db_session: AsyncSession, task_id: uuid.UUID, caller: Caller
) -> ProjectLock | None:
    """Lock the project of the task for a write by its member *caller*; None
    when there is no such task or the caller is not a member of its project."""
    params = {"task_id": task_id, "user_id": caller.user_id}
    project_id = (await rows(db_session, LOCK_PROJECT_OF_TASK, params)).scalar_one_or_none()
    if project_id is None:
        return None
    role = await current_role(db_session, project_id, caller)
    return ProjectLock(project_id, role) if role is not None else None


async def current_role(
    db_session: AsyncSession, project_id: uuid.UUID, caller: Caller
) -> MemberRole | None:
    """The user's role in the project as the database has it now, bypassing
    the cache (whose invalidation follows a removal's commit by a moment).

    Under a lock: the locking statement may have waited for the lock, and it
    judged the membership by the snapshot it started with, so a removal that
    committed meanwhile would pass. Every removal takes the lock first, so
    reading the role again in a statement of its own (READ COMMITTED: a new
    snapshot) sees every removal that precedes the write's commit.
    """
    if not caller.reaches(project_id):
        return None
    params = {"project_id": project_id, "user_id": caller.user_id}
    role: MemberRole | None = (await rows(db_session, ROLE_OF_MEMBER, params)).scalar_one_or_none()
    return role


def require_owner(lock: ProjectLock, action: str) -> None:
    if lock.role is not MemberRole.OWNER:
        raise APIError(403, "forbidden", f"Only the project's owner may {action}.")
