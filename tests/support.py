"""What the tests share that is not a fixture: the backends under test, the
run's database, apps and live servers that clean up after themselves, users
registered through the API, and assertions on its answers.

With ``TASKFLOW_TEST_DATABASE_URL`` and ``TASKFLOW_TEST_REDIS_URL`` set the
suite runs on PostgreSQL and Redis; without them, on the embedded default.
Test modules import from here; the fixtures are in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Mapping
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
from sqlalchemy import delete, event, func, select, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

from taskflow import create_app
from taskflow.cli import alembic_config
from taskflow.config import Config, normalize_database_url
from taskflow.db import backends, create_engine
from taskflow.models import Base

# The backends under test.

TEST_DATABASE_URL = os.environ.get("TASKFLOW_TEST_DATABASE_URL", "").strip()
TEST_REDIS_URL = os.environ.get("TASKFLOW_TEST_REDIS_URL", "").strip()
ON_POSTGRES = bool(TEST_DATABASE_URL)
TEST_SECRET = "test-secret-key-that-is-long-enough-for-hs256"
PROJECT_ROOT = Path(__file__).resolve().parent.parent

postgres_only = pytest.mark.skipif(not ON_POSTGRES, reason="needs TASKFLOW_TEST_DATABASE_URL")
redis_only = pytest.mark.skipif(not TEST_REDIS_URL, reason="needs TASKFLOW_TEST_REDIS_URL")


# The run's database.


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


# Cleaning up after a test.


async def empty_tables(engine: AsyncEngine) -> None:
    """Delete every row of every table *engine* reaches, and start its
    sequences again (as SQLite does once a table is empty).

    DELETE rather than TRUNCATE on PostgreSQL: a test leaves a few rows, which
    go in milliseconds, where a TRUNCATE makes new files for every table and
    index (0.1-0.2 s measured, after each of the suite's ~850 tests)."""
    async with engine.begin() as connection:
        for table in reversed(Base.metadata.sorted_tables):
            await connection.execute(delete(table))
        if connection.dialect.name == "postgresql":
            sequences = await connection.execute(
                text("SELECT sequencename FROM pg_sequences WHERE schemaname = current_schema()")
            )
            for sequence in sequences.scalars().all():
                await connection.execute(text(f'ALTER SEQUENCE "{sequence}" RESTART'))


async def flush_redis() -> None:
    """Empty the test Redis database, if the run has one."""
    if TEST_REDIS_URL:
        client = aioredis.from_url(TEST_REDIS_URL)
        await client.flushdb()
        await client.aclose()


async def empty_database_of(environ: Mapping[str, str]) -> None:
    """Empty the tables of the database a server configured by *environ*
    uses: ``DATABASE_URL``, or the embedded default's SQLite file in
    ``TASKFLOW_INSTANCE_DIR``, through an engine made as the app makes it."""
    engine = create_engine(Config.from_env(environ))
    try:
        await empty_tables(engine)
    finally:
        await engine.dispose()


# Apps and live servers.


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
            async with app.app_context():
                await empty_tables(backends().engine)


# A hard stop for a live server's start, far beyond the few seconds it takes.
SERVER_START_SECONDS = 60


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@asynccontextmanager
async def hypercorn(
    environ: dict[str, str],
    workers: int = 1,
    # Short: a server that has had a WebSocket open waits out the whole
    # graceful timeout when it stops (hypercorn's pinger); tests about a
    # graceful stop give their own.
    graceful_timeout: int = 1,
    *,
    empty_database: bool = True,
) -> AsyncIterator[tuple[str, asyncio.subprocess.Process]]:
    """A real web process started as the Procfile's ``web:`` line starts it
    (``python -m taskflow serve``: hypercorn's workers, from its settings file,
    under TaskFlow's master), with this test's bind, workers and graceful
    timeout, in a process group of its own (signal it as a platform would, with killpg);
    yields its URL and process once it answers. Once it has stopped, the
    tables of its database are emptied and the test Redis database flushed,
    so that no test sees the rows or keys another one left (not the tables
    with *empty_database* false: a server given a database that is not there)."""
    server_environ = {**os.environ, **environ}
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *web_command(f"127.0.0.1:{port}", workers, graceful_timeout),
        env=server_environ,
        cwd=PROJECT_ROOT,
        start_new_session=True,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=open(os.environ.get("TASKFLOW_TEST_SERVER_LOG", os.devnull), "a"),  # noqa: ASYNC230, SIM115
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            # Two workers importing the app take a few seconds, more on a
            # busy machine (CI runs both suites at once): what a test is
            # about starts once the server answers, however long that took.
            deadline = time.monotonic() + SERVER_START_SECONDS
            while True:
                with contextlib.suppress(httpx.TransportError):
                    if (await http.get(f"{url}/healthz")).status_code == 200:
                        break
                # Not answering, or not healthy yet: either way within the deadline.
                if process.returncode is not None or time.monotonic() > deadline:
                    raise RuntimeError("the server did not start")
                await asyncio.sleep(0.05)
        yield url, process
    finally:
        try:
            if process.returncode is None:
                process.terminate()
                await asyncio.wait_for(process.wait(), 15)
        finally:
            if empty_database:
                await empty_database_of(server_environ)
            await flush_redis()


def web_command(bind: str, workers: int = 1, graceful_timeout: float = 5) -> list[str]:
    """The Procfile's ``web:`` command, bound where a test wants it."""
    return [
        sys.executable, "-m", "taskflow", "serve", "--bind", bind, "--workers", str(workers),
        "--graceful-timeout", str(graceful_timeout),
    ]  # fmt: skip


@asynccontextmanager
async def live_server(environ: dict[str, str]) -> AsyncIterator[str]:
    """A live instance; yields its URL. Cleans up after itself as
    ``hypercorn`` does."""
    async with hypercorn(environ) as (url, _process):
        yield url


@asynccontextmanager
async def private_redis(port: int) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Redis of this test's own, to stop and start at will."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
        "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


@asynccontextmanager
async def private_tls_redis(
    port: int, cert_file: Path, key_file: Path, *, password: str | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A Redis of this test's own that speaks TLS only (no plain port), with
    *cert_file* and *key_file* as its certificate and key, no client
    certificate asked for, and *password* if given; yields once it accepts
    connections."""
    process = await asyncio.create_subprocess_exec(
        "redis-server", "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
        "--tls-cert-file", str(cert_file), "--tls-key-file", str(key_file),
        "--tls-auth-clients", "no", "--save", "", "--appendonly", "no",
        *(("--requirepass", password) if password else ()),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                if process.returncode is not None:
                    break
                await asyncio.sleep(0.05)
            else:
                writer.close()
                await writer.wait_closed()
                break
        else:
            raise RuntimeError("the private TLS Redis did not start")
        if process.returncode is not None:
            raise RuntimeError(f"the private TLS Redis exited with status {process.returncode}")
        yield process
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# Users, projects and tasks, made through the API.

PASSWORD = "correct horse battery staple"


@dataclass
class TestUser:
    """A user registered and logged in through the API, in process or live."""

    __test__ = False

    id: str
    email: str
    password: str
    access_token: str
    refresh_token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.access_token}"}


def new_email() -> str:
    return f"user-{uuid.uuid4().hex[:12]}@example.com"


async def login(client: Client, email: str, password: str = PASSWORD) -> dict[str, Any]:
    response = await client.post("/auth/login", json={"email": email, "password": password})
    assert response.status_code == 200, await response.get_json()
    tokens: dict[str, Any] = await response.get_json()
    return tokens


async def create_user(client: Client, email: str | None = None) -> TestUser:
    """Register and log in a user through the API, with the app's test client."""
    email = email or new_email()
    response = await client.post("/auth/register", json={"email": email, "password": PASSWORD})
    assert response.status_code == 201, await response.get_json()
    user = await response.get_json()
    tokens = await login(client, email)
    return TestUser(user["id"], email, PASSWORD, tokens["access_token"], tokens["refresh_token"])


async def register_user(
    http: httpx.AsyncClient, email: str | None = None, password: str = PASSWORD
) -> TestUser:
    """Register and log in a user through the API of a live server; *http*
    has the server's ``base_url``."""
    credentials = {"email": email or new_email(), "password": password}
    registered = await http.post("/auth/register", json=credentials)
    assert registered.status_code == 201, registered.text
    logged_in = await http.post("/auth/login", json=credentials)
    assert logged_in.status_code == 200, logged_in.text
    tokens = logged_in.json()
    return TestUser(
        registered.json()["id"],
        credentials["email"],
        password,
        tokens["access_token"],
        tokens["refresh_token"],
    )


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


# Assertions and probes.


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


def tampered(cursor: str) -> str:
    """*cursor* with one character of its payload changed."""
    return ("B" if cursor[0] == "A" else "A") + cursor[1:]


@asynccontextmanager
async def statements(app: Quart) -> AsyncIterator[list[str]]:
    """The SQL queries the app's requests send meanwhile: not SQLite's BEGIN,
    nor the in-process webhook deliverer's look for due webhooks, which every
    event (a task created a moment ago) wakes in the background."""
    sent: list[str] = []

    def record(*args: Any) -> None:
        statement = args[2]
        if not statement.startswith("BEGIN") and "FROM webhooks" not in statement:
            sent.append(statement)

    async with app.app_context():
        engine = backends().engine.sync_engine
    event.listen(engine, "before_cursor_execute", record)
    try:
        yield sent
    finally:
        event.remove(engine, "before_cursor_execute", record)
