"""The database and Redis connections, and the one transaction policy.

Each request gets one ``AsyncSession``, opened on first use. Data functions
take that session and never commit: the request commits once, after the view
returned a success, and rolls back otherwise. What must follow the commit
(publishing events, invalidating caches) is registered with ``after_commit``.

GET and HEAD never write, so on PostgreSQL their statements run outside a
transaction: under READ COMMITTED each statement sees its own snapshot either
way, and the BEGIN and COMMIT round trips are saved (not through PgBouncer in
transaction mode, which needs a transaction to keep a statement on one server
connection).
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import orjson
import redis.asyncio as aioredis
from quart import Quart, Response, current_app, g, request
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import AuthenticationError
from sqlalchemy import Executable, Result, Row, Select, event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from .broker import Broker, InProcessBroker, RedisBroker
from .config import Config, ConfigError
from .jsonio import dumps
from .redis_gate import RedisGate

EXTENSION_KEY = "taskflow.backends"

# Core selects and rows of any columns, for functions that build or read them.
AnySelect = Select[*tuple[Any, ...]]
AnyRow = Row[*tuple[Any, ...]]

CONNECT_TIMEOUT_SECONDS = 5.0
# The client's deadline on a database that does not answer at all: this much
# after the statement timeout, by which the server would have answered.
UNANSWERED_MARGIN_SECONDS = 1.0
# How long the start-up check waits for Redis (a Redis that is merely down is
# not a reason to stay down).
STARTUP_CHECK_SECONDS = 5.0
READ_METHODS = ("GET", "HEAD")  # they never write: nothing to commit

log = logging.getLogger(__name__)


@dataclass
class Backends:
    engine: AsyncEngine
    sessionmaker: async_sessionmaker[AsyncSession]
    read_sessionmaker: async_sessionmaker[AsyncSession]
    redis: RedisGate
    broker: Broker

    @classmethod
    def create(cls, config: Config) -> Backends:
        engine = create_engine(config)
        redis = RedisGate(
            create_redis(config.redis_url, config) if config.redis_url else None,
            deadline_seconds=config.redis_timeout_ms / 1000,
            backoff_seconds=config.redis_backoff_ms / 1000,
        )
        broker: Broker = RedisBroker(redis) if redis.configured else InProcessBroker()
        # Outside a transaction, PgBouncer in transaction mode may run a
        # statement's prepare and its execution on two server connections.
        read_engine = (
            engine.execution_options(isolation_level="AUTOCOMMIT")
            if engine.dialect.name == "postgresql" and not config.database_pgbouncer
            else engine
        )
        return cls(
            engine=engine,
            sessionmaker=async_sessionmaker(engine, expire_on_commit=False),
            read_sessionmaker=async_sessionmaker(read_engine, expire_on_commit=False),
            redis=redis,
            broker=broker,
        )

    async def close(self) -> None:
        await self.broker.close()
        await self.redis.close()
        await self.engine.dispose()


def _json_dumps(value: Any) -> str:
    return dumps(value).decode()


def create_redis(url: str, config: Config) -> aioredis.Redis:
    """The Redis client: no retries of its own, and no socket wait longer than
    a call's deadline (the gate bounds each call as a whole; this bounds the
    broker's subscription too)."""
    deadline = config.redis_timeout_ms / 1000
    tls: dict[str, Any] = {}
    if url.startswith("rediss://"):
        tls["ssl_cert_reqs"] = "required" if config.redis_tls_verify else "none"
        tls["ssl_check_hostname"] = config.redis_tls_verify
        if config.redis_tls_ca_file:
            tls["ssl_ca_certs"] = config.redis_tls_ca_file
    return aioredis.from_url(
        url,
        socket_timeout=deadline,
        socket_connect_timeout=deadline,
        retry=Retry(NoBackoff(), retries=0),
        health_check_interval=30,
        **tls,
    )


async def check_redis(gate: RedisGate, url: str | None) -> None:
    """At start-up: a configured Redis that can never work (its certificate
    refused, a TLS handshake with a server that speaks none, a wrong password)
    is a configuration error, not the degraded mode of a Redis that is down."""
    client = gate.client
    if client is None or url is None:
        return
    try:
        async with asyncio.timeout(STARTUP_CHECK_SECONDS):
            await client.ping()
    except Exception as error:
        problem = None
        if isinstance(error, AuthenticationError):
            problem = "Redis refused the credentials (wrong or missing password)."
        elif any(isinstance(cause, ssl.SSLError) for cause in causes(error)):
            problem = (
                f"the TLS connection to Redis failed ({error}). For a server with a "
                "self-signed certificate, set TASKFLOW_REDIS_TLS_CA_FILE to its CA bundle, "
                "or TASKFLOW_REDIS_TLS_VERIFY=false where the platform asks for it."
            )
        elif url.startswith("rediss://") and await speaks_plain_redis(url):
            problem = "rediss:// (TLS), but the server there speaks Redis without TLS."
        if problem is not None:
            log.critical("configuration error: REDIS_URL: %s", problem)
            raise ConfigError(f"REDIS_URL: {problem}") from None
        log.warning(
            "Redis does not answer at start-up (%s): serving without it until it does",
            type(error).__name__,
        )


async def speaks_plain_redis(url: str) -> bool:
    """Whether the server of a ``rediss://`` URL that did not finish a TLS
    handshake answers a plain PING (it would wait for the handshake forever)."""
    address = urlsplit(url)
    try:
        async with asyncio.timeout(STARTUP_CHECK_SECONDS):
            reader, writer = await asyncio.open_connection(address.hostname, address.port or 6379)
            try:
                writer.write(b"PING\r\n")
                await writer.drain()
                reply = await reader.read(1)
            finally:
                writer.close()
    except (OSError, TimeoutError):
        return False
    return reply in (b"+", b"-")  # +PONG, or -NOAUTH from a server with a password


def causes(error: BaseException) -> Iterator[BaseException]:
    """*error* and the exceptions it was raised from or during."""
    seen: BaseException | None = error
    while seen is not None:
        yield seen
        seen = seen.__cause__ or seen.__context__


def create_engine(config: Config) -> AsyncEngine:
    url = make_url(config.database_url)
    pool_timeout = config.database_pool_timeout_ms / 1000
    if url.get_backend_name() != "sqlite":
        connect_args: dict[str, Any] = {
            "timeout": CONNECT_TIMEOUT_SECONDS,
            # The client gives up on a server that does not answer at all.
            "command_timeout": config.database_statement_timeout_ms / 1000
            + UNANSWERED_MARGIN_SECONDS,
        }
        if config.database_pgbouncer:
            # Transaction pooling hands a different server connection to each
            # transaction: asyncpg's named prepared statements would be missing
            # or clash there, and startup parameters other than
            # application_name are refused (the timeouts are then the role's:
            # see README, "Scaling out").
            connect_args.update(
                statement_cache_size=0,
                prepared_statement_cache_size=0,
                prepared_statement_name_func=unique_statement_name,
                server_settings={"application_name": "taskflow"},
            )
        else:
            # The server ends a statement that runs, or waits for a lock, for
            # longer than these (a 503 for the request).
            connect_args["server_settings"] = {
                "application_name": "taskflow",
                "statement_timeout": str(config.database_statement_timeout_ms),
                "lock_timeout": str(config.database_lock_timeout_ms),
            }
        return create_async_engine(
            url,
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
            # Statement parameters (emails, password hashes) stay out of error messages and logs.
            hide_parameters=True,
            # A request waits for a pooled connection rather than opening a
            # short-lived one: connecting costs PostgreSQL a process and
            # asyncpg its type introspection, on every overflow.
            pool_size=config.database_pool_size,
            max_overflow=0,
            pool_timeout=pool_timeout,
            pool_recycle=1800,
            connect_args=connect_args,
        )
    engine = create_async_engine(
        url,
        json_serializer=_json_dumps,
        json_deserializer=orjson.loads,
        hide_parameters=True,
        pool_timeout=pool_timeout,
        connect_args={"timeout": config.database_statement_timeout_ms / 1000},
    )

    # SQLite: enforce foreign keys, and take the write lock when a transaction
    # begins so that two transactions never deadlock upgrading a read lock.
    # The whole database is one lock, which the app's own writes take in turn,
    # so a writer waits for it as long as a statement may run (the
    # connection's timeout, which sets SQLite's busy timeout).
    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def unique_statement_name() -> str:
    return f"__asyncpg_{uuid.uuid4().hex}__"


def backends() -> Backends:
    backends_: Backends = current_app.extensions[EXTENSION_KEY]
    return backends_


def session() -> AsyncSession:
    """The current request's session, opened on first use."""
    db_session: AsyncSession | None = g.get("db_session")
    if db_session is None:
        backends_ = backends()
        sessionmaker = (
            backends_.read_sessionmaker
            if request.method in READ_METHODS
            else backends_.sessionmaker
        )
        db_session = g.db_session = sessionmaker()
    return db_session


async def rows(
    db_session: AsyncSession, statement: Executable, params: dict[str, Any] | None = None
) -> Result[Any]:
    """Run a Core statement on the session's connection.

    For statements that select columns rather than ORM entities: their rows
    skip the ORM's result machinery (a tenth of a task page's CPU).
    """
    connection = await db_session.connection()
    return await connection.execute(statement, params)


def after_commit(
    db_session: AsyncSession, callback: Callable[..., Awaitable[None]], *args: Any
) -> None:
    """Run ``callback(*args)`` once this transaction has committed (publishing
    an event, invalidating a cache); never if it rolls back."""
    db_session.info.setdefault("after_commit", []).append((callback, args))


async def roll_back(db_session: AsyncSession) -> None:
    """Undo this transaction's writes, and forget what was to follow their commit."""
    await db_session.rollback()
    db_session.info.pop("after_commit", None)


def commit_even_if_refused(db_session: AsyncSession) -> None:
    """Keep this transaction's writes although the request ends in an error.

    For the rare write that is the refusal itself, such as revoking a session
    whose spent refresh token was presented again.
    """
    db_session.info["commit_even_if_refused"] = True


async def finish_request(response: Response) -> Response:
    """Commit the request's work if the response is a success, else roll it back."""
    db_session: AsyncSession | None = g.pop("db_session", None)
    if db_session is None:
        return response
    try:
        if request.method in READ_METHODS:
            return response  # nothing to commit: closing is all a read needs
        if response.status_code < 400 or db_session.info.get("commit_even_if_refused"):
            await db_session.commit()
            for callback, args in db_session.info.get("after_commit", ()):
                await callback(*args)
        else:
            await roll_back(db_session)
    finally:
        await db_session.close()
    return response


async def close_request_session(_error: BaseException | None) -> None:
    db_session: AsyncSession | None = g.pop("db_session", None)
    if db_session is not None:
        await db_session.close()


def init_app(app: Quart, config: Config) -> None:
    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        backends_ = app.extensions[EXTENSION_KEY] = Backends.create(config)
        await check_redis(backends_.redis, config.redis_url)
        await backends_.broker.start()
        yield
        await app.extensions.pop(EXTENSION_KEY).close()

    app.after_request(finish_request)
    app.teardown_request(close_request_session)
