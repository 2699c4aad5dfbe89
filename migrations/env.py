"""Alembic's environment: async, on the same database configuration as the app."""

from __future__ import annotations

import asyncio
import os
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from taskflow.config import Config, normalize_database_url
from taskflow.models import Base

EXPRESSION_INDEXES = {"ix_tasks_search"}

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)


def database_url() -> str:
    """The URL the caller passed in, else DATABASE_URL, else the embedded default."""
    url: str | None = config.attributes.get("database_url")
    if url:
        return url
    raw = os.environ.get("DATABASE_URL", "").strip()
    return normalize_database_url(raw) if raw else Config.from_env().database_url


def include_object(obj: object, name: str | None, type_: str, *_: object) -> bool:
    # Alembic cannot compare expression indexes (PostgreSQL rewrites their
    # text), so autogenerate leaves them to the migrations written by hand.
    return not (type_ == "index" and name in EXPRESSION_INDEXES)


def run_migrations(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
        include_object=include_object,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    engine = create_async_engine(database_url(), poolclass=NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(run_migrations)
    await engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async_migrations())
