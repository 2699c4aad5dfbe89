"""Passwords, tokens and ``require_auth``: who is calling, and may they.

Access and refresh tokens are JWTs (HS256) told apart by their ``typ``
header and audience (RFC 8725). A token is good only while its session is:
logout and refresh-token reuse revoke the session, and the revocation check
runs on every request, from Redis when it is configured (falling back to the
database when Redis does not answer) and from the database otherwise.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import bcrypt
import jwt
from quart import current_app, g, request
from redis.exceptions import RedisError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from .config import Config
from .db import backends, rows, session
from .errors import APIError
from .models import AuthSession

ISSUER = "taskflow"
ACCESS_AUDIENCE = "taskflow:api"
REFRESH_AUDIENCE = "taskflow:refresh"
ACCESS_TYPE = "at+jwt"  # RFC 9068
REFRESH_TYPE = "rt+jwt"
ACCESS_TOKEN_LIFETIME = timedelta(minutes=15)
REFRESH_TOKEN_LIFETIME = timedelta(days=7)
LEEWAY_SECONDS = 5
REQUIRED_CLAIMS = ["sub", "sid", "iat", "exp", "iss", "aud", "jti"]
BCRYPT_MAX_BYTES = 72

# A session known revoked stays so in Redis for longer than any access token
# of it can live; an active one is re-read from the database now and then.
REVOKED_MARK_SECONDS = int(ACCESS_TOKEN_LIFETIME.total_seconds()) + 60
ACTIVE_MARK_SECONDS = 60

log = logging.getLogger(__name__)

# bcrypt runs in threads, one per core, at the lowest CPU priority: under a
# flood of logins the event loop, and with it every other request, keeps the
# cores. Hashes beyond a short queue are refused with a 503 at once, and one
# that the busy cores have not finished within a few seconds is given up: a
# client is better told to come back than left hanging.
BCRYPT_THREADS = os.cpu_count() or 1
BCRYPT_QUEUE = 4 * BCRYPT_THREADS
BCRYPT_DEADLINE_SECONDS = 5.0
BCRYPT_RETRY_AFTER_SECONDS = 1


def _lowest_priority() -> None:
    os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


_bcrypt_threads = ThreadPoolExecutor(
    max_workers=BCRYPT_THREADS, thread_name_prefix="bcrypt", initializer=_lowest_priority
)
_bcrypt_pending = 0


def _config() -> Config:
    config: Config = current_app.config["TASKFLOW"]
    return config


# Passwords


def _too_many_sign_ins() -> APIError:
    return APIError(
        503,
        "service_unavailable",
        "Too many sign-ins at once; try again shortly.",
        headers={"Retry-After": str(BCRYPT_RETRY_AFTER_SECONDS)},
    )


async def _in_bcrypt_thread(function: Callable[..., Any], *args: Any) -> Any:
    global _bcrypt_pending
    if _bcrypt_pending >= BCRYPT_THREADS + BCRYPT_QUEUE:
        raise _too_many_sign_ins()
    _bcrypt_pending += 1
    try:
        async with asyncio.timeout(BCRYPT_DEADLINE_SECONDS):
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(_bcrypt_threads, function, *args)
    except TimeoutError:
        raise _too_many_sign_ins() from None
    finally:
        _bcrypt_pending -= 1


async def hash_password(password: str) -> str:
    salt = bcrypt.gensalt(rounds=_config().bcrypt_rounds)
    hashed: bytes = await _in_bcrypt_thread(bcrypt.hashpw, password.encode(), salt)
    return hashed.decode()


@functools.cache
def _dummy_hash(rounds: int) -> bytes:
    return bcrypt.hashpw(secrets.token_bytes(16), bcrypt.gensalt(rounds=rounds))


async def check_password(password: str, password_hash: str | None) -> bool:
    """Whether *password* matches; the same bcrypt work is spent when there is
    no such user (``password_hash`` None) or the password is over-long."""
    encoded = password.encode()
    too_long = len(encoded) > BCRYPT_MAX_BYTES
    if password_hash is None or too_long:
        dummy = await _in_bcrypt_thread(_dummy_hash, _config().bcrypt_rounds)
        await _in_bcrypt_thread(bcrypt.checkpw, encoded[:BCRYPT_MAX_BYTES], dummy)
        return False
    matched: bool = await _in_bcrypt_thread(bcrypt.checkpw, encoded, password_hash.encode())
    return matched


# Tokens


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    refresh_token_hash: str
    expires_in: int = int(ACCESS_TOKEN_LIFETIME.total_seconds())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _encode(
    user_id: uuid.UUID, session_id: uuid.UUID, token_type: str, audience: str, life: timedelta
) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": str(user_id),
        "sid": str(session_id),
        "iat": now,
        "exp": now + life,
        "iss": ISSUER,
        "aud": audience,
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, _config().secret_key, algorithm="HS256", headers={"typ": token_type})


def issue_tokens(user_id: uuid.UUID, session_id: uuid.UUID) -> IssuedTokens:
    refresh = _encode(user_id, session_id, REFRESH_TYPE, REFRESH_AUDIENCE, REFRESH_TOKEN_LIFETIME)
    return IssuedTokens(
        access_token=_encode(
            user_id, session_id, ACCESS_TYPE, ACCESS_AUDIENCE, ACCESS_TOKEN_LIFETIME
        ),
        refresh_token=refresh,
        refresh_token_hash=token_hash(refresh),
    )


@dataclass(frozen=True)
class TokenClaims:
    user_id: uuid.UUID
    session_id: uuid.UUID


def decode_token(token: str, token_type: str) -> TokenClaims:
    """Verify *token* as a token of *token_type*, or raise a 401."""
    claims, expires_at = _verified(token, token_type, _config().secret_key)
    if time.time() > expires_at + LEEWAY_SECONDS:
        raise APIError(401, "token_expired", "The token has expired.")
    return claims


# A client sends the same access token with every request for its lifetime,
# and verifying it is a tenth of a cheap request's CPU: remember the outcome
# of a verification (never a failure), and check the expiry on every use.
@functools.lru_cache(maxsize=4096)
def _verified(token: str, token_type: str, secret_key: str) -> tuple[TokenClaims, int]:
    audience = ACCESS_AUDIENCE if token_type == ACCESS_TYPE else REFRESH_AUDIENCE
    try:
        decoded = jwt.api_jwt.decode_complete(
            token,
            secret_key,
            algorithms=["HS256"],
            audience=audience,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": REQUIRED_CLAIMS},
        )
        if decoded["header"].get("typ") != token_type:
            raise jwt.InvalidTokenError("wrong token type")
        payload = decoded["payload"]
        claims = TokenClaims(uuid.UUID(payload["sub"]), uuid.UUID(payload["sid"]))
        return claims, int(payload["exp"])
    except jwt.ExpiredSignatureError:
        raise APIError(401, "token_expired", "The token has expired.") from None
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError):
        raise APIError(401, "unauthorized", "The token is not valid.") from None


def bearer_claims() -> TokenClaims | None:
    """The verified claims of this request's bearer access token, or None.

    Decoded once per request: the rate limiter's key and ``require_auth``
    both ask for it. Raises a 401 for a token that is present but bad.
    """
    if "bearer_claims" not in g:
        headers = request.headers.getlist("Authorization")
        if not headers:
            g.bearer_claims = None
        elif len(headers) > 1:
            raise APIError(401, "unauthorized", "Send one Authorization header.")
        else:
            scheme, _, token = headers[0].partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise APIError(401, "unauthorized", "Expected 'Authorization: Bearer <token>'.")
            g.bearer_claims = decode_token(token.strip(), ACCESS_TYPE)
    claims: TokenClaims | None = g.bearer_claims
    return claims


# Sessions


def _session_key(session_id: uuid.UUID) -> str:
    return f"taskflow:session:{session_id}"


async def session_is_active(db_session: AsyncSession, session_id: uuid.UUID) -> bool:
    redis = backends().redis
    if redis is not None:
        try:
            cached = await redis.get(_session_key(session_id))
            if cached is not None:
                return bool(cached == b"1")
        except (RedisError, OSError) as error:
            log.warning("session check falls back to the database: %s", type(error).__name__)
            redis = None
    now = datetime.now(UTC)
    active = (
        await rows(
            db_session,
            select(AuthSession.id).where(
                AuthSession.id == session_id,
                AuthSession.revoked_at.is_(None),
                AuthSession.expires_at > now,
            ),
        )
    ).first() is not None
    if redis is not None:
        # NX: a revocation written meanwhile must not be overwritten by this read.
        await _mark(session_id, active, only_if_absent=True)
    return active


async def _mark(session_id: uuid.UUID, active: bool, *, only_if_absent: bool = False) -> None:
    redis = backends().redis
    if redis is None:
        return
    try:
        await redis.set(
            _session_key(session_id),
            b"1" if active else b"0",
            ex=ACTIVE_MARK_SECONDS if active else REVOKED_MARK_SECONDS,
            nx=only_if_absent,
        )
    except (RedisError, OSError) as error:
        log.warning("session mark not written: %s", type(error).__name__)


async def forget_revoked_session(session_id: uuid.UUID) -> None:
    """Tell every instance, through Redis, that a session was revoked.

    Called after the revocation committed. Were Redis to miss it while down, a
    stale "active" mark lives at most ``ACTIVE_MARK_SECONDS``.
    """
    await _mark(session_id, active=False)


# require_auth


@dataclass(frozen=True)
class Auth:
    """The caller of an authenticated request."""

    user_id: uuid.UUID
    session_id: uuid.UUID


R = TypeVar("R")
REQUIRES_AUTH_ATTRIBUTE = "_taskflow_requires_auth"


def require_auth(view: Callable[..., Awaitable[R]]) -> Callable[..., Awaitable[R]]:
    """Refuse the request with 401 unless it carries a valid access token of a
    live session; pass the caller to the view as ``auth``."""

    @functools.wraps(view)
    async def wrapper(*args: Any, **kwargs: Any) -> R:
        claims = bearer_claims()
        if claims is None:
            raise APIError(401, "unauthorized", "Authentication is required.")
        if not await session_is_active(session(), claims.session_id):
            raise APIError(401, "session_revoked", "The session has been revoked.")
        return await view(*args, auth=Auth(claims.user_id, claims.session_id), **kwargs)

    setattr(wrapper, REQUIRES_AUTH_ATTRIBUTE, True)
    return wrapper
