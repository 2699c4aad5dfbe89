"""The migrations create exactly the models, and go down and up again cleanly."""

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import inspect
from sqlalchemy.ext.asyncio import create_async_engine

from taskflow.cli import alembic_config
from taskflow.models import Base

from .support import ON_POSTGRES, create_postgres_database, drop_postgres_database


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
    }
