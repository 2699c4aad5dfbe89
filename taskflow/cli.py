"""The ``taskflow`` command: migrate the database and serve the API."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> AlembicConfig:
    return AlembicConfig(str(PROJECT_ROOT / "alembic.ini"))


def migrate() -> None:
    command.upgrade(alembic_config(), "head")


def serve(host: str, port: int) -> None:
    """Serve as the Procfile does: hypercorn, with a worker process of its own
    that closes its sockets on SIGTERM (see ``ws.init_app``)."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.run import run

    config = HypercornConfig.from_object("taskflow.hypercorn_config")
    config.application_path = "taskflow:create_app()"
    config.bind = [f"{host}:{port}"]
    config.workers = 1
    print(f"TaskFlow listening on http://{host}:{port} (API docs at /docs)", flush=True)
    raise SystemExit(run(config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="migrate the database, then serve the API")
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8000")))
    commands.add_parser("migrate", help="bring the database schema up to date")
    args = parser.parse_args(argv)

    migrate()
    if args.command == "run":
        serve(args.host, args.port)
