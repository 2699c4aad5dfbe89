"""Operations: liveness and readiness probes, and the assets of `/docs`."""

from __future__ import annotations

import asyncio
import functools
import mimetypes
from pathlib import Path

from openapi_ui_bundles.swagger_ui import static_path as swagger_ui_assets
from pydantic import BaseModel
from quart import Blueprint, Response
from quart_schema import hide
from sqlalchemy import text

from ..db import backends
from ..errors import RETRY_AFTER_UNAVAILABLE_SECONDS, APIError, is_unavailable
from ..jsonio import json_response
from ..openapi import documents, responds

blueprint = Blueprint("ops", __name__)

PROBE_TIMEOUT_SECONDS = 2.0


class Health(BaseModel):
    status: str


class Readiness(BaseModel):
    database: str
    redis: str


@blueprint.get("/healthz")
@responds(Health)
async def healthz() -> Response:
    """Liveness: answers while the process runs, touching nothing else."""
    return json_response({"status": "ok"})


@blueprint.get("/readyz")
@responds(Readiness)
@documents(503)
async def readyz() -> Response:
    """Readiness: whether the database and Redis (when configured) answer.

    503 names what is down.
    """
    database, redis = await asyncio.gather(_probe_database(), _probe_redis())
    down = [name for name, state in (("database", database), ("redis", redis)) if state == "down"]
    if down:
        raise APIError(
            503,
            detail=f"Not ready: {' and '.join(down)} down.",
            headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_SECONDS)},
        )
    return json_response({"database": database, "redis": redis})


async def _probe_database() -> str:
    try:
        async with asyncio.timeout(PROBE_TIMEOUT_SECONDS):
            async with backends().engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
    except Exception as error:
        if is_unavailable(error):
            return "down"
        raise
    return "ok"


async def _probe_redis() -> str:
    redis = backends().redis
    if not redis.configured:
        return "disabled"
    return "ok" if await redis.probe() else "down"


@blueprint.get("/docs/assets/<path:filename>")
@hide
async def docs_asset(filename: str) -> Response:
    """Swagger UI's files, served by the app so `/docs` works with no internet.

    Held in memory as bodies rather than sent as files, so that they are
    compressed like every other body over 1 KiB (the bundle is 1.4 MB).
    """
    asset = DOCS_ASSETS.get(filename)
    if asset is None:
        raise APIError(404)
    mimetype = mimetypes.guess_type(asset.name)[0] or "application/octet-stream"
    return Response(read_asset(asset), mimetype=mimetype)


DOCS_ASSETS = {path.name: path for path in Path(swagger_ui_assets).iterdir() if path.is_file()}


@functools.cache
def read_asset(path: Path) -> bytes:
    return path.read_bytes()
