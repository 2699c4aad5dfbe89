"""One error contract: every failure becomes an RFC 9457 problem+json body."""

from __future__ import annotations

import asyncio
import logging
import traceback
from http import HTTPStatus
from typing import Any

import orjson
import redis.asyncio as aioredis
from pydantic import ValidationError
from quart import Quart, Response, g, request
from quart_rate_limiter import RateLimitExceeded
from quart_schema import RequestSchemaValidationError
from sqlalchemy import exc
from werkzeug.exceptions import HTTPException, InternalServerError

log = logging.getLogger(__name__)

RETRY_AFTER_UNAVAILABLE_SECONDS = 5

CODES = {
    400: "invalid_json",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    422: "validation_failed",
    429: "rate_limited",
    500: "internal_error",
    503: "service_unavailable",
}

DETAILS = {
    400: "The request body is not valid JSON.",
    404: "The requested resource was not found.",
    405: "The method is not allowed for this resource.",
    413: "The request body is larger than 1 MiB.",
    415: "The request body must be application/json.",
    429: "Too many requests; retry later.",
    500: "An unexpected error occurred.",
    503: "A service the API depends on is unavailable; retry later.",
}


# SQLSTATE classes that mean the server is going away or refusing work:
# connection exception, insufficient resources, operator intervention
# (administrator shutdown, "the database system is starting up", a statement
# over statement_timeout); and the one code for a lock waited on for longer
# than lock_timeout.
UNAVAILABLE_SQLSTATE_CLASSES = ("08", "53", "57")
LOCK_NOT_AVAILABLE = "55P03"


def is_unavailable(error: BaseException) -> bool:
    """Whether an error means a backing service is down rather than a bug."""
    if isinstance(error, exc.DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None) or ""
        return (
            error.connection_invalidated
            or isinstance(error, exc.OperationalError | exc.InterfaceError)
            or sqlstate[:2] in UNAVAILABLE_SQLSTATE_CLASSES
            or sqlstate == LOCK_NOT_AVAILABLE
        )
    return isinstance(
        error,
        OSError
        | asyncio.TimeoutError
        | exc.TimeoutError
        | aioredis.ConnectionError
        | aioredis.TimeoutError,
    )


class APIError(Exception):
    """An error the client should see, with its status and contract code."""

    def __init__(
        self,
        status: int,
        code: str | None = None,
        detail: str | None = None,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.code = code or CODES.get(status, "error")
        self.detail = detail or DETAILS.get(status, HTTPStatus(status).phrase)
        self.errors = errors
        self.headers = headers or {}


def problem_body(error: APIError, request_id: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "about:blank",
        "title": HTTPStatus(error.status).phrase,
        "status": error.status,
        "code": error.code,
        "detail": error.detail,
        "request_id": request_id,
    }
    if error.errors is not None:
        body["errors"] = error.errors
    return body


def plain_code(status: int) -> str:
    """A code for a status the contract's table does not name (408, 431…)."""
    return HTTPStatus(status).phrase.lower().replace(" ", "_")


def problem(error: APIError) -> Response:
    body = problem_body(error, g.get("request_id"))
    headers = dict(error.headers)
    if error.status == 401:
        headers.setdefault("WWW-Authenticate", "Bearer")
    return Response(
        orjson.dumps(body),
        status=error.status,
        headers=headers,
        content_type="application/problem+json",
    )


# A problem lists at most this many field errors: enough to fix a request,
# never a body that grows with what the client sent.
MAX_FIELD_ERRORS = 20


def field_errors(error: ValidationError) -> list[dict[str, str]]:
    return [
        {"field": ".".join(str(part) for part in item["loc"]) or "body", "message": item["msg"]}
        for item in error.errors(include_url=False, include_input=False)[:MAX_FIELD_ERRORS]
    ]


def validation_failed(errors: list[dict[str, str]]) -> APIError:
    return APIError(422, detail="The request is not valid.", errors=errors)


async def handle_api_error(error: APIError) -> Response:
    return problem(error)


async def handle_validation_error(error: RequestSchemaValidationError) -> Response:
    cause = error.validation_error
    if isinstance(cause, ValidationError):
        return problem(validation_failed(field_errors(cause)))
    return problem(validation_failed([{"field": "body", "message": str(cause)}]))


async def handle_rate_limited(error: RateLimitExceeded) -> Response:
    return problem(APIError(429, headers={"Retry-After": str(error.retry_after)}))


async def handle_http_exception(error: HTTPException) -> Response:
    status = error.code or 500
    if status >= 500:
        return await handle_unexpected(error)
    headers = {}
    if status == 413:
        # The body was left unread, so this connection cannot carry another
        # request: say so, or a client would send its next one into the void.
        headers["Connection"] = "close"
    if status == 405:
        valid_methods = getattr(error, "valid_methods", None) or []
        headers["Allow"] = ", ".join(sorted(valid_methods))
    if status not in CODES:
        # Werkzeug's other 4xx (e.g. 408, 431): keep the status, say it plainly.
        return problem(APIError(status, code=plain_code(status)))
    return problem(APIError(status, headers=headers))


async def handle_unexpected(error: Exception) -> Response:
    if isinstance(error, InternalServerError) and error.original_exception is not None:
        error = error.original_exception  # type: ignore[assignment]
    if is_unavailable(error):
        log.warning("dependency unavailable: %s", describe(error))
        return problem(APIError(503, headers={"Retry-After": str(RETRY_AFTER_UNAVAILABLE_SECONDS)}))
    if isinstance(error, exc.DBAPIError):
        # A database's message can quote the row it refused ("Failing row
        # contains (…, an email, a hash)"): log where and what, never that.
        log.error(
            "unhandled error: %s",
            describe(error),
            extra={
                "fields": {
                    "statement": error.statement,
                    "stack": traceback.format_tb(error.__traceback__),
                }
            },
        )
    else:
        log.error("unhandled error", exc_info=error)
    return problem(APIError(500))


def describe(error: BaseException) -> str:
    """An error's class, and for a database error its SQLSTATE, without its
    message (which may quote data)."""
    if isinstance(error, exc.DBAPIError):
        sqlstate = getattr(error.orig, "sqlstate", None)
        cause = type(error.orig).__name__ if error.orig is not None else type(error).__name__
        return f"{cause} (SQLSTATE {sqlstate})" if sqlstate else cause
    return f"{type(error).__name__}: {error}"


async def refuse_ambiguous_requests() -> None:
    """Refuse requests that the layers below would quietly reinterpret.

    ``Content-Length`` with ``Transfer-Encoding``: h11 reads the body as
    chunked, a proxy in front may have read it by its length (RFC 9112 allows
    rejecting it, and request smuggling lives in the difference). A path that
    starts with ``//``: Werkzeug strips it to one slash, so ``//projects``
    would be served as ``/projects``.
    """
    if "Content-Length" in request.headers and "Transfer-Encoding" in request.headers:
        raise APIError(
            400,
            "bad_request",
            "Content-Length and Transfer-Encoding together are ambiguous.",
            headers={"Connection": "close"},
        )
    if request.scope.get("path", "").startswith("//"):
        raise APIError(404)


def init_app(app: Quart) -> None:
    app.before_request(refuse_ambiguous_requests)
    app.register_error_handler(APIError, handle_api_error)
    app.register_error_handler(RequestSchemaValidationError, handle_validation_error)
    app.register_error_handler(RateLimitExceeded, handle_rate_limited)
    app.register_error_handler(HTTPException, handle_http_exception)
    app.register_error_handler(Exception, handle_unexpected)
