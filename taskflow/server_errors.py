"""hypercorn's own error answers, in the contract's shape: one of the two
places TaskFlow adjusts a framework's internals (the other is
``ws_compression.py``).

hypercorn answers a request it cannot parse (a malformed request line or
header: 400; headers over its limit: 431) by itself, before any application
sees it, with an empty body and no ``X-Request-ID``; the contract says every
4xx is problem+json. hypercorn has no setting or hook for that answer, so
``install`` replaces the one private method that builds it,
``H11Protocol._send_error_response`` (hypercorn 0.17 and 0.18), with one that
sends the same status with a problem+json body. ``tests/test_errors.py``
checks it against a real hypercorn; if an upgrade renames the method,
``install`` refuses to start rather than silently doing nothing.
"""

from __future__ import annotations

import uuid
from itertools import chain

import h11
import orjson
from hypercorn.protocol.h11 import H11Protocol

from .errors import APIError, plain_code, problem_body


def _problem(status_code: int, request_id: str) -> bytes:
    # Not the table's 400 code (invalid_json): the request itself is malformed.
    error = APIError(status_code, plain_code(status_code))
    return orjson.dumps(problem_body(error, request_id))


async def _send_error_response(self: H11Protocol, status_code: int) -> None:
    # h11 hints 501 for a transfer coding it does not know (RFC 9112 says
    # SHOULD); the contract's table has no 501, and the request is malformed.
    if status_code == 501:
        status_code = 400
    request_id = uuid.uuid4().hex
    body = _problem(status_code, request_id)
    headers = [
        (b"content-type", b"application/problem+json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-request-id", request_id.encode()),
        (b"connection", b"close"),
    ]
    await self._send_h11_event(
        h11.Response(
            status_code=status_code,
            headers=list(chain(headers, self.config.response_headers("h11"))),
        )
    )
    await self._send_h11_event(h11.Data(data=body))
    await self._send_h11_event(h11.EndOfMessage())


def install() -> None:
    if not callable(getattr(H11Protocol, "_send_error_response", None)):
        raise RuntimeError("hypercorn changed: H11Protocol._send_error_response is gone")
    H11Protocol._send_error_response = _send_error_response  # type: ignore[method-assign]
