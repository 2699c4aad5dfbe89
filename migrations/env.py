"""Alembic's environment: async, on the same database configuration as the app."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import random
import time
from logging.config import fileConfig

from alembic import context
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import create_async_engine
from sqlalchemy.pool import NullPool

from taskflow.config import Config, normalize_database_url
from taskflow.errors import LOCK_NOT_AVAILABLE
from taskflow.models import Base

EXPRESSION_INDEXES = {"ix_tasks_search"}
MAX_PAUSE_SECONDS = 15

log = logging.getLogger("alembic.env")

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
        # Each migration commits on its own, so a retry goes on from the last
        # one that got its locks.
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_async_migrations() -> None:
    """Run the migrations; on PostgreSQL, never queue live traffic behind them.

    A statement such as ALTER TABLE waits for its lock at the head of the
    table's queue, and every query of the table waits behind it. So each
    migration waits for a lock only briefly (``TASKFLOW_MIGRATION_LOCK_TIMEOUT_MS``,
    shorter than the app's own lock timeout, so that the queries that queued
    behind it still get their locks), gives up, and is tried again after a
    growing pause, for up to ``TASKFLOW_MIGRATION_RETRY_SECONDS``.
    """
    url = database_url()
    lock_timeout_ms = Config.setting("migration_lock_timeout_ms")
    give_up_at = time.monotonic() + Config.setting("migration_retry_seconds")
    on_postgres = make_url(url).get_backend_name() == "postgresql"
    connect_args = (
        {"server_settings": {"lock_timeout": str(lock_timeout_ms)}} if on_postgres else {}
    )
    engine = create_async_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        for attempt in itertools.count(1):
            try:
                async with engine.connect() as connection:
                    await connection.run_sync(run_migrations)
                return
            except DBAPIError as error:
                pause = min(2 ** (attempt - 1), MAX_PAUSE_SECONDS) * random.uniform(0.5, 1)  # noqa: S311  # nosec B311
                sqlstate = getattr(error.orig, "sqlstate", None)
                if sqlstate != LOCK_NOT_AVAILABLE or time.monotonic() + pause > give_up_at:
                    raise
                log.warning(
                    "a migration waited %d ms for a lock and gave way to live traffic; "
                    "attempt %d again in %.1f s",
                    lock_timeout_ms,
                    attempt + 1,
                    pause,
                )
                await asyncio.sleep(pause)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    context.configure(url=database_url(), target_metadata=Base.metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    asyncio.run(run_async_migrations())
