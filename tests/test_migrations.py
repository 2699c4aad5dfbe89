"""The migrations create exactly the models, go down and up again cleanly, and
never queue live traffic behind their locks."""

import asyncio
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from taskflow.cli import alembic_config
from taskflow.models import Base

from .support import (
    ON_POSTGRES,
    PROJECT_ROOT,
    TEST_SECRET,
    create_postgres_database,
    drop_postgres_database,
    hypercorn,
    postgres_only,
    register_user,
)


@pytest.fixture
def empty_database(tmp_path: Path) -> Iterator[str]:
    if ON_POSTGRES:
        url = create_postgres_database()
        yield url
        drop_postgres_database(url)
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'migrations.sqlite3'}"


def alembic_for(url: str) -> AlembicConfig:
    config = alembic_config()
    config.attributes["database_url"] = url
    config.attributes["configure_logger"] = False
    return config


def table_names(url: str) -> set[str]:
    async def inspect_tables() -> set[str]:
        engine = create_async_engine(url)
        async with engine.connect() as connection:
            names = await connection.run_sync(lambda sync: inspect(sync).get_table_names())
        await engine.dispose()
        return set(names) - {"alembic_version"}

    return asyncio.run(inspect_tables())


def test_upgrade_downgrade_upgrade_and_no_drift(empty_database: str) -> None:
    config = alembic_for(empty_database)
    command.upgrade(config, "head")
    command.check(config)  # raises when the models and the migrations disagree
    assert table_names(empty_database) == set(Base.metadata.tables)
    command.downgrade(config, "base")
    assert table_names(empty_database) == set()
    command.upgrade(config, "head")
    command.check(config)


def test_single_head() -> None:
    from alembic.script import ScriptDirectory

    assert len(ScriptDirectory.from_config(alembic_config()).get_heads()) == 1


def test_models_cover_every_table_of_the_contract() -> None:
    assert set(Base.metadata.tables) == {
        "users",
        "auth_sessions",
        "projects",
        "project_members",
        "tasks",
        "events",
        "idempotency_keys",
        "api_tokens",
        "webhooks",
        "webhook_deliveries",
    }


# A migration in the release phase while the app serves. The Procfile's
# `release:` command; an admin's open transaction has read the table the
# migration alters; the app's requests read that table on every call (no Redis:
# each session check is a query of auth_sessions).
ADMIN_HOLDS_SECONDS = 4.0
MIGRATION_LOCK_TIMEOUT_MS = 300
# A request queued behind the waiting ALTER TABLE is held up for at most the
# migration's lock timeout; the app's own lock timeout (1 s) is never reached.
LIVE_REQUEST_BOUND_SECONDS = 0.8


@postgres_only
async def test_release_migrations_give_way_to_live_traffic(empty_database: str) -> None:
    config = alembic_for(empty_database)
    await asyncio.to_thread(command.upgrade, config, "head")
    environ = {"DATABASE_URL": empty_database, "TASKFLOW_SECRET_KEY": TEST_SECRET}
    async with hypercorn(environ, empty_database=False) as (url, _process):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            headers = (await register_user(http)).headers
            # The release before this one: 0003 not applied yet.
            await asyncio.to_thread(command.downgrade, config, "0002")

            admin = await asyncpg.connect(asyncpg_dsn(empty_database))
            admin_transaction = admin.transaction()
            await admin_transaction.start()
            await admin.fetch("SELECT 1 FROM auth_sessions LIMIT 1")
            release = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "alembic", "upgrade", "head",
                cwd=PROJECT_ROOT,
                env={
                    **os.environ,
                    **environ,
                    "TASKFLOW_MIGRATION_LOCK_TIMEOUT_MS": str(MIGRATION_LOCK_TIMEOUT_MS),
                },
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            )  # fmt: skip
            latencies: list[float] = []
            statuses: list[int] = []
            admin_done = time.monotonic() + ADMIN_HOLDS_SECONDS
            while time.monotonic() < admin_done:
                started = time.monotonic()
                response = await http.get("/auth/me", headers=headers)
                latencies.append(time.monotonic() - started)
                statuses.append(response.status_code)
                await asyncio.sleep(0.02)
            await admin_transaction.rollback()
            await admin.close()
            output, _ = await asyncio.wait_for(release.communicate(), 60)
            after = await http.get("/auth/me", headers=headers)

    log = output.decode()
    latencies.sort()
    print(
        f"\nrelease migration vs live traffic: {len(statuses)} requests, "
        f"p50 {latencies[len(latencies) // 2] * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms, "
        f"retries {log.count('gave way to live traffic')}"
    )
    assert release.returncode == 0, log
    assert "gave way to live traffic" in log  # it did wait, gave up, and tried again
    assert set(statuses) == {200}
    assert latencies[-1] < LIVE_REQUEST_BOUND_SECONDS
    assert after.status_code == 200
    assert "refreshed_at" in await column_names(empty_database, "auth_sessions")


def asyncpg_dsn(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


async def column_names(url: str, table: str) -> set[str]:
    engine = create_async_engine(url)
    async with engine.connect() as connection:
        columns = await connection.run_sync(lambda sync: inspect(sync).get_columns(table))
    await engine.dispose()
    return {column["name"] for column in columns}
