"""Tasks, one at a time: any member of a project (owner included) may read and
write its tasks. The list of a project's tasks is ``task_list``.

A task is read in one query, or from the cache, and shown only to a member
of its project; a write first locks the task's project through the caller's
membership (a ``ProjectLock``), then reads the task.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from sqlalchemy import bindparam, delete, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from .. import cache
from ..access import ProjectLock, lock_project_of_task, member_role
from ..db import AnyRow, after_commit, rows
from ..errors import APIError, validation_failed
from ..jsonio import dumps
from ..models import ProjectMember, Task, TaskStatus
from ..preconditions import IfMatch, etag
from ..tokens import Caller
from .events import EventKind, record_event


class TaskRecord(TypedDict):
    id: uuid.UUID
    project_id: uuid.UUID
    title: str
    description: str | None
    status: TaskStatus
    assignee_id: uuid.UUID | None
    due_date: datetime | None
    created_at: datetime
    updated_at: datetime


TASK_FIELDS = (
    Task.id,
    Task.project_id,
    Task.title,
    Task.description,
    Task.status,
    Task.assignee_id,
    Task.due_date,
    Task.created_at,
    Task.updated_at,
)
TASK_FIELD_NAMES = tuple(column.key for column in TASK_FIELDS)
WRITABLE_FIELDS = ("title", "description", "status", "assignee_id", "due_date")


def task_record(row: AnyRow) -> TaskRecord:
    record: TaskRecord = dict(zip(TASK_FIELD_NAMES, row, strict=False))  # type: ignore[assignment]
    return record


@dataclass(frozen=True)
class VersionedTask:
    """A task as a write left it, with the version its ETag names."""

    task: TaskRecord
    version: int

    @property
    def etag(self) -> str:
        return etag(self.version)


@dataclass(frozen=True)
class TaskDocument:
    """A task as GET returns it, ready to send: what the cache holds."""

    project_id: uuid.UUID
    version: int
    body: bytes  # the task as JSON

    @property
    def etag(self) -> str:
        return etag(self.version)

    def encode(self) -> bytes:
        return f"{self.project_id} {self.version} ".encode() + self.body

    @classmethod
    def decode(cls, stored: bytes) -> TaskDocument:
        project_id, version, body = stored.split(b" ", 2)
        return cls(uuid.UUID(project_id.decode()), int(version), body)


def _encode_document(document: TaskDocument | None) -> bytes:
    return document.encode() if document is not None else b""


def _decode_document(stored: bytes) -> TaskDocument | None:
    return TaskDocument.decode(stored) if stored else None


def task_key(task_id: uuid.UUID) -> cache.CacheKey[TaskDocument | None]:
    # A name of its own for each stored format: instances of two releases
    # share one Redis while a deploy rolls, and must not read each other's.
    return cache.CacheKey(f"task-document:{task_id}", _encode_document, _decode_document)


def task_not_found() -> APIError:
    return APIError(404, "not_found", "Task not found.")


TASK_BY_ID = select(*TASK_FIELDS, Task.version).where(Task.id == bindparam("task_id"))


async def read_task(db_session: AsyncSession, task_id: uuid.UUID, caller: Caller) -> TaskDocument:
    """The task, if the caller is a member of its project; else a 404."""

    async def load() -> TaskDocument | None:
        row = (await rows(db_session, TASK_BY_ID, {"task_id": task_id})).first()
        if row is None:
            return None
        return TaskDocument(row.project_id, row.version, dumps(task_record(row)))

    document = await cache.through(task_key(task_id), load)
    if document is None or not await member_role(db_session, document.project_id, caller):
        raise task_not_found()
    return document


async def lock_task(
    db_session: AsyncSession, task_id: uuid.UUID, caller: Caller, if_match: IfMatch
) -> tuple[ProjectLock, AnyRow]:
    """The task about to be written, with its project's lock, after checking
    *if_match* against it; a 404 unless the caller is a member of its project."""
    lock = await lock_project_of_task(db_session, task_id, caller)
    # Read once the lock is held: a write that committed while this one
    # waited for it is seen, so If-Match and the event's changes are true.
    row = (await rows(db_session, TASK_BY_ID, {"task_id": task_id})).first() if lock else None
    if lock is None or row is None:
        raise task_not_found()
    if_match.check(row.version, "task")
    return lock, row


async def ensure_assignable(
    db_session: AsyncSession, project_id: uuid.UUID, assignee_id: uuid.UUID | None
) -> None:
    if assignee_id is None:
        return
    member = await db_session.execute(
        select(ProjectMember.user_id).where(
            ProjectMember.project_id == project_id, ProjectMember.user_id == assignee_id
        )
    )
    if member.first() is None:
        raise validation_failed(
            [{"field": "assignee_id", "message": "is not a member of this project"}]
        )


async def insert_task(
    db_session: AsyncSession, lock: ProjectLock, user_id: uuid.UUID, values: dict[str, Any]
) -> VersionedTask:
    await ensure_assignable(db_session, lock.project_id, values["assignee_id"])
    now = datetime.now(UTC)
    row = (
        await db_session.execute(
            insert(Task)
            .values(
                id=uuid.uuid4(),
                project_id=lock.project_id,
                created_at=now,
                updated_at=now,
                **values,
            )
            .returning(*TASK_FIELDS, Task.version)
        )
    ).one()
    task = task_record(row)
    await record_event(db_session, lock, EventKind.TASK_CREATED, user_id, task)
    return VersionedTask(task, row.version)


async def update_task(
    db_session: AsyncSession,
    task_id: uuid.UUID,
    caller: Caller,
    values: dict[str, Any],
    if_match: IfMatch,
) -> VersionedTask:
    """Set the task's fields in *values*."""
    lock, current = await lock_task(db_session, task_id, caller, if_match)
    if values.get("assignee_id") is not None:
        await ensure_assignable(db_session, lock.project_id, values["assignee_id"])
    row = (
        await db_session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(**values, version=Task.version + 1, updated_at=datetime.now(UTC))
            .returning(*TASK_FIELDS, Task.version)
        )
    ).one()
    before, after = task_record(current), task_record(row)
    changes = {
        field: [before[field], after[field]]  # type: ignore[literal-required]
        for field in WRITABLE_FIELDS
        if before[field] != after[field]  # type: ignore[literal-required]
    }
    await record_event(db_session, lock, EventKind.TASK_UPDATED, caller.user_id, after, changes)
    after_commit(db_session, cache.invalidate, task_key(task_id))
    return VersionedTask(after, row.version)


async def remove_task(
    db_session: AsyncSession, task_id: uuid.UUID, caller: Caller, if_match: IfMatch
) -> None:
    lock, current = await lock_task(db_session, task_id, caller, if_match)
    await db_session.execute(delete(Task).where(Task.id == task_id))
    await record_event(
        db_session, lock, EventKind.TASK_DELETED, caller.user_id, task_record(current)
    )
    after_commit(db_session, cache.invalidate, task_key(task_id))
