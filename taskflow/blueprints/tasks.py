"""Tasks: any member of a project (owner included) may read and write its tasks.

Each route parses, authorizes, calls one data function (``data.tasks`` for one
task, ``data.task_list`` for a project's list) and responds; a task is found
only through the caller's membership, so a stranger's is a 404.
"""

from __future__ import annotations

import uuid
from typing import Literal

from pydantic import AwareDatetime, BaseModel, Field, field_validator
from quart import Blueprint, Response
from quart_schema import validate_querystring, validate_request

from ..access import lock_project, require_member
from ..data import tasks
from ..data.task_list import TaskFilters, TaskOrder, task_page
from ..db import session
from ..jsonio import json_response, no_content
from ..models import TaskStatus
from ..openapi import documents, responds
from ..preconditions import IfMatch, not_modified
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
from ..security import require_auth
from ..tokens import Caller

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
    # A title-sorted cursor holds a title: up to 500 characters of 4 bytes.
    cursor: str | None = Field(None, max_length=4096)

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

    def filters(self, caller: Caller) -> TaskFilters:
        if self.assignee_id == "me":
            assignee_id: uuid.UUID | None = caller.user_id
        elif self.assignee_id in (None, "none"):
            assignee_id = None
        else:
            assignee_id = uuid.UUID(self.assignee_id)
        statuses = self.status.split(",") if self.status is not None else []
        return TaskFilters(
            statuses=tuple(TaskStatus(status) for status in dict.fromkeys(statuses)),
            unassigned=self.assignee_id == "none",
            assignee_id=assignee_id,
            due_before=self.due_before,
            due_after=self.due_after,
            search=self.q,
        )


@blueprint.get("/projects/<uuid:project_id>/tasks")
@require_auth
@validate_querystring(TaskQuery)
@responds(Page[TaskOut])
async def list_tasks(caller: Caller, project_id: uuid.UUID, query_args: TaskQuery) -> Response:
    """List a project's tasks: filtered, searched, sorted, and paged by cursor."""
    db_session = session()
    await require_member(db_session, project_id, caller)
    page = await task_page(
        db_session,
        project_id,
        query_args.filters(caller),
        TaskOrder.parse(query_args.sort),
        query_args.limit,
        query_args.cursor,
    )
    return json_response(page)


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
@responds(TaskOut, 201, headers=("Location", "ETag"))
async def create_task(caller: Caller, project_id: uuid.UUID, data: TaskFields) -> Response:
    """Create a task; the assignee, if any, must be a member of the project."""
    db_session = session()
    lock = await lock_project(db_session, project_id, caller)
    created = await tasks.insert_task(db_session, lock, caller.user_id, data.model_dump())
    headers = {"Location": f"/tasks/{created.task['id']}", "ETag": created.etag}
    return json_response(created.task, 201, headers)


@blueprint.get("/tasks/<uuid:task_id>")
@require_auth
@responds(TaskOut, headers=("ETag",))
@responds(None, 304, headers=("ETag",))
async def get_task(caller: Caller, task_id: uuid.UUID) -> Response:
    """Get a task of a project the caller is a member of, with its `ETag`.

    With `If-None-Match` naming the current `ETag`: 304, no body.
    """
    document = await tasks.read_task(session(), task_id, caller)
    return not_modified(document.etag) or json_response(
        document.body, headers={"ETag": document.etag}
    )


@blueprint.put("/tasks/<uuid:task_id>")
@require_auth
@documents(412)
@validate_request(TaskFields)
@responds(TaskOut, headers=("ETag",))
async def replace_task(caller: Caller, task_id: uuid.UUID, data: TaskFields) -> Response:
    """Replace a task's writable fields: an omitted one becomes null (status: pending).

    With `If-Match`, a stale `ETag` is a 412 and nothing changes.
    """
    return await edit_task(caller, task_id, data.model_dump())


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
@responds(TaskOut, headers=("ETag",))
async def patch_task(caller: Caller, task_id: uuid.UUID, data: TaskPatch) -> Response:
    """Change only the fields sent; `null` clears. `If-Match` as for PUT."""
    return await edit_task(caller, task_id, data.model_dump(include=data.model_fields_set))


async def edit_task(caller: Caller, task_id: uuid.UUID, values: dict[str, object]) -> Response:
    if_match = IfMatch.of_request()
    updated = await tasks.update_task(session(), task_id, caller, values, if_match)
    return json_response(updated.task, headers={"ETag": updated.etag})


@blueprint.delete("/tasks/<uuid:task_id>")
@require_auth
@documents(412)
@responds(None, 204)
async def delete_task(caller: Caller, task_id: uuid.UUID) -> Response:
    """Delete a task (honouring `If-Match`)."""
    if_match = IfMatch.of_request()
    await tasks.remove_task(session(), task_id, caller, if_match)
    return no_content()
