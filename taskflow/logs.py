"""JSON-lines logging in which every line of a request carries its request id.

Nothing here logs headers, bodies or query strings, so tokens and passwords
never reach a log.
"""

from __future__ import annotations

import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

import orjson
from quart import Quart, Response, g, request

REQUEST_ID_HEADER = "X-Request-ID"
# A sane incoming id is echoed; anything else is replaced by a fresh one.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_id_var: ContextVar[str | None] = ContextVar("request_id", default=None)
access_log = logging.getLogger("taskflow.access")


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        line.update(getattr(record, "fields", {}))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(line).decode()


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # httpx logs each request's whole URL at INFO: a webhook's path or query
    # may hold a secret of its receiver's. Deliveries are logged without it.
    logging.getLogger("httpx").setLevel(logging.WARNING)


async def assign_request_id() -> None:
    incoming = request.headers.get(REQUEST_ID_HEADER, "")
    request_id = incoming if SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
    g.request_id = request_id
    g.request_started = time.perf_counter()
    request_id_var.set(request_id)


async def tag_response(response: Response) -> Response:
    request_id = g.get("request_id") or uuid.uuid4().hex
    response.headers[REQUEST_ID_HEADER] = request_id
    started = g.get("request_started")
    access_log.info(
        "request",
        extra={
            "fields": {
                "method": request.method,
                "path": request.path,
                "status": response.status_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2)
                if started is not None
                else None,
            }
        },
    )
    return response


def init_app(app: Quart) -> None:
    """Register the request id and the access log; call before any other
    extension registers hooks.

    Before-request hooks run in the order registered and after-request hooks
    in reverse: registered first, these are the first before every request (so
    even a rate-limited or refused request has its id) and the last after it
    (so the access line shows the final status).
    """
    app.before_request(assign_request_id)
    app.after_request(tag_response)
