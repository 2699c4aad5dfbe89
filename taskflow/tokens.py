"""Access and refresh tokens: JWTs (HS256) told apart by their ``typ`` header
and audience (RFC 8725), each naming its user and its login session; and API
tokens: random, ``tfp_``-prefixed and checksummed, known to the server only
by their hash."""

from __future__ import annotations

import functools
import hashlib
import re
import secrets
import time
import uuid
import zlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import jwt

from .errors import APIError

ISSUER = "taskflow"
ACCESS_TOKEN_LIFETIME = timedelta(minutes=15)
REFRESH_TOKEN_LIFETIME = timedelta(days=7)
LEEWAY_SECONDS = 5
REQUIRED_CLAIMS = ["sub", "sid", "iat", "exp", "iss", "aud", "jti"]


class TokenType(StrEnum):
    """A token's ``typ`` header; each type has an audience of its own."""

    ACCESS = "at+jwt"  # RFC 9068
    REFRESH = "rt+jwt"

    @property
    def audience(self) -> str:
        return "taskflow:api" if self is TokenType.ACCESS else "taskflow:refresh"


class Scope(StrEnum):
    """What a caller may do: an API token's scope (a login may do everything)."""

    READ = "read"
    WRITE = "write"


@dataclass(frozen=True)
class Caller:
    """Who a verified token speaks for: a user, through one login session or
    one API token (whose id is then the session's), with what that token allows."""

    user_id: uuid.UUID
    session_id: uuid.UUID
    scope: Scope = Scope.WRITE
    # The projects an API token is limited to; None: all of the user's.
    project_ids: frozenset[uuid.UUID] | None = None
    api_token: bool = False

    def reaches(self, project_id: uuid.UUID) -> bool:
        """Whether the project is within this caller's reach (before membership)."""
        return self.project_ids is None or project_id in self.project_ids


@dataclass(frozen=True)
class IssuedTokens:
    access_token: str
    refresh_token: str
    refresh_token_hash: str
    expires_in: int = int(ACCESS_TOKEN_LIFETIME.total_seconds())


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _encode(caller: Caller, token_type: TokenType, life: timedelta, secret_key: str) -> str:
    now = datetime.now(UTC)
    claims = {
        "sub": str(caller.user_id),
        "sid": str(caller.session_id),
        "iat": now,
        "exp": now + life,
        "iss": ISSUER,
        "aud": token_type.audience,
        "jti": secrets.token_urlsafe(16),
    }
    return jwt.encode(claims, secret_key, algorithm="HS256", headers={"typ": token_type})


def issue_tokens(caller: Caller, secret_key: str) -> IssuedTokens:
    refresh = _encode(caller, TokenType.REFRESH, REFRESH_TOKEN_LIFETIME, secret_key)
    return IssuedTokens(
        access_token=_encode(caller, TokenType.ACCESS, ACCESS_TOKEN_LIFETIME, secret_key),
        refresh_token=refresh,
        refresh_token_hash=token_hash(refresh),
    )


def verify_token(token: str, token_type: TokenType, secret_key: str) -> Caller:
    """The caller *token* speaks for, if it is a valid token of *token_type*; else a 401."""
    caller, expires_at = _verified(token, token_type, secret_key)
    if time.time() > expires_at + LEEWAY_SECONDS:
        raise APIError(401, "token_expired", "The token has expired.")
    return caller


# A client sends the same access token with every request for its lifetime,
# and verifying it is a tenth of a cheap request's CPU: remember the outcome
# of a verification (never a failure), and check the expiry on every use.
@functools.lru_cache(maxsize=4096)
def _verified(token: str, token_type: TokenType, secret_key: str) -> tuple[Caller, int]:
    try:
        decoded = jwt.api_jwt.decode_complete(
            token,
            secret_key,
            algorithms=["HS256"],
            audience=token_type.audience,
            issuer=ISSUER,
            leeway=LEEWAY_SECONDS,
            options={"require": REQUIRED_CLAIMS},
        )
        if decoded["header"].get("typ") != token_type:
            raise jwt.InvalidTokenError("wrong token type")
        payload = decoded["payload"]
        caller = Caller(uuid.UUID(payload["sub"]), uuid.UUID(payload["sid"]))
        return caller, int(payload["exp"])
    except jwt.ExpiredSignatureError:
        raise APIError(401, "token_expired", "The token has expired.") from None
    except (jwt.InvalidTokenError, ValueError, TypeError, KeyError):
        raise APIError(401, "unauthorized", "The token is not valid.") from None


# API tokens: `tfp_`, 32 random base62 characters (190 bits), and 6 more of a
# CRC-32 of those, so that a secret scanner can tell a TaskFlow token from
# random text without asking the server (GitHub's scheme).
API_TOKEN_PREFIX = "tfp_"  # noqa: S105  # nosec B105: a prefix, not a secret
BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
RANDOM_CHARACTERS = 32
CHECKSUM_CHARACTERS = 6
API_TOKEN_SHAPE = re.compile(
    rf"{API_TOKEN_PREFIX}([0-9A-Za-z]{{{RANDOM_CHARACTERS}}})([0-9A-Za-z]{{{CHECKSUM_CHARACTERS}}})"
)


def _checksum(random_part: str) -> str:
    value = zlib.crc32(random_part.encode())
    digits = []
    for _ in range(CHECKSUM_CHARACTERS):
        value, digit = divmod(value, 62)
        digits.append(BASE62[digit])
    return "".join(reversed(digits))


def new_api_token() -> str:
    random_part = "".join(secrets.choice(BASE62) for _ in range(RANDOM_CHARACTERS))
    return f"{API_TOKEN_PREFIX}{random_part}{_checksum(random_part)}"


def is_api_token(token: str) -> bool:
    """Whether *token* is an API token, well formed (its checksum right)."""
    shape = API_TOKEN_SHAPE.fullmatch(token)
    return shape is not None and _checksum(shape.group(1)) == shape.group(2)
