"""The command line, ``python -m taskflow``: migrate the database, and serve
the API (``run`` for one machine, ``serve`` for the Procfile's web process)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig
from hypercorn.config import Config as HypercornConfig

from . import logs, supervisor
from .config import Config, ConfigError

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> AlembicConfig:
    return AlembicConfig(str(PROJECT_ROOT / "alembic.ini"))


def migrate() -> None:
    command.upgrade(alembic_config(), "head")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="migrate the database, then serve the API")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    commands.add_parser("migrate", help="bring the database schema up to date")
    serve = commands.add_parser(
        "serve", help="serve as the Procfile's web process: taskflow/hypercorn_config.py"
    )
    serve.add_argument("--bind", help="instead of the settings file's 0.0.0.0:$PORT")
    serve.add_argument("--workers", type=int, help="instead of $WEB_CONCURRENCY")
    serve.add_argument("--graceful-timeout", type=float, help="instead of 20 s")
    args = parser.parse_args(argv)

    if args.command == "serve":
        settings = supervisor.settings(args.bind, args.workers)
        if args.graceful_timeout is not None:
            settings.graceful_timeout = args.graceful_timeout
        raise SystemExit(start(settings))
    migrate()
    if args.command == "run":
        settings = supervisor.settings(f"{args.host}:{args.port}", workers=1)
        print(f"TaskFlow listening on http://{args.host}:{args.port} (docs at /docs)", flush=True)
        raise SystemExit(start(settings))


def start(settings: HypercornConfig) -> int:
    """Serve, once the configuration is known to be usable: a bad one is
    reported here, once, rather than by every worker."""
    logs.configure_logging(Config.setting("log_level"))
    try:
        Config.from_env()
    except ConfigError as error:
        logging.getLogger("taskflow").critical("configuration error: %s", error)
        return 2
    return supervisor.serve(settings)
