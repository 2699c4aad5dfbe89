"""The task list's statements: one per shape, bound by ``filter_params``, keyset
paged (no OFFSET); and pages walked on an in-memory SQLite database."""

import itertools
import re
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from quart import Quart
from sqlalchemy import Dialect, insert
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.pool import StaticPool

from taskflow import create_app
from taskflow.config import Config
from taskflow.data.task_list import (
    After,
    PageShape,
    SortColumn,
    TaskFilters,
    TaskOrder,
    decode_position,
    filter_params,
    page_statement,
    task_page,
)
from taskflow.db import AnySelect
from taskflow.errors import APIError
from taskflow.models import Base, Task, TaskStatus

# The dialects of the app's drivers (making an engine connects to nothing).
DIALECTS: list[Dialect] = [
    create_async_engine(url).dialect for url in ("postgresql+asyncpg://", "sqlite+aiosqlite://")
]
COLUMNS: list[SortColumn] = ["created_at", "updated_at", "due_date", "title"]
ORDERS = [TaskOrder(column, descending) for column in COLUMNS for descending in (False, True)]
WHEN = datetime(2024, 5, 1, 12, tzinfo=UTC)
FILTER_SETS = [
    TaskFilters(),
    TaskFilters(statuses=(TaskStatus.PENDING, TaskStatus.COMPLETED)),
    TaskFilters(unassigned=True),
    TaskFilters(assignee_id=uuid.uuid4()),
    TaskFilters(due_before=WHEN, due_after=WHEN - timedelta(days=9)),
    TaskFilters(search="launch"),
    TaskFilters(search="50% off_peak a/b"),
    TaskFilters(
        statuses=(TaskStatus.IN_PROGRESS,),
        assignee_id=uuid.uuid4(),
        due_before=WHEN,
        due_after=WHEN,
        search="one two",
    ),
]


def afters(order: TaskOrder) -> list[After]:
    return [None, "value", "undated"] if order.column == "due_date" else [None, "value"]


SHAPES = [
    (filters, order, after)
    for filters, order in itertools.product(FILTER_SETS, ORDERS)
    for after in afters(order)
]


def required_binds(statement: AnySelect, dialect: Dialect) -> set[str]:
    """The names of the parameters a statement needs values for."""
    compiled = statement.compile(dialect=dialect)
    return {name for name, bind in compiled.binds.items() if bind.required}


def position_params(after: After) -> set[str]:
    return {"value": {"after_value", "after_id"}, "undated": {"after_id"}, None: set()}[after]


@pytest.mark.parametrize(
    ("sort", "expected"),
    [
        ("created_at", TaskOrder("created_at", False)),
        ("-created_at", TaskOrder("created_at", True)),
        ("title", TaskOrder("title", False)),
        ("-due_date", TaskOrder("due_date", True)),
        ("updated_at", TaskOrder("updated_at", False)),
    ],
)
def test_sort_parses_as_a_column_descending_with_a_leading_minus(
    sort: str, expected: TaskOrder
) -> None:
    assert TaskOrder.parse(sort) == expected


def test_the_default_order_is_newest_first() -> None:
    assert TaskOrder() == TaskOrder("created_at", True)


def test_filters_with_other_values_but_the_same_shape_share_one_statement() -> None:
    order = TaskOrder("due_date", True)
    one = TaskFilters(
        statuses=(TaskStatus.PENDING,),
        assignee_id=uuid.uuid4(),
        due_before=WHEN,
        search="alpha beta",
    )
    other = TaskFilters(
        statuses=(TaskStatus.COMPLETED, TaskStatus.IN_PROGRESS),
        assignee_id=uuid.uuid4(),
        due_before=WHEN + timedelta(days=3),
        search="gamma   delta",
    )
    for dialect in ("postgresql", "sqlite"):
        shape = PageShape.of(one, order, "value", dialect)
        assert shape == PageShape.of(other, order, "value", dialect)
        assert hash(shape) == hash(PageShape.of(other, order, "value", dialect))
        assert page_statement(shape) is page_statement(PageShape.of(other, order, "value", dialect))


@pytest.mark.parametrize(
    "other",
    [
        TaskFilters(search="one two three"),  # another number of words
        TaskFilters(search="one two", unassigned=True),
        TaskFilters(search="one two", due_after=WHEN),
        TaskFilters(search="one two", statuses=(TaskStatus.PENDING,)),
        TaskFilters(search="one two", assignee_id=uuid.uuid4()),
    ],
)
def test_filters_of_another_shape_get_another_statement(other: TaskFilters) -> None:
    order = TaskOrder()
    base = PageShape.of(TaskFilters(search="one two"), order, None, "sqlite")
    shape = PageShape.of(other, order, None, "sqlite")
    assert shape != base
    assert page_statement(shape) is not page_statement(base)


def test_the_shape_includes_the_order_the_start_and_the_dialect() -> None:
    filters = TaskFilters()
    shapes = {
        PageShape.of(filters, order, after, dialect)
        for order in ORDERS
        for after in afters(order)
        for dialect in ("postgresql", "sqlite")
    }
    assert len(shapes) == len({page_statement(shape) for shape in shapes}) == 2 * (8 * 2 + 2)


@pytest.mark.parametrize(("filters", "order", "after"), SHAPES)
def test_filter_params_bind_every_value_the_statement_needs(
    filters: TaskFilters, order: TaskOrder, after: After
) -> None:
    params = set(filter_params(filters))
    used: set[str] = set()
    for dialect in DIALECTS:
        binds = required_binds(
            page_statement(PageShape.of(filters, order, after, dialect.name)), dialect
        )
        assert binds <= params | {"project_id", "limit"} | position_params(after), dialect.name
        assert position_params(after) <= binds
        used |= binds
    # Every value filter_params computes is bound on one dialect or the other.
    assert params <= used


def test_search_is_bound_as_text_on_postgresql_and_word_by_word_elsewhere() -> None:
    filters = TaskFilters(search="  one\ttwo  three ")
    assert filter_params(filters)["words"] == "  one\ttwo  three "
    shape = PageShape.of(filters, TaskOrder(), None, "postgresql")
    assert required_binds(page_statement(shape), DIALECTS[0]) == {"project_id", "limit", "words"}
    shape = PageShape.of(filters, TaskOrder(), None, "sqlite")
    assert required_binds(page_statement(shape), DIALECTS[1]) == {
        "project_id",
        "limit",
        "word0",
        "word1",
        "word2",
    }


def test_like_wildcards_in_words_are_escaped() -> None:
    params = filter_params(TaskFilters(search="50% off_peak a/b plain"))
    assert params["words"] == "50% off_peak a/b plain"
    assert [params[f"word{n}"] for n in range(4)] == ["50/%", "off/_peak", "a//b", "plain"]
    assert "word4" not in params


PLACEHOLDER = re.compile(r"\?|\$(\d+)|%\((\w+)\)s")


def offset_values(statement: AnySelect, dialect: Dialect) -> list[Any]:
    """The value of each OFFSET of *statement* compiled for *dialect*."""
    compiled = statement.compile(dialect=dialect)
    sql = str(compiled)
    in_order = iter(compiled.positiontup or [])
    values: list[Any] = []
    for match in PLACEHOLDER.finditer(sql):
        if match[0] == "?":
            name = next(in_order)
        elif match[1]:
            name = (compiled.positiontup or [])[int(match[1]) - 1]
        else:
            name = match[2]
        if sql[: match.start()].rstrip().upper().endswith("OFFSET"):
            values.append(compiled.params[name])
    values += [int(value) for value in re.findall(r"OFFSET\s+(\d+)", sql, re.IGNORECASE)]
    assert len(values) == len(re.findall(r"\bOFFSET\b", sql, re.IGNORECASE))
    return values


@pytest.mark.parametrize("order", ORDERS, ids=str)
def test_no_sort_pages_by_offset(order: TaskOrder) -> None:
    """SQLAlchemy's SQLite dialect writes ``OFFSET ?`` after every LIMIT: it must be 0."""
    filters = TaskFilters(assignee_id=uuid.uuid4(), due_after=WHEN, search="two words")
    for dialect, after in itertools.product(DIALECTS, afters(order)):
        statement = page_statement(PageShape.of(filters, order, after, dialect.name))
        assert set(offset_values(statement, dialect)) <= {0}


@pytest.mark.parametrize(
    ("column", "position", "expected"),
    [
        ("created_at", ["2024-05-01T12:00:00+00:00", "0" * 32], WHEN),
        ("updated_at", ["2024-05-01T12:00:00Z", "0" * 32], WHEN),
        ("due_date", ["2024-05-01T12:00:00+00:00", "0" * 32], WHEN),
        ("due_date", [None, "0" * 32], None),
        ("title", ["Write the docs", "0" * 32], "Write the docs"),
    ],
)
def test_a_position_decodes_as_its_columns_value_and_an_id(
    column: SortColumn, position: list[Any], expected: Any
) -> None:
    assert decode_position(column, position) == (expected, uuid.UUID(int=0))


ID = str(uuid.uuid4())
TIMESTAMP = "2024-05-01T12:00:00+00:00"


@pytest.mark.parametrize(
    ("column", "position"),
    [
        ("created_at", []),
        ("created_at", [TIMESTAMP]),
        ("created_at", [TIMESTAMP, ID, "more"]),
        ("created_at", ["yesterday", ID]),
        ("created_at", [None, ID]),
        ("updated_at", [None, ID]),
        ("updated_at", [1714564800, ID]),
        ("due_date", [1714564800, ID]),
        ("title", [None, ID]),
        ("title", [5, ID]),
        ("title", [["a list"], ID]),
        ("created_at", [TIMESTAMP, "not an id"]),
        ("created_at", [TIMESTAMP, None]),
        ("due_date", [None, "0" * 31]),
    ],
)
def test_a_malformed_position_is_a_422_naming_the_cursor(
    column: SortColumn, position: list[Any]
) -> None:
    with pytest.raises(APIError) as raised:
        decode_position(column, position)
    assert raised.value.status == 422
    assert [error["field"] for error in raised.value.errors or []] == ["cursor"]


# Pages, on SQLite in memory


@pytest.fixture
async def app() -> AsyncIterator[Quart]:
    yield create_app(
        Config(database_url="sqlite+aiosqlite:///:memory:", redis_url=None, secret_key="x" * 40)
    )


@pytest.fixture
async def db_session() -> AsyncIterator[AsyncSession]:
    engine = create_async_engine("sqlite+aiosqlite:///:memory:", poolclass=StaticPool)
    async with engine.begin() as connection:
        await connection.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine) as session:
        yield session
    await engine.dispose()


PROJECT_ID = uuid.uuid4()


async def add_tasks(db_session: AsyncSession, *titles_and_due: tuple[str, int | None]) -> None:
    """Tasks of PROJECT_ID: in pairs created at the same time, titles repeating,
    due dates (days from WHEN) repeating or absent."""
    await db_session.execute(
        insert(Task),
        [
            {
                "id": uuid.uuid4(),
                "project_id": PROJECT_ID,
                "title": title,
                "status": TaskStatus.PENDING,
                "due_date": None if due is None else WHEN + timedelta(days=due),
                "created_at": WHEN + timedelta(hours=n // 2),
                "updated_at": WHEN - timedelta(hours=n // 3),
            }
            for n, (title, due) in enumerate(titles_and_due)
        ],
    )


def expected_order(tasks: list[dict[str, Any]], order: TaskOrder) -> list[uuid.UUID]:
    if order.column != "due_date":
        ranked = sorted(tasks, key=lambda t: (t[order.column], t["id"]), reverse=order.descending)
        return [task["id"] for task in ranked]
    dated = [t for t in tasks if t["due_date"] is not None]
    undated = [t for t in tasks if t["due_date"] is None]
    dated.sort(key=lambda t: (t["due_date"], t["id"]), reverse=order.descending)
    undated.sort(key=lambda t: t["id"], reverse=order.descending)
    return [task["id"] for task in dated + undated]


@pytest.mark.parametrize("order", ORDERS, ids=str)
async def test_pages_walk_every_task_once_in_order(
    app: Quart, db_session: AsyncSession, order: TaskOrder
) -> None:
    await add_tasks(
        db_session,
        *[("b", 2), ("a", None), ("c", 2), ("a", 1), ("b", None), ("d", None), ("a", 5)],
        *[("c", 1), ("e", None)],
    )
    async with app.app_context():
        everything = await task_page(db_session, PROJECT_ID, TaskFilters(), order, 100, None)
        assert everything["next_cursor"] is None
        seen: list[uuid.UUID] = []
        cursor = None
        for _ in range(10):
            page = await task_page(db_session, PROJECT_ID, TaskFilters(), order, 2, cursor)
            assert len(page["items"]) <= 2
            seen += [task["id"] for task in page["items"]]
            cursor = page["next_cursor"]
            if cursor is None:
                break
    assert seen == expected_order(everything["items"], order)  # type: ignore[arg-type]
    assert len(set(seen)) == 9


@pytest.mark.parametrize(
    ("search", "found"),
    [
        ("100%", ["100% done"]),
        ("a_b", ["a_b"]),
        ("c/d", ["c/d"]),
        ("DONE 100", ["100% done", "1000 done"]),
    ],
)
async def test_search_matches_wildcards_literally(
    app: Quart, db_session: AsyncSession, search: str, found: list[str]
) -> None:
    titles = ["100% done", "1000 done", "a_b", "axb", "c/d", "cd"]
    await add_tasks(db_session, *[(title, None) for title in titles])
    async with app.app_context():
        page = await task_page(
            db_session, PROJECT_ID, TaskFilters(search=search), TaskOrder("title", False), 10, None
        )
    assert [task["title"] for task in page["items"]] == found
