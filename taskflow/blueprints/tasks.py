"""Tasks: any member of a project (owner included) may read and write its tasks.

Reads are lean: a task is one query (the caller's membership is a join), a
page is two (membership, then the keyset page). Rows come from Core selects
and go out through orjson, with no ORM objects on the way.
"""

from __future__ import annotations

import functools
import re
import uuid
from datetime import UTC, datetime
from typing import Any, Literal

import orjson
from pydantic import AwareDatetime, BaseModel, Field, field_validator
from quart import Blueprint, request
from quart_schema import validate_querystring, validate_request
from sqlalchemy import (
    ColumnElement,
    and_,
    bindparam,
    delete,
    insert,
    or_,
    select,
    text,
    tuple_,
    union_all,
    update,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.expression import TextClause

from .. import cache
from ..db import AnyRow, AnySelect, after_commit, rows, session
from ..errors import APIError, validation_failed
from ..events import record_event
from ..jsonio import dumps
from ..models import SEARCH_DOCUMENT, Project, ProjectMember, Task, TaskStatus
from ..openapi import documents, responds
from ..pagination import decode_cursor, encode_cursor, invalid_cursor
from ..schemas import (
    ASSIGNEE_FILTER_PATTERN,
    WORDS_PATTERN,
    Description,
    Page,
    RequestModel,
    TaskTitle,
    Timestamp,
    words_of,
)
from ..security import Auth, require_auth
from .projects import member_role, project_role

blueprint = Blueprint("tasks", __name__)


class TaskOut(BaseModel):
    id: uuid.UUID
    project_id: uuid.UUID
    title: str
    description: str | None
    status: TaskStatus
    assignee_id: uuid.UUID | None
    due_date: AwareDatetime | None
    created_at: AwareDatetime
    updated_at: AwareDatetime


STATUS_LIST = r"^(pending|in_progress|completed)(,(pending|in_progress|completed))*$"
Sort = Literal[
    "created_at", "-created_at", "updated_at", "-updated_at", "due_date", "-due_date", "title",
    "-title",
]  # fmt: skip


class TaskQuery(RequestModel):
    status: str | None = Field(
        None, pattern=STATUS_LIST, description="One or more statuses, comma-separated."
    )
    assignee_id: str | None = Field(
        None, pattern=ASSIGNEE_FILTER_PATTERN, description="A user id, `me`, or `none`."
    )
    due_before: Timestamp | None = Field(None, description="Due strictly before this time.")
    due_after: Timestamp | None = Field(None, description="Due strictly after this time.")
    q: str | None = Field(
        None,
        min_length=1,
        max_length=200,
        json_schema_extra={"pattern": WORDS_PATTERN},
        description="Words to find in title or description.",
    )
    sort: Sort = Field("-created_at", description="Tasks with no due date sort last.")
    limit: int = Field(50, ge=1, le=100)
    cursor: str | None = Field(None, max_length=2048)

    @field_validator("assignee_id")
    @classmethod
    def _assignee(cls, value: str | None) -> str | None:
        if value is not None and value not in ("me", "none"):
            uuid.UUID(value)  # ValueError → 422
        return value

    @field_validator("q")
    @classmethod
    def _words(cls, value: str | None) -> str | None:
        if value is not None and ("\x00" in value or not words_of(value)):
            raise ValueError("must contain words")
        return value


@blueprint.get("/projects/<uuid:project_id>/tasks")
@require_auth
@validate_querystring(TaskQuery)
@responds(Page[TaskOut])
async def list_tasks(auth: Auth, project_id: uuid.UUID, query_args: TaskQuery) -> dict[str, Any]:
    """List a project's tasks: filtered, searched, sorted, and paged by cursor."""
    db_session = session()
    await project_role(db_session, project_id, auth.user_id)
    return await task_page(db_session, project_id, auth.user_id, query_args)


class TaskFields(RequestModel):
    """A task's writable fields, as POST and PUT take them."""

    title: TaskTitle
    description: Description | None = None
    status: TaskStatus = TaskStatus.PENDING
    assignee_id: uuid.UUID | None = None
    due_date: Timestamp | None = None


@blueprint.post("/projects/<uuid:project_id>/tasks")
@require_auth
@validate_request(TaskFields)
@responds(TaskOut, 201)
async def create_task(
    auth: Auth, project_id: uuid.UUID, data: TaskFields
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Create a task; the assignee, if any, must be a member of the project."""
    task, version = await insert_task(session(), project_id, auth.user_id, data.model_dump())
    return task, 201, {"Location": f"/tasks/{task['id']}", "ETag": etag(version)}


@blueprint.get("/tasks/<uuid:task_id>")
@require_auth
@responds(TaskOut)
async def get_task(auth: Auth, task_id: uuid.UUID) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Get a task of a project the caller is a member of, with its `ETag`."""
    db_session = session()

    async def load() -> bytes:
        row = (await rows(db_session, TASK_BY_ID, {"task_id": task_id})).first()
        return dumps({**task_of(row), "version": row.version}) if row is not None else b""

    cached = await cache.through(cache.task(task_id), load)
    task = orjson.loads(cached) if cached else None
    if task is None or not await member_role(
        db_session, uuid.UUID(task["project_id"]), auth.user_id
    ):
        raise task_not_found()
    version = task.pop("version")
    return task, 200, {"ETag": etag(version)}


@blueprint.put("/tasks/<uuid:task_id>")
@require_auth
@documents(412)
@validate_request(TaskFields)
@responds(TaskOut)
async def replace_task(
    auth: Auth, task_id: uuid.UUID, data: TaskFields
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Replace a task's writable fields: an omitted one becomes null (status: pending).

    With `If-Match`, a stale `ETag` is a 412 and nothing changes.
    """
    task, version = await update_task(session(), task_id, auth.user_id, data.model_dump())
    return task, 200, {"ETag": etag(version)}


class TaskPatch(RequestModel):
    # Omitted: unchanged. null clears description, assignee_id and due_date;
    # title and status cannot be null.
    title: TaskTitle = None  # type: ignore[assignment]
    description: Description | None = None
    status: TaskStatus = None  # type: ignore[assignment]
    assignee_id: uuid.UUID | None = None
    due_date: Timestamp | None = None


@blueprint.patch("/tasks/<uuid:task_id>")
@require_auth
@documents(412)
@validate_request(TaskPatch)
@responds(TaskOut)
async def patch_task(
    auth: Auth, task_id: uuid.UUID, data: TaskPatch
) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Change only the fields sent; `null` clears. `If-Match` as for PUT."""
    values = data.model_dump(include=data.model_fields_set)
    task, version = await update_task(session(), task_id, auth.user_id, values)
    return task, 200, {"ETag": etag(version)}


@blueprint.delete("/tasks/<uuid:task_id>")
@require_auth
@documents(412)
@responds(None, 204)
async def delete_task(auth: Auth, task_id: uuid.UUID) -> tuple[str, int]:
    """Delete a task (honouring `If-Match`)."""
    await remove_task(session(), task_id, auth.user_id)
    return "", 204


# Data functions: they take the session and never commit.

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


def task_not_found() -> APIError:
    return APIError(404, "not_found", "Task not found.")


def task_of(row: AnyRow) -> dict[str, Any]:
    return dict(zip(TASK_FIELD_NAMES, row, strict=False))


def etag(version: int) -> str:
    return f'"{version}"'


TASK_BY_ID = select(*TASK_FIELDS, Task.version).where(Task.id == bindparam("task_id"))
# A task with its version, found only through the caller's membership.
TASK_OF_MEMBER = (
    select(*TASK_FIELDS, Task.version)
    .join(
        ProjectMember,
        and_(
            ProjectMember.project_id == Task.project_id,
            ProjectMember.user_id == bindparam("user_id"),
        ),
    )
    .where(Task.id == bindparam("task_id"))
)
LOCKED_TASK_OF_MEMBER = TASK_OF_MEMBER.join(Project, Project.id == Task.project_id).with_for_update(
    of=Project
)


async def locked_task(db_session: AsyncSession, task_id: uuid.UUID, user_id: uuid.UUID) -> AnyRow:
    """The task about to be written, its project's row locked (events commit in
    order), after checking `If-Match` against it."""
    params = {"user_id": user_id, "task_id": task_id}
    row = (await rows(db_session, LOCKED_TASK_OF_MEMBER, params)).first()
    if row is None:
        raise task_not_found()
    check_if_match(row.version)
    return row


def check_if_match(version: int) -> None:
    header = request.headers.get("If-Match")
    if header is None or header.strip() == "*":
        return
    if etag(version) not in (tag.strip() for tag in header.split(",")):
        raise APIError(412, "precondition_failed", "The task has changed since that ETag.")


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
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID, values: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    await project_role(db_session, project_id, user_id, for_write=True)
    await ensure_assignable(db_session, project_id, values["assignee_id"])
    now = datetime.now(UTC)
    row = (
        await db_session.execute(
            insert(Task)
            .values(
                id=uuid.uuid4(), project_id=project_id, created_at=now, updated_at=now, **values
            )
            .returning(*TASK_FIELDS, Task.version)
        )
    ).one()
    task = task_of(row)
    await record_event(db_session, "task.created", project_id, user_id, task)
    return task, row.version


async def update_task(
    db_session: AsyncSession, task_id: uuid.UUID, user_id: uuid.UUID, values: dict[str, Any]
) -> tuple[dict[str, Any], int]:
    current = await locked_task(db_session, task_id, user_id)
    if values.get("assignee_id") is not None:
        await ensure_assignable(db_session, current.project_id, values["assignee_id"])
    row = (
        await db_session.execute(
            update(Task)
            .where(Task.id == task_id)
            .values(**values, version=Task.version + 1, updated_at=datetime.now(UTC))
            .returning(*TASK_FIELDS, Task.version)
        )
    ).one()
    before, after = task_of(current), task_of(row)
    changes = {
        field: [before[field], after[field]]
        for field in WRITABLE_FIELDS
        if before[field] != after[field]
    }
    await record_event(db_session, "task.updated", current.project_id, user_id, after, changes)
    after_commit(db_session, cache.invalidate, cache.task(task_id))
    return after, row.version


async def remove_task(db_session: AsyncSession, task_id: uuid.UUID, user_id: uuid.UUID) -> None:
    current = await locked_task(db_session, task_id, user_id)
    await db_session.execute(delete(Task).where(Task.id == task_id))
    await record_event(db_session, "task.deleted", current.project_id, user_id, task_of(current))
    after_commit(db_session, cache.invalidate, cache.task(task_id))


async def task_page(
    db_session: AsyncSession, project_id: uuid.UUID, user_id: uuid.UUID, query: TaskQuery
) -> dict[str, Any]:
    descending = query.sort.startswith("-")
    sort_name = query.sort.lstrip("-")
    scope = f"tasks:{project_id}:{query.sort}"
    params: dict[str, Any] = {"project_id": project_id, "limit": query.limit + 1}
    filters = filter_params(query, user_id, params)
    after: AfterKind = None
    if query.cursor:
        value, params["after_id"] = decode_task_position(
            sort_name, decode_cursor(query.cursor, scope)
        )
        after = "undated" if value is None else "value"
        params["after_value"] = value
    statement = page_statement(
        sort_name, descending, filters, after, db_session.get_bind().dialect.name
    )
    items = [task_of(row) for row in await rows(db_session, statement, params)]
    next_cursor = None
    if len(items) > query.limit:
        items = items[: query.limit]
        last = items[-1]
        next_cursor = encode_cursor(scope, [last[sort_name], last["id"]])
    return {"items": items, "next_cursor": next_cursor}


# A page's statement depends only on its shape (sort, which filters, where it
# starts); the values are bound parameters. Each shape is built once: building
# and adapting a fresh statement per request was a sixth of a page's CPU.

AfterKind = Literal["value", "undated"] | None
Condition = ColumnElement[bool] | TextClause


def filter_params(query: TaskQuery, user_id: uuid.UUID, params: dict[str, Any]) -> tuple[str, ...]:
    """The names of the query's filters, their values put in *params*."""
    filters = []
    if query.status is not None:
        filters.append("status")
        params["statuses"] = [TaskStatus(s) for s in dict.fromkeys(query.status.split(","))]
    if query.assignee_id == "none":
        filters.append("unassigned")
    elif query.assignee_id is not None:
        filters.append("assignee")
        params["assignee_id"] = (
            user_id if query.assignee_id == "me" else uuid.UUID(query.assignee_id)
        )
    if query.due_before is not None:
        filters.append("due_before")
        params["due_before"] = query.due_before
    if query.due_after is not None:
        filters.append("due_after")
        params["due_after"] = query.due_after
    if query.q is not None:
        words = words_of(query.q)
        filters.append(f"words:{len(words)}")
        params["words"] = query.q
        for n, word in enumerate(words):
            params[f"word{n}"] = LIKE_ESCAPE.sub(r"/\g<0>", word)
    return tuple(filters)


LIKE_ESCAPE = re.compile("[/%_]")


@functools.lru_cache(maxsize=1024)
def page_statement(
    sort_name: str, descending: bool, filters: tuple[str, ...], after: AfterKind, dialect: str
) -> AnySelect:
    base = select(*TASK_FIELDS).where(
        Task.project_id == bindparam("project_id"),
        *(task_filter(name, dialect) for name in filters),
    )
    if sort_name == "due_date":
        return due_date_page(base, descending, after)
    return keyset_page(base, getattr(Task, sort_name), descending, after == "value")


def task_filter(name: str, dialect: str) -> Condition:
    if name == "status":
        return Task.status.in_(bindparam("statuses", expanding=True))
    if name == "unassigned":
        return Task.assignee_id.is_(None)
    if name == "assignee":
        return Task.assignee_id == bindparam("assignee_id")
    if name == "due_before":
        return Task.due_date < bindparam("due_before")
    if name == "due_after":
        return Task.due_date > bindparam("due_after")
    return search(int(name.removeprefix("words:")), dialect)


def search(word_count: int, dialect: str) -> Condition:
    """Every word in the title or the description: PostgreSQL full text (GIN
    indexed), or a case-insensitive substring match elsewhere."""
    if dialect == "postgresql":
        return text(f"{SEARCH_DOCUMENT} @@ plainto_tsquery('simple', :words)")
    return and_(
        *(
            or_(Task.title.icontains(bindparam(f"word{n}"), escape="/"),
                Task.description.icontains(bindparam(f"word{n}"), escape="/"))
            for n in range(word_count)
        )
    )  # fmt: skip


def decode_task_position(sort_name: str, position: list[Any]) -> tuple[Any, uuid.UUID]:
    try:
        value, last_id = position
        if sort_name == "title":
            if not isinstance(value, str):
                raise ValueError("title")
        elif value is not None or sort_name != "due_date":
            value = datetime.fromisoformat(value)
        return value, uuid.UUID(last_id)
    except (TypeError, ValueError):
        raise invalid_cursor() from None


def after_key(column: Any) -> Any:
    """The bound position a page starts after, typed as its columns."""
    return tuple_(
        bindparam("after_value", type_=column.type), bindparam("after_id", type_=Task.id.type)
    )


def keyset_page(base: AnySelect, column: Any, descending: bool, after: bool) -> AnySelect:
    """A page ordered by a NOT NULL column then id, after the bound position if *after*."""
    if after:
        key = tuple_(column, Task.id)
        base = base.where(key < after_key(column) if descending else key > after_key(column))
    order = (column.desc(), Task.id.desc()) if descending else (column.asc(), Task.id.asc())
    return base.order_by(*order).limit(bindparam("limit"))


def due_date_page(base: AnySelect, descending: bool, after: AfterKind) -> AnySelect:
    """A page by due date, tasks with none last, in one statement.

    Dated and undated tasks are two index-ordered runs, each limited, joined
    with UNION ALL: both stay keyset scans however far the page is.
    """
    dated = base.where(Task.due_date.is_not(None))
    undated = base.where(Task.due_date.is_(None))
    if after == "undated":  # already among the undated tasks
        after_id = bindparam("after_id", type_=Task.id.type)
        return keyset_page(undated, Task.id, descending, False).where(
            Task.id < after_id if descending else Task.id > after_id
        )
    if after == "value":
        key = tuple_(Task.due_date, Task.id)
        bound = after_key(Task.due_date)
        dated = dated.where(key < bound if descending else key > bound)
    runs = union_all(
        select(keyset_page(dated, Task.due_date, descending, False).subquery()),
        select(keyset_page(undated, Task.id, descending, False).subquery()),
    ).subquery()
    order = (
        (runs.c.due_date.desc(), runs.c.id.desc())
        if descending
        else (runs.c.due_date.asc(), runs.c.id.asc())
    )
    return select(runs).order_by(runs.c.due_date.is_(None), *order).limit(bindparam("limit"))
