"""Test fixtures: a fresh database per run, the app started with ``test_app()``,
and every test isolated by emptying the tables and Redis after it.

The helpers that tests import (``running``, ``live_server``, ``create_user``,
``problem_of``...) are in ``support.py``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.config import Config

from .faults import figures_table
from .support import (
    ON_POSTGRES,
    TEST_REDIS_URL,
    TEST_SECRET,
    TestUser,
    add_member,
    create_postgres_database,
    create_project,
    create_user,
    drop_postgres_database,
    migrate,
    running,
)


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
        "TASKFLOW_WS_SOCKETS_PER_USER": "100000",
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


@pytest.fixture
async def app(config: Config) -> AsyncIterator[Quart]:
    async with running(config) as app:
        yield app


@pytest.fixture
def client(app: Quart) -> Client:
    return app.test_client()


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The fault tests' figures as one table at the end of the run (CI's log)."""
    if lines := figures_table():
        terminalreporter.section("fault figures")
        for line in lines:
            terminalreporter.write_line(line)
