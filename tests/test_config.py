import os
import stat
from pathlib import Path

import pytest

from taskflow import create_app
from taskflow.config import Config, ConfigError, normalize_database_url

SECRET = "s" * 32


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("postgres://u:p@db.example:5432/app", "postgresql+asyncpg://u:p@db.example:5432/app"),
        ("postgresql://u:p@db.example/app", "postgresql+asyncpg://u:p@db.example/app"),
        ("postgresql+psycopg2://u@h/app", "postgresql+asyncpg://u@h/app"),
        ("postgresql+asyncpg://u@h/app", "postgresql+asyncpg://u@h/app"),
        ("postgres://u:p@h/app?sslmode=require", "postgresql+asyncpg://u:p@h/app?ssl=require"),
        ("postgres://u@h/app?sslmode=verify-full", "postgresql+asyncpg://u@h/app?ssl=verify-full"),
        ("sqlite:///data/tf.db", "sqlite+aiosqlite:///data/tf.db"),
    ],
)
def test_database_url_forms_a_paas_hands_out(given: str, expected: str) -> None:
    assert normalize_database_url(given) == expected


@pytest.mark.parametrize("given", ["mysql://u@h/db", "not a url", "://"])
def test_unsupported_database_url_is_refused(given: str) -> None:
    with pytest.raises(ConfigError):
        normalize_database_url(given)


def test_database_url_requires_a_secret() -> None:
    with pytest.raises(ConfigError, match="TASKFLOW_SECRET_KEY"):
        Config.from_env({"DATABASE_URL": "postgres://u@h/app"})


def test_short_secret_is_refused_even_on_the_embedded_default(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="32 bytes"):
        Config.from_env({"TASKFLOW_INSTANCE_DIR": str(tmp_path), "TASKFLOW_SECRET_KEY": "short"})
    with pytest.raises(ConfigError, match="32 bytes"):
        Config.from_env({"DATABASE_URL": "postgres://u@h/app", "TASKFLOW_SECRET_KEY": "x" * 31})


def test_full_configuration_from_the_environment() -> None:
    config = Config.from_env(
        {
            "DATABASE_URL": "postgres://u:p@h:5433/app?sslmode=require",
            "REDIS_URL": "rediss://:pw@cache.example:6380/0",
            "TASKFLOW_SECRET_KEY": SECRET,
            "PORT": "5000",
            "TASKFLOW_TRUSTED_PROXY_HOPS": "1",
            "TASKFLOW_BCRYPT_ROUNDS": "10",
        }
    )
    assert config.database_url == "postgresql+asyncpg://u:p@h:5433/app?ssl=require"
    assert config.redis_url == "rediss://:pw@cache.example:6380/0"
    assert config.secret_key == SECRET
    assert (config.port, config.trusted_proxy_hops, config.bcrypt_rounds) == (5000, 1, 10)
    assert not config.database_url.startswith("sqlite")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PORT", "http"),
        ("PORT", "70000"),
        ("TASKFLOW_TRUSTED_PROXY_HOPS", "-1"),
        ("TASKFLOW_BCRYPT_ROUNDS", "3"),
        ("REDIS_URL", "http://cache"),
        ("TASKFLOW_RATE_LIMIT_ENABLED", "maybe"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com/"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com/app"),
        ("TASKFLOW_CORS_ORIGINS", "app.example.com"),
        ("TASKFLOW_CORS_ORIGINS", "*"),
        ("TASKFLOW_CORS_ORIGINS", "null"),
        ("TASKFLOW_CORS_ORIGINS", "https://*.example.com"),
        ("TASKFLOW_CORS_ORIGINS", "https://user@app.example.com"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com?x=1"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com:0"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com:99999"),
        ("TASKFLOW_CORS_ORIGINS", "https://app.example.com https://other.example"),
        ("TASKFLOW_CORS_ORIGINS", "https://ok.example,ftp//bad"),
        ("TASKFLOW_WEBHOOK_ALLOW_PRIVATE", "sometimes"),
        ("TASKFLOW_WEBHOOK_CONCURRENCY", "-1"),
        ("TASKFLOW_WEBHOOK_CONCURRENCY", "257"),
        ("TASKFLOW_WEBHOOK_CONCURRENCY", "eight"),
    ],
)
def test_bad_values_are_refused_with_the_variable_named(
    tmp_path: Path, name: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=name):
        Config.from_env({"TASKFLOW_INSTANCE_DIR": str(tmp_path), name: value})


def test_embedded_default_keeps_a_generated_secret_beside_the_database(tmp_path: Path) -> None:
    first = Config.from_env({"TASKFLOW_INSTANCE_DIR": str(tmp_path)})
    assert first.database_url.startswith("sqlite")
    assert first.redis_url is None
    assert first.database_url.startswith("sqlite+aiosqlite:///")
    assert first.database_url.endswith(str(tmp_path / "taskflow.sqlite3"))
    secret_file = tmp_path / "secret_key"
    assert stat.S_IMODE(secret_file.stat().st_mode) == 0o600
    assert len(first.secret_key) >= 32
    # The secret survives a restart, so tokens issued before it stay valid.
    assert Config.from_env({"TASKFLOW_INSTANCE_DIR": str(tmp_path)}).secret_key == first.secret_key
    assert Config.from_env({"TASKFLOW_INSTANCE_DIR": str(tmp_path / "other")}).secret_key != (
        first.secret_key
    )


def test_create_app_reads_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("DATABASE_URL", "REDIS_URL", "TASKFLOW_SECRET_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TASKFLOW_INSTANCE_DIR", str(tmp_path))
    app = create_app()
    assert app.config["TASKFLOW"].database_url.startswith("sqlite")
    assert (tmp_path / "secret_key").exists()

    monkeypatch.setenv("DATABASE_URL", "postgres://u@h/app")
    with pytest.raises(ConfigError):
        create_app()
    assert os.environ["DATABASE_URL"]


def test_the_embedded_database_is_private(tmp_path: Path) -> None:
    instance = tmp_path / "instance"
    Config.from_env({"TASKFLOW_INSTANCE_DIR": str(instance)})
    assert stat.S_IMODE(instance.stat().st_mode) == 0o700
    assert stat.S_IMODE((instance / "taskflow.sqlite3").stat().st_mode) == 0o600
    # A directory given that exists keeps its mode; the database file is private still.
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o755)
    Config.from_env({"TASKFLOW_INSTANCE_DIR": str(shared)})
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755
    assert stat.S_IMODE((shared / "taskflow.sqlite3").stat().st_mode) == 0o600


def test_database_connection_pool_url_turns_the_pgbouncer_mode_on() -> None:
    environ = {
        "DATABASE_URL": "postgres://app@db.internal:5432/app",
        "DATABASE_CONNECTION_POOL_URL": "postgres://app@pool.internal:5433/app",
        "TASKFLOW_SECRET_KEY": "s" * 40,
    }
    config = Config.from_env(environ)
    assert config.database_pgbouncer is True
    assert config.database_url == "postgresql+asyncpg://app@pool.internal:5433/app"
    direct = Config.from_env({**environ, "DATABASE_CONNECTION_POOL_URL": ""})
    assert direct.database_pgbouncer is False
    assert direct.database_url == "postgresql+asyncpg://app@db.internal:5432/app"


def test_cors_origins_are_read_as_a_browser_writes_them(tmp_path: Path) -> None:
    instance = {"TASKFLOW_INSTANCE_DIR": str(tmp_path)}
    assert Config.from_env(instance).cors_origins == ()
    config = Config.from_env(
        {
            **instance,
            "TASKFLOW_CORS_ORIGINS": " https://App.Example.com:443, http://localhost:3000,,"
            "http://127.0.0.1:80, https://app.example.com, http://[::1]:8080,"
            "capacitor://localhost",
        }
    )
    assert config.cors_origins == (
        "https://app.example.com",
        "http://localhost:3000",
        "http://127.0.0.1",
        "http://[::1]:8080",
        "capacitor://localhost",
    )


def test_webhook_settings(tmp_path: Path) -> None:
    instance = {"TASKFLOW_INSTANCE_DIR": str(tmp_path)}
    default = Config.from_env(instance)
    assert (default.webhook_allow_private, default.webhook_concurrency) == (False, 8)
    config = Config.from_env(
        {
            **instance,
            "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "true",
            "TASKFLOW_WEBHOOK_CONCURRENCY": "0",  # this process delivers none
        }
    )
    assert (config.webhook_allow_private, config.webhook_concurrency) == (True, 0)
