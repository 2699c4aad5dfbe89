"""Configuration, read once from the environment into a typed object.

Each tunable setting is declared once, as a field of ``Config`` that names its
environment variable, its default and its bounds; ``from_env`` reads them all.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import URL, make_url

MIN_SECRET_BYTES = 32
# A file's name, not a secret.
SECRET_FILE_NAME = "secret_key"  # noqa: S105  # nosec B105
EMBEDDED_DATABASE_NAME = "taskflow.sqlite3"
POOLED_DATABASE_URL = "DATABASE_CONNECTION_POOL_URL"


class ConfigError(Exception):
    """The environment does not describe a configuration TaskFlow can run with."""


def setting(
    env: str,
    default: Any,
    minimum: int | None = None,
    maximum: int | None = None,
    parse: Callable[[str, str], Any] | None = None,
) -> Any:
    """A field of ``Config`` read from the environment variable *env*; *parse*
    turns a value that is neither a number nor a boolean into the field's
    (given the variable's name and its text, it raises ``ConfigError``)."""
    bounds = {"env": env, "minimum": minimum, "maximum": maximum, "parse": parse}
    return dataclasses.field(default=default, metadata=bounds)


# An origin as a browser writes it in ``Origin``: scheme, host, optional port.
ORIGIN = re.compile(
    r"(?P<scheme>[a-z][a-z0-9+.-]*)://"
    r"(?P<host>[a-z0-9-]+(?:\.[a-z0-9-]+)*|\[[0-9a-f:.]+\])"
    r"(?::(?P<port>[0-9]{1,5}))?"
)
DEFAULT_PORTS = {"http": 80, "https": 443}


def parse_origins(name: str, raw: str) -> tuple[str, ...]:
    """Comma-separated origins (``https://app.example.com``), each written as
    a browser sends it: lower case, no default port (``:443`` is dropped), and
    no path, not even ``/``, since an entry a browser never sends would
    silently allow nothing."""
    origins: list[str] = []
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        match = ORIGIN.fullmatch(entry.lower())
        port = int(match["port"]) if match and match["port"] else None
        if match is None or (port is not None and not 1 <= port <= 65535):
            raise ConfigError(
                f"{name}: {entry!r} is not an origin such as https://app.example.com "
                "(scheme, host and optional port; no path, not even a trailing /)."
            )
        origin = f"{match['scheme']}://{match['host']}"
        if port is not None and DEFAULT_PORTS.get(match["scheme"]) != port:
            origin += f":{port}"
        if origin not in origins:
            origins.append(origin)
    return tuple(origins)


@dataclass(frozen=True)
class Config:
    database_url: str
    redis_url: str | None
    secret_key: str
    port: int = setting("PORT", 8000, minimum=1, maximum=65535)
    trusted_proxy_hops: int = setting("TASKFLOW_TRUSTED_PROXY_HOPS", 0, minimum=0)
    # Origins whose pages may call the API from a browser (see cors.py).
    cors_origins: tuple[str, ...] = setting("TASKFLOW_CORS_ORIGINS", (), parse=parse_origins)
    # IPv6 clients are limited per network of this prefix (one holds a whole /64).
    ipv6_prefix_length: int = setting("TASKFLOW_IPV6_PREFIX_LENGTH", 64, minimum=32, maximum=128)
    bcrypt_rounds: int = setting("TASKFLOW_BCRYPT_ROUNDS", 12, minimum=4, maximum=31)
    log_level: str = setting("TASKFLOW_LOG_LEVEL", "INFO")
    # Default limit for every route, per user when authenticated, else per address.
    rate_limit_per_minute: int = setting("TASKFLOW_RATE_LIMIT_PER_MINUTE", 600, minimum=1)
    # Login and registration, per address and per email.
    auth_rate_limit_per_minute: int = setting("TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE", 10, minimum=1)
    rate_limit_enabled: bool = setting("TASKFLOW_RATE_LIMIT_ENABLED", True)
    # WebSocket: new connections per user, and messages per connection.
    ws_connections_per_minute: int = setting("TASKFLOW_WS_CONNECTIONS_PER_MINUTE", 60, minimum=1)
    ws_messages_per_second: int = setting("TASKFLOW_WS_MESSAGES_PER_SECOND", 20, minimum=1)
    # WebSocket connections one user may hold open at once on one worker.
    ws_sockets_per_user: int = setting("TASKFLOW_WS_SOCKETS_PER_USER", 50, minimum=1)
    # Memory of frames waiting to be sent: to one client before it is dropped
    # as too slow, and to all the clients of one worker process.
    ws_send_buffer_bytes: int = setting(
        "TASKFLOW_WS_SEND_BUFFER_BYTES", 1024 * 1024, minimum=64 * 1024
    )
    ws_worker_buffer_bytes: int = setting(
        "TASKFLOW_WS_WORKER_BUFFER_BYTES", 64 * 1024 * 1024, minimum=1024 * 1024
    )
    # permessage-deflate for WebSocket clients that offer it (hypercorn's own
    # behaviour): frames ~3.7x smaller, worker CPU per delivery ~2-3x (see
    # ws_compression.py).
    ws_compression: bool = setting("TASKFLOW_WS_COMPRESSION", False)
    database_pool_size: int = setting("TASKFLOW_DATABASE_POOL_SIZE", 10, minimum=1)
    # Deadlines on the database: a request waits this long for a pooled
    # connection, for a lock, and for a statement, then answers 503.
    database_pool_timeout_ms: int = setting(
        "TASKFLOW_DATABASE_POOL_TIMEOUT_MS", 2000, minimum=100, maximum=60_000
    )
    database_lock_timeout_ms: int = setting(
        "TASKFLOW_DATABASE_LOCK_TIMEOUT_MS", 1000, minimum=50, maximum=60_000
    )
    database_statement_timeout_ms: int = setting(
        "TASKFLOW_DATABASE_STATEMENT_TIMEOUT_MS", 3000, minimum=100, maximum=600_000
    )
    # The release phase's migrations: how long each waits for a lock before it
    # gives up and tries again (shorter than the lock timeout above, so that
    # requests queued behind a migration never time out because of it), and
    # for how long it keeps trying.
    migration_lock_timeout_ms: int = setting(
        "TASKFLOW_MIGRATION_LOCK_TIMEOUT_MS", 500, minimum=50, maximum=60_000
    )
    migration_retry_seconds: int = setting(
        "TASKFLOW_MIGRATION_RETRY_SECONDS", 300, minimum=0, maximum=3600
    )
    # PostgreSQL through PgBouncer in transaction mode: no prepared statements
    # kept across transactions, no session settings at connect (set on the role).
    database_pgbouncer: bool = setting("TASKFLOW_DATABASE_PGBOUNCER", False)
    # Redis over TLS (rediss://): the CA bundle to trust instead of the
    # system's, or no certificate verification at all (Heroku Redis presents
    # self-signed certificates and asks for this).
    redis_tls_ca_file: str = setting("TASKFLOW_REDIS_TLS_CA_FILE", "")
    redis_tls_verify: bool = setting("TASKFLOW_REDIS_TLS_VERIFY", True)
    # Every Redis call's deadline, and how long every caller then leaves Redis
    # alone (see redis_gate.py).
    redis_timeout_ms: int = setting("TASKFLOW_REDIS_TIMEOUT_MS", 250, minimum=10, maximum=10_000)
    redis_backoff_ms: int = setting("TASKFLOW_REDIS_BACKOFF_MS", 1000, minimum=10, maximum=60_000)
    # Authorization lookups and tasks cached in Redis (for comparisons; see cache.py).
    cache_enabled: bool = setting("TASKFLOW_CACHE_ENABLED", True)
    # Webhooks: `http://` URLs and private, loopback or link-local addresses
    # allowed (deliveries inside one's own network, and tests); and how many
    # deliveries one process runs at once, so that slow receivers cannot take
    # what requests need (0: this process delivers none).
    webhook_allow_private: bool = setting("TASKFLOW_WEBHOOK_ALLOW_PRIVATE", False)
    webhook_concurrency: int = setting("TASKFLOW_WEBHOOK_CONCURRENCY", 8, minimum=0, maximum=256)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Build the configuration from environment variables.

        With no ``DATABASE_URL`` the app runs on the embedded default: a SQLite
        file in ``TASKFLOW_INSTANCE_DIR`` (``./instance``) and a secret key
        generated once and kept beside it.
        """
        env = os.environ if environ is None else environ
        # Heroku's connection pooling (PgBouncer in transaction mode) is a URL
        # of its own; the app serves through it, the release phase's
        # migrations keep DATABASE_URL.
        pooled_url = env.get(POOLED_DATABASE_URL, "").strip()
        raw_database_url = pooled_url or env.get("DATABASE_URL", "").strip()
        secret_key = env.get("TASKFLOW_SECRET_KEY", "")
        if raw_database_url:
            database_url = normalize_database_url(raw_database_url)
            if not secret_key:
                raise ConfigError("TASKFLOW_SECRET_KEY must be set when DATABASE_URL is set.")
        else:
            instance_dir = Path(env.get("TASKFLOW_INSTANCE_DIR", "instance")).resolve()
            # Private: the database holds password hashes. (A directory that
            # exists already keeps its mode; the database file is still private.)
            instance_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            database_path = instance_dir / EMBEDDED_DATABASE_NAME
            create_private_file(database_path)
            database_url = URL.create(
                "sqlite+aiosqlite", database=str(database_path)
            ).render_as_string()
            secret_key = secret_key or load_or_create_secret(instance_dir / SECRET_FILE_NAME)
        if len(secret_key.encode()) < MIN_SECRET_BYTES:
            raise ConfigError(f"TASKFLOW_SECRET_KEY must be at least {MIN_SECRET_BYTES} bytes.")

        raw_redis_url = env.get("REDIS_URL", "").strip()
        settings = {
            field.name: _read(env, field)
            for field in dataclasses.fields(cls)
            if "env" in field.metadata
        }
        if pooled_url:
            settings["database_pgbouncer"] = True
        ca_file = settings["redis_tls_ca_file"]
        if ca_file and not Path(ca_file).is_file():
            raise ConfigError(f"TASKFLOW_REDIS_TLS_CA_FILE: no such file {ca_file!r}.")
        return cls(
            database_url=database_url,
            redis_url=normalize_redis_url(raw_redis_url) if raw_redis_url else None,
            secret_key=secret_key,
            **settings,
        )

    @classmethod
    def setting(cls, name: str, environ: Mapping[str, str] | None = None) -> Any:
        """One setting, read from the environment alone (for tools such as the
        migrations, which need no secret key)."""
        field = next(field for field in dataclasses.fields(cls) if field.name == name)
        return _read(os.environ if environ is None else environ, field)


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


def create_private_file(path: Path) -> None:
    """Create *path* empty with mode 0600 unless it exists. SQLite creates its
    -wal and -shm files with the database file's mode."""
    with contextlib.suppress(FileExistsError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


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


def _read(env: Mapping[str, str], field: dataclasses.Field[Any]) -> Any:
    name, default = field.metadata["env"], field.default
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if field.metadata["parse"] is not None:
        return field.metadata["parse"](name, raw)
    if isinstance(default, bool):
        return _bool(name, raw)
    if isinstance(default, int):
        return _int(name, raw, field.metadata["minimum"], field.metadata["maximum"])
    return raw


def _int(name: str, raw: str, minimum: int | None, maximum: int | None) -> int:
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, not {raw!r}.") from None
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise ConfigError(f"{name} must be between {minimum} and {maximum or 'any'}.")
    return value


def _bool(name: str, raw: str) -> bool:
    if raw.lower() in ("1", "true", "yes", "on"):
        return True
    if raw.lower() in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, not {raw!r}.")
