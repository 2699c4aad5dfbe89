"""Test fixtures: a fresh database per run, the app started with ``test_app()``,
and every test isolated by emptying the tables and Redis after it.

With ``TASKFLOW_TEST_DATABASE_URL`` and ``TASKFLOW_TEST_REDIS_URL`` set the
suite runs on PostgreSQL and Redis; without them, on the embedded default.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import sys
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from alembic import command
from quart import Blueprint, Quart
from quart.typing import TestClientProtocol as Client
from sqlalchemy import delete, func, select, text
from sqlalchemy.engine import make_url

from taskflow import create_app
from taskflow.cli import alembic_config
from taskflow.config import Config, normalize_database_url
from taskflow.db import backends
from taskflow.models import Base

TEST_DATABASE_URL = os.environ.get("TASKFLOW_TEST_DATABASE_URL", "").strip()
TEST_REDIS_URL = os.environ.get("TASKFLOW_TEST_REDIS_URL", "").strip()
ON_POSTGRES = bool(TEST_DATABASE_URL)
TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

postgres_only = pytest.mark.skipif(not ON_POSTGRES, reason="needs TASKFLOW_TEST_DATABASE_URL")
redis_only = pytest.mark.skipif(not TEST_REDIS_URL, reason="needs TASKFLOW_TEST_REDIS_URL")


def migrate(database_url: str, revision: str = "head") -> None:
    config = alembic_config()
    config.attributes["database_url"] = database_url
    config.attributes["configure_logger"] = False
    command.upgrade(config, revision)


async def _admin(sql: str) -> None:
    url = make_url(normalize_database_url(TEST_DATABASE_URL))
    connection = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database or "postgres",
    )
    try:
        await connection.execute(sql)
    finally:
        await connection.close()


def create_postgres_database() -> str:
    """Create an empty database for this run; return its asyncpg URL."""
    name = f"taskflow_test_{os.getpid()}_{secrets.token_hex(4)}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return (
        make_url(normalize_database_url(TEST_DATABASE_URL))
        .set(database=name)
        .render_as_string(hide_password=False)
    )


def drop_postgres_database(url: str) -> None:
    name = make_url(url).database
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def instance_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("instance")


@pytest.fixture(scope="session")
def database_url(instance_dir: Path) -> Iterator[str]:
    """The run's migrated database: a fresh PostgreSQL database, or the
    embedded default's SQLite file."""
    if ON_POSTGRES:
        url = create_postgres_database()
        migrate(url)
        yield url
        drop_postgres_database(url)
    else:
        url = Config.from_env({"TASKFLOW_INSTANCE_DIR": str(instance_dir)}).database_url
        migrate(url)
        yield url


@pytest.fixture
def environ(database_url: str, instance_dir: Path) -> dict[str, str]:
    """The environment the app under test is configured from."""
    env = {
        "TASKFLOW_BCRYPT_ROUNDS": "4",
        "TASKFLOW_LOG_LEVEL": "INFO",
        # Tests that are about limits set their own.
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": "100000",
        "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE": "100000",
        "TASKFLOW_WS_CONNECTIONS_PER_MINUTE": "100000",
        "TASKFLOW_WS_MESSAGES_PER_SECOND": "100000",
    }
    if ON_POSTGRES:
        env.update(DATABASE_URL=database_url, TASKFLOW_SECRET_KEY=TEST_SECRET)
    else:
        env.update(TASKFLOW_INSTANCE_DIR=str(instance_dir))
    if TEST_REDIS_URL:
        env["REDIS_URL"] = TEST_REDIS_URL
    return env


@pytest.fixture
def config(environ: dict[str, str]) -> Config:
    return Config.from_env(environ)


async def empty_tables(app: Quart) -> None:
    async with app.app_context(), backends().engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
            await connection.execute(text(f"TRUNCATE {tables} RESTART IDENTITY CASCADE"))
        else:
            for table in reversed(Base.metadata.sorted_tables):
                await connection.execute(delete(table))


async def flush_redis() -> None:
    if TEST_REDIS_URL:
        client = aioredis.from_url(TEST_REDIS_URL)
        await client.flushdb()
        await client.aclose()


@asynccontextmanager
async def running(config: Config, *blueprints: Blueprint) -> AsyncIterator[Quart]:
    """Start an app of *config*, with any test-only blueprints, as hypercorn
    would (startup hooks included); empty the tables after it."""
    await flush_redis()
    app = create_app(config)
    for blueprint in blueprints:
        app.register_blueprint(blueprint)
    async with app.test_app():
        try:
            yield app
        finally:
            await empty_tables(app)


@pytest.fixture
async def app(config: Config) -> AsyncIterator[Quart]:
    async with running(config) as app:
        yield app


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


def problem_of(response: Any, body: dict[str, Any], status: int, code: str) -> None:
    """Assert *response* is the contract's problem+json for *status*/*code*."""
    assert response.status_code == status, body
    assert response.headers["Content-Type"] == "application/problem+json"
    assert body["status"] == status
    assert body["code"] == code
    assert body["type"] == "about:blank"
    assert body["title"]
    assert body["detail"]
    assert body["request_id"] == response.headers["X-Request-ID"]


PASSWORD = "correct horse battery staple"


@dataclass
class TestUser:
    __test__ = False

    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


async def login(client: Client, email: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await client.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, await response.get_json()
    tokens: dict[str, Any] = await response.get_json()
    return tokens


async def create_user(client: Client, email: str | None = None) -> TestUser:
    """Register and log in a user through the API."""
    email = email or f"user-{uuid.uuid4().hex[:12]}@example.com"
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, await response.get_json()
    user = await response.get_json()
    tokens = await login(client, email)
    return TestUser(user["id"], email, PASSWORD, tokens["access_token"], tokens["refresh_token"])


async def create_project(client: Client, owner: TestUser, name: str = "Project") -> dict[str, Any]:
    response = await client.post("/projects", json={"name": name}, headers=owner.headers)
    assert response.status_code == 201, await response.get_json()
    project: dict[str, Any] = await response.get_json()
    return project


async def add_member(
    client: Client, project: dict[str, Any], owner: TestUser, user: TestUser
) -> None:
    response = await client.post(
        f"/projects/{project['id']}/members", json={"email": user.email}, headers=owner.headers
    )
    assert response.status_code == 201, await response.get_json()


async def create_task(
    client: Client, project: dict[str, Any], user: TestUser, **fields: Any
) -> dict[str, Any]:
    body = {"title": "A task", **fields}
    response = await client.post(
        f"/projects/{project['id']}/tasks", json=body, headers=user.headers
    )
    assert response.status_code == 201, await response.get_json()
    task: dict[str, Any] = await response.get_json()
    return task


async def snapshot(app: Quart) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table, to show that a refused request changed nothing."""
    async with app.app_context(), backends().engine.connect() as connection:
        return {
            table.name: sorted(
                (tuple(map(repr, row)) for row in await connection.execute(table.select())),
            )
            for table in Base.metadata.sorted_tables
        }


async def count_rows(app: Quart, model: Any, *where: Any) -> int:
    async with app.app_context(), backends().sessionmaker() as db_session:
        query = select(func.count()).select_from(model).where(*where)
        return (await db_session.execute(query)).scalar_one()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def hypercorn(
    environ: dict[str, str], workers: int = 1, graceful_timeout: int = 5
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A real hypercorn serving ``wsgi:app`` the way the Procfile does, in a
    process group of its own (signal it as a platform would, with killpg);
    yields its URL and process once it answers."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hypercorn", "wsgi:app", "--bind", f"127.0.0.1:{port}",
        "--worker-class", "uvloop", "--workers", str(workers),
        "--graceful-timeout", str(graceful_timeout),
        env={**os.environ, **environ},
        cwd=PROJECT_ROOT,
        start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(os.environ.get("TASKFLOW_TEST_SERVER_LOG", os.devnull), "a"),  # noqa: ASYNC230, SIM115
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(200):
                try:
                    if (await http.get(f"{url}/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            else:
                raise RuntimeError("the server did not start")
        yield url, process
    finally:
        if process.returncode is None:
            process.terminate()
            await asyncio.wait_for(process.wait(), 15)


@asynccontextmanager
async def live_server(environ: dict[str, str]) -> AsyncIterator[str]:
    """A live instance; yields its URL."""
    async with hypercorn(environ) as (url, _process):
        yield url


def tampered(cursor: str) -> str:
    """*cursor* with one character of its payload changed."""
    return ("B" if cursor[0] == "A" else "A") + cursor[1:]


@pytest.fixture
async def owner(client: Client) -> TestUser:
    return await create_user(client)


@pytest.fixture
async def member(client: Client) -> TestUser:
    return await create_user(client)


@pytest.fixture
async def stranger(client: Client) -> TestUser:
    return await create_user(client)


@pytest.fixture
async def project(client: Client, owner: TestUser, member: TestUser) -> dict[str, Any]:
    """A project of *owner*, with *member* added."""
    project = await create_project(client, owner, "Launch")
    await add_member(client, project, owner, member)
    return project
