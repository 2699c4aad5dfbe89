"""Who is calling: the bearer token, its session, and ``require_auth``.

REST and the WebSocket authenticate the same way, with one bearer parser
(``bearer_token``) and one session check (``require_live_session``): the access
token must verify, and its login session must still be live. Logout and
refresh-token reuse revoke a session; the check runs on every request, from
Redis when it is configured (falling back to the database when Redis does not
answer) and from the database otherwise.
"""

from __future__ import annotations

import functools
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from quart import current_app, g, request
from werkzeug.datastructures import Headers

from .data import accounts
from .db import backends
from .errors import APIError
from .redis_gate import RedisUnavailable
from .tokens import ACCESS_TOKEN_LIFETIME, Caller, TokenType, verify_token

# A session known revoked stays so in Redis for longer than any access token
# of it can live; a live one is re-read from the database now and then.
REVOKED_MARK_SECONDS = int(ACCESS_TOKEN_LIFETIME.total_seconds()) + 60
LIVE_MARK_SECONDS = 60

log = logging.getLogger(__name__)


def secret_key() -> str:
    key: str = current_app.config["TASKFLOW"].secret_key
    return key


def bearer_token(headers: Headers) -> str | None:
    """The bearer token of *headers*, None without one; a 401 for anything else
    (another scheme, an empty token, two Authorization headers)."""
    values = headers.getlist("Authorization")
    if not values:
        return None
    if len(values) > 1:
        raise APIError(401, "unauthorized", "Send one Authorization header.")
    scheme, _, token = values[0].partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise APIError(401, "unauthorized", "Expected 'Authorization: Bearer <token>'.")
    return token.strip()


async def authenticate(token: str) -> Caller:
    """The caller an access token speaks for; a 401 unless the token is valid
    and its session live."""
    caller = verify_token(token, TokenType.ACCESS, secret_key())
    await require_live_session(caller)
    return caller


async def request_caller() -> Caller | None:
    """The caller of this request: None without a bearer token; a 401 unless
    the token is valid and its session live.

    Checked once per request, before the body is read and without the
    request's database session, so that no connection or transaction is held
    while a client sends its body (the rate limiter's key asks first, then
    ``require_auth``).
    """
    if "caller" not in g:
        token = bearer_token(request.headers)
        g.caller = await authenticate(token) if token is not None else None
    known: Caller | None = g.caller
    return known


# Sessions


def _mark_key(session_id: uuid.UUID) -> str:
    return f"taskflow:session:{session_id}"


async def session_is_live(session_id: uuid.UUID) -> bool:
    """Whether the login session is live: from its mark in Redis, else from the
    database in a short session of its own (so the check never holds the
    request's connection or transaction)."""
    redis = backends().redis
    try:
        mark = await redis.call(lambda r: r.get(_mark_key(session_id)))
    except RedisUnavailable:
        return await _session_is_live_in_database(session_id)
    if mark is not None:
        return bool(mark == b"1")
    live = await _session_is_live_in_database(session_id)
    # NX: a revocation written meanwhile must not be overwritten by this read.
    await _mark(session_id, live, only_if_absent=True)
    return live


async def _session_is_live_in_database(session_id: uuid.UUID) -> bool:
    async with backends().read_sessionmaker() as db_session:
        return await accounts.is_session_live(db_session, session_id)


async def require_live_session(caller: Caller) -> None:
    if not await session_is_live(caller.session_id):
        raise APIError(401, "session_revoked", "The session has been revoked.")


async def _mark(session_id: uuid.UUID, live: bool, *, only_if_absent: bool = False) -> bool:
    """Mark the session live or revoked in Redis; whether that was done."""
    expiry = LIVE_MARK_SECONDS if live else REVOKED_MARK_SECONDS
    try:
        await backends().redis.call(
            lambda r: r.set(
                _mark_key(session_id), b"1" if live else b"0", ex=expiry, nx=only_if_absent
            )
        )
    except RedisUnavailable:
        return False
    return True


async def forget_revoked_session(session_id: uuid.UUID) -> None:
    """Tell every instance, through Redis, that a session was revoked.

    Called after the revocation committed. Were Redis to miss it while down, a
    stale "live" mark lives at most ``LIVE_MARK_SECONDS``.
    """
    if not await _mark(session_id, live=False):
        log.warning(
            "a revoked session could not be marked in Redis: instances that read its "
            "'live' mark accept its tokens for up to %d s more",
            LIVE_MARK_SECONDS,
        )


# require_auth

R = TypeVar("R")
REQUIRES_AUTH_ATTRIBUTE = "_taskflow_requires_auth"


def require_auth(view: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Refuse the request with 401 unless it carries a valid access token of a
    live session; pass the caller to the view as ``caller``."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> R:
        caller = await request_caller()
        if caller is None:
            raise APIError(401, "unauthorized", "Authentication is required.")
        return await view(*args, caller=caller, **kwargs)

    setattr(wrapper, REQUIRES_AUTH_ATTRIBUTE, True)
    return wrapper
