"""A project's task list: filtered, searched, sorted, and paged by keyset.

A page's statement depends only on its *shape* (the sort, which filters, where
it starts, the dialect); the values are bound parameters. Each shape is built
once: building and adapting a fresh statement per request was a sixth of a
page's CPU.
"""

from __future__ import annotations

import functools
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import (
    ColumnElement,
    and_,
    any_,
    bindparam,
    or_,
    select,
    text,
    tuple_,
    union_all,
)
from sqlalchemy.dialects.postgresql import ARRAY
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.expression import TextClause

from ..db import AnySelect, rows
from ..models import SEARCH_DOCUMENT, Task, TaskStatus
from ..pagination import Paged, decode_cursor, encode_cursor, invalid_cursor
from ..schemas import words_of
from .tasks import TASK_FIELDS, TaskRecord, task_record

SortColumn = Literal["created_at", "updated_at", "due_date", "title"]
# Where a page starts: after a sort value, among the undated tasks (due date
# sort only), or at the beginning.
After = Literal["value", "undated"] | None
Condition = ColumnElement[bool] | TextClause


@dataclass(frozen=True)
class TaskFilters:
    """Which tasks a list shows; empty or None: not filtered by that."""

    statuses: tuple[TaskStatus, ...] = ()
    unassigned: bool = False
    assignee_id: uuid.UUID | None = None
    due_before: datetime | None = None
    due_after: datetime | None = None
    search: str | None = None  # words to find in title or description

    @property
    def words(self) -> list[str]:
        return words_of(self.search) if self.search is not None else []


@dataclass(frozen=True)
class TaskOrder:
    column: SortColumn = "created_at"
    descending: bool = True

    @classmethod
    def parse(cls, sort: str) -> TaskOrder:
        """``created_at``, ``-title``…: a column, descending with a leading ``-``."""
        column: SortColumn = sort.lstrip("-")  # type: ignore[assignment]
        return cls(column, sort.startswith("-"))


@dataclass(frozen=True)
class PageShape:
    """What a page's statement depends on: everything but the bound values."""

    order: TaskOrder
    status: bool
    unassigned: bool
    assignee: bool
    due_before: bool
    due_after: bool
    word_count: int
    after: After
    dialect: str

    @classmethod
    def of(cls, filters: TaskFilters, order: TaskOrder, after: After, dialect: str) -> PageShape:
        return cls(
            order=order,
            status=bool(filters.statuses),
            unassigned=filters.unassigned,
            assignee=filters.assignee_id is not None,
            due_before=filters.due_before is not None,
            due_after=filters.due_after is not None,
            word_count=len(filters.words),
            after=after,
            dialect=dialect,
        )


LIKE_ESCAPE = re.compile("[/%_]")


def filter_params(filters: TaskFilters) -> dict[str, Any]:
    """The bound values of *filters*, named as ``page_statement`` binds them."""
    params: dict[str, Any] = {}
    if filters.statuses:
        params["statuses"] = list(filters.statuses)
    if filters.assignee_id is not None:
        params["assignee_id"] = filters.assignee_id
    if filters.due_before is not None:
        params["due_before"] = filters.due_before
    if filters.due_after is not None:
        params["due_after"] = filters.due_after
    if filters.search is not None:
        # PostgreSQL's full text search parses the text; elsewhere, word by word.
        params["words"] = filters.search
        for n, word in enumerate(filters.words):
            params[f"word{n}"] = LIKE_ESCAPE.sub(r"/\g<0>", word)
    return params


async def task_page(
    db_session: AsyncSession,
    project_id: uuid.UUID,
    filters: TaskFilters,
    order: TaskOrder,
    limit: int,
    cursor: str | None,
) -> Paged[TaskRecord]:
    """A page of the project's tasks; the caller's membership is checked by the caller."""
    scope = f"tasks:{project_id}:{'-' if order.descending else ''}{order.column}"
    params = {"project_id": project_id, "limit": limit + 1, **filter_params(filters)}
    after: After = None
    if cursor:
        value, params["after_id"] = decode_position(order.column, decode_cursor(cursor, scope))
        after = "undated" if value is None else "value"
        params["after_value"] = value
    dialect = db_session.get_bind().dialect.name
    statement = page_statement(PageShape.of(filters, order, after, dialect))
    items = [task_record(row) for row in await rows(db_session, statement, params)]
    next_cursor = None
    if len(items) > limit:
        items = items[:limit]
        last = items[-1]
        next_cursor = encode_cursor(scope, [last[order.column], last["id"]])
    return {"items": items, "next_cursor": next_cursor}


def decode_position(column: SortColumn, position: list[Any]) -> tuple[Any, uuid.UUID]:
    """The sort value and id a cursor's page starts after; a 422 if malformed."""
    try:
        value, last_id = position
        if column == "title":
            if not isinstance(value, str):
                raise ValueError("title")
        elif value is not None or column != "due_date":
            value = datetime.fromisoformat(value)
        return value, uuid.UUID(last_id)
    except (AttributeError, TypeError, ValueError):
        raise invalid_cursor() from None


@functools.lru_cache(maxsize=1024)
def page_statement(shape: PageShape) -> AnySelect:
    base = select(*TASK_FIELDS).where(
        Task.project_id == bindparam("project_id"), *filter_conditions(shape)
    )
    if shape.order.column == "due_date":
        return due_date_page(base, shape.order.descending, shape.after)
    column = getattr(Task, shape.order.column)
    return keyset_page(base, column, shape.order.descending, shape.after == "value")


def filter_conditions(shape: PageShape) -> list[Condition]:
    conditions: list[Condition] = []
    if shape.status:
        conditions.append(status_in(shape.dialect))
    if shape.unassigned:
        conditions.append(Task.assignee_id.is_(None))
    if shape.assignee:
        conditions.append(Task.assignee_id == bindparam("assignee_id"))
    if shape.due_before:
        conditions.append(Task.due_date < bindparam("due_before"))
    if shape.due_after:
        conditions.append(Task.due_date > bindparam("due_after"))
    if shape.word_count:
        conditions.append(search(shape.word_count, shape.dialect))
    return conditions


def status_in(dialect: str) -> Condition:
    """The status is one of the bound ``statuses``: on PostgreSQL one array
    parameter, so the statement's text is the same for any number of them and
    needs no rendering per request (an expanding IN did, a twentieth of a
    page's CPU)."""
    if dialect == "postgresql":
        return Task.status == any_(bindparam("statuses", type_=ARRAY(Task.status.type)))
    return Task.status.in_(bindparam("statuses", expanding=True))


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


def due_date_page(base: AnySelect, descending: bool, after: After) -> AnySelect:
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
