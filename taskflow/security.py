"""Who is calling: the bearer token, its session, and ``require_auth``.

REST and the WebSocket authenticate the same way, with one bearer parser
(``bearer_token``) and one session check (``require_live_session``): the access
token must verify, and its login session must still be live. Logout and
refresh-token reuse revoke a session; the check runs on every request, from
Redis when it is configured (falling back to the database when Redis does not
answer) and from the database otherwise.

An API token (``tfp_…``) is a session of its own: what it stands for (user,
scope, projects, expiry) never changes while it lives, so each process keeps
it once read (``_known_tokens``), and its deletion is a revocation like a
logout's, seen by the same session check. Its hot path is a JWT's: no query.
"""

from __future__ import annotations

import functools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from quart import current_app, g, request
from redis.asyncio import Redis
from werkzeug.datastructures import Headers

from .data import accounts, api_tokens
from .db import READ_METHODS, backends
from .errors import APIError, is_unavailable
from .redis_gate import RedisUnavailable
from .tokens import (
    ACCESS_TOKEN_LIFETIME,
    API_TOKEN_PREFIX,
    Caller,
    Scope,
    TokenType,
    is_api_token,
    token_hash,
    verify_token,
)

# A session known revoked stays so in Redis for longer than any access token
# of it can live; a live one is re-read from the database now and then.
REVOKED_MARK_SECONDS = int(ACCESS_TOKEN_LIFETIME.total_seconds()) + 60
LIVE_MARK_SECONDS = 60
# An API token's last use is written at most once a minute, by one instance.
LAST_USE_SECONDS = 60
KNOWN_TOKENS = 4096

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
    """The caller an access token or API token speaks for; a 401 unless the
    token is valid and its session live."""
    caller = await token_caller(token)
    await require_live_session(caller)
    await note_use(caller)
    return caller


async def token_caller(token: str) -> Caller:
    """The caller a token names, its session not checked; a 401 unless the
    token itself is valid."""
    if token.startswith(API_TOKEN_PREFIX):
        return await api_token_caller(token)
    return verify_token(token, TokenType.ACCESS, secret_key())


async def note_use(caller: Caller) -> None:
    if caller.api_token:
        await note_token_use(caller.session_id)


# API tokens

_known_tokens: OrderedDict[str, api_tokens.KnownToken] = OrderedDict()
_uses_noted: dict[uuid.UUID, float] = {}


async def api_token_caller(token: str) -> Caller:
    """The caller of an API token: a 401 unless it is well formed, known and unexpired."""
    if not is_api_token(token):
        raise APIError(401, "unauthorized", "The token is not valid.")
    presented = token_hash(token)
    known = _known_tokens.get(presented)
    if known is None:
        async with backends().read_sessionmaker() as db_session:
            known = await api_tokens.find_token(db_session, presented)
        if known is None:
            raise APIError(401, "unauthorized", "The token is not valid.")
        _known_tokens[presented] = known
        if len(_known_tokens) > KNOWN_TOKENS:
            _known_tokens.popitem(last=False)
    if datetime.now(UTC) >= known.expires_at:
        raise APIError(401, "token_expired", "The token has expired.")
    return known.caller


async def note_token_use(token_id: uuid.UUID) -> None:
    """Write the token's ``last_used_at`` if no instance did in the last minute:
    this process remembers when it last did, and Redis (when it answers)
    lets one instance of all do it."""
    now = time.monotonic()
    if now - _uses_noted.get(token_id, -LAST_USE_SECONDS) < LAST_USE_SECONDS:
        return
    if len(_uses_noted) > KNOWN_TOKENS:
        _uses_noted.clear()
    _uses_noted[token_id] = now
    key = f"taskflow:token-used:{token_id}"
    try:
        first = await backends().redis.call(
            lambda r: r.set(key, b"1", nx=True, ex=LAST_USE_SECONDS)
        )
    except RedisUnavailable:
        first = True
    if not first:
        return
    try:
        async with backends().sessionmaker() as db_session:
            await api_tokens.note_use(db_session, token_id)
            await db_session.commit()
    except Exception as error:
        if not is_unavailable(error):
            raise
        log.warning("an API token's last use was not recorded: the database is unavailable")


async def request_caller() -> Caller | None:
    """The caller of this request: None without a bearer token; a 401 unless
    the token is valid and its session live.

    Checked once per request, a refusal too, before the body is read and
    without the request's database session, so that no connection or
    transaction is held while a client sends its body (the rate limiter asks
    first, then ``require_auth``).
    """
    if "caller" not in g:
        token = bearer_token(request.headers)
        try:
            g.caller = await authenticate(token) if token is not None else None
        except APIError as refusal:
            g.caller = refusal
    if isinstance(g.caller, APIError):
        raise g.caller
    known: Caller | None = g.caller
    return known


async def unchecked_request_caller() -> Caller | None:
    """The caller this request's token names, its session not yet checked:
    None without a token or with one that is not valid (``request_caller``
    then says why). The limiter checks the session in its step in Redis and
    then calls ``accept_caller``."""
    if "caller" in g:
        known: Caller | APIError | None = g.caller
        return known if isinstance(known, Caller) else None
    try:
        token = bearer_token(request.headers)
        return await token_caller(token) if token is not None else None
    except APIError as refusal:
        g.caller = refusal  # request_caller says why, without verifying it again
        return None


async def accept_caller(caller: Caller) -> None:
    """Take *caller* as this request's: its session was found live."""
    g.caller = caller
    await note_use(caller)


# Sessions


def session_mark_key(session_id: uuid.UUID) -> str:
    """The Redis key saying whether a session is live (b"1") or revoked (b"0")."""
    return f"taskflow:session:{session_id}"


async def session_is_live(caller: Caller) -> bool:
    """Whether the caller's login session (or API token) is live."""
    return (await sessions_live([caller]))[0]


async def sessions_live(callers: Sequence[Caller]) -> list[bool]:
    """Whether each caller's session is live: their marks read from Redis in
    one round trip; those without a mark (or all, Redis away) read from the
    database, in one query for login sessions and one for API tokens in a
    short session of its own (so a check never holds a request's connection
    or transaction), and then marked."""
    if not callers:
        return []
    keys = [session_mark_key(caller.session_id) for caller in callers]
    try:
        # The client returns bytes: it is not made with decode_responses.
        marks = cast(list[bytes | None], await backends().redis.call(lambda r: r.mget(keys)))
        redis_answered = True
    except RedisUnavailable:
        marks, redis_answered = [None] * len(callers), False
    unmarked = [caller for caller, mark in zip(callers, marks, strict=True) if mark is None]
    found = await _sessions_live_in_database(unmarked) if unmarked else {}
    if redis_answered and found:
        # NX: a revocation written meanwhile must not be overwritten by this read.
        await _mark(found, only_if_absent=True)
    return [
        mark == b"1" if mark is not None else found[caller.session_id]
        for caller, mark in zip(callers, marks, strict=True)
    ]


async def _sessions_live_in_database(callers: Sequence[Caller]) -> dict[uuid.UUID, bool]:
    token_ids = {caller.session_id for caller in callers if caller.api_token}
    session_ids = {caller.session_id for caller in callers if not caller.api_token}
    async with backends().read_sessionmaker() as db_session:
        live = await api_tokens.live_tokens(db_session, token_ids) if token_ids else set()
        if session_ids:
            live |= await accounts.live_sessions(db_session, session_ids)
    return {session_id: session_id in live for session_id in token_ids | session_ids}


async def require_live_session(caller: Caller) -> None:
    if not await session_is_live(caller):
        raise APIError(401, "session_revoked", "The session has been revoked.")


async def _mark(sessions: dict[uuid.UUID, bool], *, only_if_absent: bool = False) -> bool:
    """Mark each session live (True) or revoked in Redis, in one round trip;
    whether that was done."""

    async def set_marks(client: Redis) -> None:
        async with client.pipeline(transaction=False) as pipeline:
            for session_id, live in sessions.items():
                pipeline.set(
                    session_mark_key(session_id),
                    b"1" if live else b"0",
                    ex=LIVE_MARK_SECONDS if live else REVOKED_MARK_SECONDS,
                    nx=only_if_absent,
                )
            await pipeline.execute()

    try:
        await backends().redis.call(set_marks)
    except RedisUnavailable:
        return False
    return True


async def forget_revoked_session(session_id: uuid.UUID) -> None:
    """Tell every instance, through Redis, that a session was revoked.

    Called after the revocation committed. Were Redis to miss it while down, a
    stale "live" mark lives at most ``LIVE_MARK_SECONDS``.
    """
    if not await _mark({session_id: False}):
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
    live session, or a valid API token, and with 403 a read-only token's
    request to write; pass the caller to the view as ``caller``."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> R:
        caller = await request_caller()
        if caller is None:
            raise APIError(401, "unauthorized", "Authentication is required.")
        if caller.scope is Scope.READ and request.method not in READ_METHODS:
            raise APIError(403, "forbidden", "This API token may only read.")
        return await view(*args, caller=caller, **kwargs)

    setattr(wrapper, REQUIRES_AUTH_ATTRIBUTE, True)
    return wrapper


LOGIN_ONLY_ATTRIBUTE = "_taskflow_login_only"


def login_only(view: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Refuse API tokens with 403 (under ``require_auth``): what only a login
    may do, such as managing tokens or logging out."""

    @functools.wraps(view)
    async def wrapper(*args: Any, caller: Caller, **kwargs: Any) -> R:
        if caller.api_token:
            raise APIError(403, "forbidden", "An API token cannot do this; log in.")
        return await view(*args, caller=caller, **kwargs)

    setattr(wrapper, LOGIN_ONLY_ATTRIBUTE, True)
    return wrapper
