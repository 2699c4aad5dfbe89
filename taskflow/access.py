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

from sqlalchemy import bindparam, select
from sqlalchemy.ext.asyncio import AsyncSession

from . import cache
from .db import rows
from .errors import APIError
from .models import MemberRole, Project, ProjectMember


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
LOCKED_ROLE_OF_MEMBER = ROLE_OF_MEMBER.join(
    Project, Project.id == ProjectMember.project_id
).with_for_update(of=Project)


async def member_role(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> MemberRole | None:
    """The user's role in the project, if any, for a read: from the cache."""

    async def load() -> MemberRole | None:
        params = {"project_id": project_id, "user_id": user_id}
        role: MemberRole | None = (
            await rows(db_session, ROLE_OF_MEMBER, params)
        ).scalar_one_or_none()
        return role

    return await cache.through(role_key(project_id, user_id), load)


async def require_member(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> MemberRole:
    """The caller's role in the project, for a read; a 404 when they are not a member."""
    role = await member_role(db_session, project_id, user_id)
    if role is None:
        raise project_not_found()
    return role


@dataclass(frozen=True)
class ProjectLock:
    """Proof that this transaction holds the project's row lock, and the
    caller's role read under it.

    Only a statement that locked the project's row ``FOR UPDATE`` makes one
    (``lock_project`` here, ``data.tasks.lock_task``). Holding it until the
    commit is what makes a project's events commit in the order of their ids.
    """

    project_id: uuid.UUID
    role: MemberRole


async def lock_project(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID
) -> ProjectLock:
    """Lock the project for a write by its member *user_id*; a 404 for anyone else."""
    params = {"project_id": project_id, "user_id": user_id}
    role = (await rows(db_session, LOCKED_ROLE_OF_MEMBER, params)).scalar_one_or_none()
    if role is None:
        raise project_not_found()
    return ProjectLock(project_id, role)


def require_owner(lock: ProjectLock, action: str) -> None:
    if lock.role is not MemberRole.OWNER:
        raise APIError(403, "forbidden", f"Only the project's owner may {action}.")
