"""CORS: pages on the origins in ``TASKFLOW_CORS_ORIGINS`` may call the API
from a browser; a preflight from any other origin is refused.

Our own small module rather than quart-cors, whose 0.8 cannot keep the
contract through its front door: ``cors(app)`` only decorates whatever
response the app makes, so with ``PROVIDE_AUTOMATIC_OPTIONS`` off (and no
route takes OPTIONS) an allowed preflight stays a 405, and a preflight from
another origin gets the route's answer without CORS headers instead of a 403
(its ``route_cors`` would have to wrap every view in the blueprints, answers
a preflight 200 from Quart's automatic OPTIONS, and still refuses nothing).
Here a preflight is answered in a ``before_request`` hook registered after
the limiter's, so it is counted and may be refused with a 429 like any
request, and an ``after_request`` hook adds the headers to every response
to an allowed origin, errors included. Credentials mode is never allowed:
clients authenticate with bearer tokens, never cookies.

The WebSocket is left alone: a browser sends ``Origin`` on its handshake, but
the socket is authenticated by a token the page must present itself, never
by a cookie, so a page on another origin gains nothing it does not already
hold (no cross-site WebSocket hijacking), and a check would stop only
browsers (any other client writes the ``Origin`` it likes).
"""

from __future__ import annotations

from quart import Quart, Response, request

from .config import Config
from .errors import APIError

EXTENSION_KEY = "taskflow.cors"

ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE"
ALLOW_HEADERS = (
    "Authorization, Content-Type, If-Match, If-None-Match, Idempotency-Key, X-Request-ID"
)
EXPOSE_HEADERS = (
    "ETag, Location, Retry-After, RateLimit-Limit, RateLimit-Remaining, RateLimit-Reset, "
    "X-Request-ID, Idempotent-Replayed"
)
# Chromium caches a preflight for at most two hours (Firefox a day).
MAX_AGE_SECONDS = 7200


class CORS:
    """The origins allowed, and the two hooks that serve them."""

    def __init__(self, origins: tuple[str, ...]) -> None:
        self.origins = frozenset(origins)

    async def answer_preflight(self) -> Response | None:
        """Answer a preflight: 204 for an allowed origin, else 403.

        Any path is answered, an unknown one included: a preflight asks
        whether this origin may send this method and these headers, not
        whether the resource exists; the request that follows gets its own
        404 or 405 as a problem the page can read (a refused preflight would
        leave it only a network error).
        """
        if request.method != "OPTIONS" or "Access-Control-Request-Method" not in request.headers:
            return None
        origin = request.headers.get("Origin")
        if origin is None:
            return None  # not a preflight: the 405 of any OPTIONS
        if origin not in self.origins:
            raise APIError(403, detail="Cross-origin requests from this origin are not allowed.")
        return Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOW_METHODS,
                "Access-Control-Allow-Headers": ALLOW_HEADERS,
                "Access-Control-Max-Age": str(MAX_AGE_SECONDS),
            },
        )

    async def add_headers(self, response: Response) -> Response:
        """Allow and expose every response to an allowed origin, and say that
        responses vary with ``Origin`` (added to any ``Vary`` already set)."""
        if not self.origins:
            return response
        response.vary.add("Origin")
        origin = request.headers.get("Origin")
        if origin is not None and origin in self.origins:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = EXPOSE_HEADERS
        return response


def init_app(app: Quart, config: Config) -> None:
    """Register the hooks; call after the limiter's, so that preflights are
    counted (and refused when over the limit) as every request is."""
    cors = app.extensions[EXTENSION_KEY] = CORS(config.cors_origins)
    app.before_request(cors.answer_preflight)
    app.after_request(cors.add_headers)
