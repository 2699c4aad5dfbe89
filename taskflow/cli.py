"""The ``taskflow`` command: migrate the database and serve the API."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
from pathlib import Path

from alembic import command
from alembic.config import Config as AlembicConfig

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config() -> AlembicConfig:
    return AlembicConfig(str(PROJECT_ROOT / "alembic.ini"))


def migrate() -> None:
    command.upgrade(alembic_config(), "head")


def serve(host: str, port: int) -> None:
    import uvloop
    from hypercorn.asyncio import serve as hypercorn_serve
    from hypercorn.config import Config as HypercornConfig

    from . import create_app
    from .ws import restart_sockets

    app = create_app()
    config = HypercornConfig()
    config.bind = [f"{host}:{port}"]
    config.graceful_timeout = 20

    async def run() -> None:
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signal_number in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(signal_number, stopping.set)

        async def shutdown_trigger() -> None:
            await stopping.wait()
            restart_sockets(app)

        await hypercorn_serve(app, config, shutdown_trigger=shutdown_trigger)

    print(f"TaskFlow listening on http://{host}:{port} (API docs at /docs)", flush=True)
    uvloop.run(run())


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
