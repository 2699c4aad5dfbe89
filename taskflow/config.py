"""Configuration, read once from the environment into a typed object."""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

MIN_SECRET_BYTES = 32
# A file's name, not a secret.
SECRET_FILE_NAME = "secret_key"  # noqa: S105  # nosec B105
EMBEDDED_DATABASE_NAME = "taskflow.sqlite3"


class ConfigError(Exception):
    """The environment does not describe a configuration TaskFlow can run with."""


@dataclass(frozen=True)
class Config:
    database_url: str
    redis_url: str | None
    secret_key: str
    port: int = 8000
    trusted_proxy_hops: int = 0
    bcrypt_rounds: int = 12
    log_level: str = "INFO"
    # Default limit for every route, per user when authenticated, else per address.
    rate_limit_per_minute: int = 600
    # Login and registration, per address and per email.
    auth_rate_limit_per_minute: int = 10
    rate_limit_enabled: bool = True
    # WebSocket: new connections per user, and messages per connection.
    ws_connections_per_minute: int = 60
    ws_messages_per_second: int = 20
    # Frames waiting for one slow client before it is dropped.
    ws_send_queue: int = 1024
    database_pool_size: int = 10
    # Authorization lookups and tasks cached in Redis (for comparisons; see cache.py).
    cache_enabled: bool = True

    @property
    def is_sqlite(self) -> bool:
        return make_url(self.database_url).get_backend_name() == "sqlite"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from environment variables.

        With no ``DATABASE_URL`` the app runs on the embedded default: a SQLite
        file in ``TASKFLOW_INSTANCE_DIR`` (``./instance``) and a secret key
        generated once and kept beside it.
        """
        env = os.environ if environ is None else environ
        raw_database_url = env.get("DATABASE_URL", "").strip()
        secret_key = env.get("TASKFLOW_SECRET_KEY", "")
        if raw_database_url:
            database_url = normalize_database_url(raw_database_url)
            if not secret_key:
                raise ConfigError("TASKFLOW_SECRET_KEY must be set when DATABASE_URL is set.")
        else:
            instance_dir = Path(env.get("TASKFLOW_INSTANCE_DIR", "instance")).resolve()
            instance_dir.mkdir(parents=True, exist_ok=True)
            database_url = URL.create(
                "sqlite+aiosqlite", database=str(instance_dir / EMBEDDED_DATABASE_NAME)
            ).render_as_string()
            secret_key = secret_key or load_or_create_secret(instance_dir / SECRET_FILE_NAME)
        if len(secret_key.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"TASKFLOW_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes.")

        raw_redis_url = env.get("REDIS_URL", "").strip()
        return cls(
            database_url=database_url,
            redis_url=normalize_redis_url(raw_redis_url) if raw_redis_url else None,
            secret_key=secret_key,
            port=_int(env, "PORT", 8000, minimum=1, maximum=65535),
            trusted_proxy_hops=_int(env, "TASKFLOW_TRUSTED_PROXY_HOPS", 0, minimum=0),
            bcrypt_rounds=_int(env, "TASKFLOW_BCRYPT_ROUNDS", 12, minimum=4, maximum=31),
            log_level=env.get("TASKFLOW_LOG_LEVEL", "INFO").upper(),
            rate_limit_per_minute=_int(env, "TASKFLOW_RATE_LIMIT_PER_MINUTE", 600, minimum=1),
            auth_rate_limit_per_minute=_int(
                env, "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE", 10, minimum=1
            ),
            rate_limit_enabled=_bool(env, "TASKFLOW_RATE_LIMIT_ENABLED", True),
            ws_connections_per_minute=_int(
                env, "TASKFLOW_WS_CONNECTIONS_PER_MINUTE", 60, minimum=1
            ),
            ws_messages_per_second=_int(env, "TASKFLOW_WS_MESSAGES_PER_SECOND", 20, minimum=1),
            ws_send_queue=_int(env, "TASKFLOW_WS_SEND_QUEUE", 1024, minimum=1),
            database_pool_size=_int(env, "TASKFLOW_DATABASE_POOL_SIZE", 10, minimum=1),
            cache_enabled=_bool(env, "TASKFLOW_CACHE_ENABLED", True),
        )


def normalize_database_url(raw: str) -> str:
    """Turn any URL a PaaS hands out into one SQLAlchemy's async drivers accept.

    ``postgres://`` and ``postgresql://`` (with any sync driver) become
    ``postgresql+asyncpg://``; libpq's ``sslmode`` becomes asyncpg's ``ssl``.
    ``sqlite://`` becomes ``sqlite+aiosqlite://``.
    """
    try:
        url = make_url(raw)
    except Exception as error:  # SQLAlchemy raises ArgumentError, ValueError…
        raise ConfigError("DATABASE_URL is not a valid database URL.") from error
    backend = url.get_backend_name()
    if backend in ("postgres", "postgresql"):
        query = dict(url.query)
        if "sslmode" in query:
            query["ssl"] = query.pop("sslmode")
        url = url.set(drivername="postgresql+asyncpg", query=query)
    elif backend == "sqlite":
        url = url.set(drivername="sqlite+aiosqlite")
    else:
        raise ConfigError(f"DATABASE_URL: unsupported database {backend!r}.")
    return url.render_as_string(hide_password=False)


def normalize_redis_url(raw: str) -> str:
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError("REDIS_URL must start with redis://, rediss:// or unix://.")
    return raw


def load_or_create_secret(path: Path) -> str:
    """Read the embedded default's secret, creating it (mode 0600) on first use."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path.read_text().strip()
    with os.fdopen(fd, "w") as file:
        secret = secrets.token_urlsafe(48)
        file.write(secret)
    return secret


def _int(
    env: Mapping[str, str], name: str, default: int, minimum: int, maximum: int | None = None
) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    if value < minimum or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum or 'any'}.")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}.")
