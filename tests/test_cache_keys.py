"""The typed cache keys: what is stored in Redis decodes to exactly what was cached."""

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from types import SimpleNamespace
from typing import Any, TypeVar

import pytest
from quart import Quart

from taskflow import cache, create_app
from taskflow.access import role_key
from taskflow.config import Config
from taskflow.data.tasks import TaskDocument, task_key
from taskflow.models import MemberRole
from taskflow.redis_gate import RedisGate

T = TypeVar("T")

PROJECT_ID = uuid.uuid4()
BODIES = [
    b'{"id":"1","title":"Write  the docs ","description":"two words: more"}',
    b" leading and trailing spaces ",
    b"",
    b" ",
    "caf\u00e9 \u2028 \u3000".encode(),
]


@pytest.mark.parametrize("body", BODIES)
def test_a_task_document_round_trips(body: bytes) -> None:
    document = TaskDocument(PROJECT_ID, 12, body)
    decoded = TaskDocument.decode(document.encode())
    assert decoded == document
    assert decoded.body == body
    assert decoded.etag == '"12"'


@pytest.mark.parametrize("body", BODIES)
def test_the_task_key_stores_a_document_exactly(body: bytes) -> None:
    key = task_key(uuid.uuid4())
    document = TaskDocument(PROJECT_ID, 3, body)
    assert key.decode(key.encode(document)) == document


def test_the_task_key_stores_none_apart_from_any_document() -> None:
    key = task_key(uuid.uuid4())
    assert key.encode(None) == b""
    assert key.decode(key.encode(None)) is None
    empty = TaskDocument(PROJECT_ID, 1, b"")
    assert key.decode(key.encode(empty)) == empty


def test_the_task_key_is_named_by_the_task() -> None:
    task_id = uuid.uuid4()
    key = task_key(task_id)
    assert key.name == f"task-document:{task_id}"
    assert key.entry != key.generation
    assert task_key(uuid.uuid4()).entry != key.entry


@pytest.mark.parametrize("role", [MemberRole.OWNER, MemberRole.MEMBER, None])
def test_the_role_key_stores_a_role_or_none_exactly(role: MemberRole | None) -> None:
    key = role_key(uuid.uuid4(), uuid.uuid4())
    decoded = key.decode(key.encode(role))
    assert decoded is role
    assert key.encode(role) == (role.value.encode() if role is not None else b"")


def test_the_role_key_is_named_by_project_then_user() -> None:
    project_id, user_id = uuid.uuid4(), uuid.uuid4()
    assert role_key(project_id, user_id).name == f"member:{project_id}:{user_id}"
    assert role_key(project_id, user_id).entry != role_key(user_id, project_id).entry


# Through the read-through cache, on an in-memory Redis


class FakeRedis:
    """The two commands ``cache.through`` sends, on a dict of bytes, as Redis
    answers a client made without ``decode_responses``."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    async def mget(self, *names: str) -> list[bytes | None]:
        return [self.data.get(name) for name in names]

    async def set(self, name: str, value: bytes, ex: int | None = None) -> None:
        assert isinstance(value, bytes)
        self.data[name] = value


@pytest.fixture
async def redis(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeRedis]:
    redis = FakeRedis()
    gate = RedisGate(redis, deadline_seconds=1, backoff_seconds=1)  # type: ignore[arg-type]
    monkeypatch.setattr(cache, "backends", lambda: SimpleNamespace(redis=gate))
    app: Quart = create_app(
        Config(database_url="sqlite+aiosqlite:///:memory:", redis_url=None, secret_key="x" * 40)
    )
    async with app.app_context():
        yield redis


def counting(value: T) -> tuple[Callable[[], Awaitable[T]], list[int]]:
    loads: list[int] = []

    async def load() -> T:
        loads.append(1)
        return value

    return load, loads


@pytest.mark.parametrize(
    "value",
    [
        TaskDocument(PROJECT_ID, 5, BODIES[0]),
        TaskDocument(PROJECT_ID, 5, b""),
        None,
    ],
)
async def test_a_cached_task_reads_back_as_loaded(redis: FakeRedis, value: Any) -> None:
    key = task_key(uuid.uuid4())
    load, loads = counting(value)
    assert await cache.through(key, load) == value
    assert await cache.through(key, load) == value
    assert loads == [1]
    redis.data[key.generation] = b"1"  # an invalidation
    assert await cache.through(key, load) == value
    assert loads == [1, 1]


@pytest.mark.parametrize("role", [MemberRole.OWNER, MemberRole.MEMBER, None])
async def test_a_cached_role_reads_back_as_loaded(
    redis: FakeRedis, role: MemberRole | None
) -> None:
    key = role_key(uuid.uuid4(), uuid.uuid4())
    load, loads = counting(role)
    assert await cache.through(key, load) is role
    assert await cache.through(key, load) is role
    assert loads == [1]
