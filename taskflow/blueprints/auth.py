"""Authentication: register, login, refresh, logout, me."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, Literal

from email_validator import EmailNotValidError, validate_email
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint
from quart_rate_limiter import rate_limit
from quart_schema import validate_request
from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import after_commit, commit_even_if_refused, session
from ..errors import APIError
from ..limits import AUTH_LIMITS
from ..models import AuthSession, User
from ..openapi import documents, responds
from ..schemas import Email
from ..security import (
    BCRYPT_MAX_BYTES,
    REFRESH_TOKEN_LIFETIME,
    REFRESH_TYPE,
    Auth,
    IssuedTokens,
    check_password,
    decode_token,
    forget_revoked_session,
    hash_password,
    issue_tokens,
    require_auth,
    token_hash,
)

blueprint = Blueprint("auth", __name__, url_prefix="/auth")

MAX_EMAIL_LENGTH = 254
MIN_PASSWORD_LENGTH = 8
# The scheme's name, not a secret.
TOKEN_TYPE = "bearer"  # noqa: S105  # nosec B105


def normalize_email(value: str) -> str:
    """Lower-case and validate an email address (no DNS lookups)."""
    try:
        email = validate_email(value.strip(), check_deliverability=False).normalized
    except EmailNotValidError as error:
        raise ValueError(str(error)) from None
    email = email.lower()
    if len(email) > MAX_EMAIL_LENGTH:
        raise ValueError(f"at most {MAX_EMAIL_LENGTH} characters")
    return email


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=1024)
    password: str


class Registration(Credentials):
    email: Email
    # At most 72 bytes in UTF-8, which JSON Schema cannot say: 72 characters is its bound.
    password: str = Field(
        json_schema_extra={"minLength": MIN_PASSWORD_LENGTH, "maxLength": BCRYPT_MAX_BYTES}
    )

    @field_validator("email")
    @classmethod
    def _email(cls, value: str) -> str:
        return normalize_email(value)

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        if len(value) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"must be at least {MIN_PASSWORD_LENGTH} characters")
        if len(value.encode()) > BCRYPT_MAX_BYTES:
            raise ValueError(f"must be at most {BCRYPT_MAX_BYTES} bytes in UTF-8")
        return value


class UserOut(BaseModel):
    id: uuid.UUID
    email: str
    created_at: AwareDatetime


def user_of(user: User) -> dict[str, Any]:
    return {"id": user.id, "email": user.email, "created_at": user.created_at}


@blueprint.post("/register")
@rate_limit(limits=AUTH_LIMITS)
@documents(409)
@validate_request(Registration)
@responds(UserOut, 201)
async def register(data: Registration) -> tuple[dict[str, Any], int]:
    """Create an account.

    The email is stored lower-cased; the password must be 8 characters to 72
    UTF-8 bytes. A taken email is a 409.
    """
    user = await create_user(session(), data.email, await hash_password(data.password))
    return user_of(user), 201


class TokensOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


def tokens_of(tokens: IssuedTokens) -> dict[str, Any]:
    return {
        "access_token": tokens.access_token,
        "refresh_token": tokens.refresh_token,
        "token_type": TOKEN_TYPE,
        "expires_in": tokens.expires_in,
    }


@blueprint.post("/login")
@rate_limit(limits=AUTH_LIMITS)
@documents(401)
@validate_request(Credentials)
@responds(TokensOut)
async def login(data: Credentials) -> dict[str, Any]:
    """Exchange email and password for an access and a refresh token.

    Unknown email, wrong password and over-long password are the same 401
    `invalid_credentials`, after the same work.
    """
    db_session = session()
    user = await find_user_by_email(db_session, data.email)
    user_id, password_hash = (user.id, user.password_hash) if user else (None, None)
    # The hash takes a quarter of a second. Nothing is written yet: end the
    # transaction, so that its connection serves other requests meanwhile.
    await db_session.rollback()
    matched = await check_password(data.password, password_hash)
    if user_id is None or not matched:
        raise APIError(401, "invalid_credentials", "The email or password is wrong.")
    return tokens_of(await start_session(db_session, user_id))


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str


@blueprint.post("/refresh")
@documents(401)
@validate_request(RefreshRequest)
@responds(TokensOut)
async def refresh(data: RefreshRequest) -> dict[str, Any]:
    """Spend a refresh token for a new pair.

    A refresh token works once. Presenting a spent one again is taken as
    theft: the whole session is revoked, its newest tokens included.
    """
    claims = decode_token(data.refresh_token, REFRESH_TYPE)
    db_session = session()
    tokens = await rotate_refresh_token(
        db_session, claims.user_id, claims.session_id, token_hash(data.refresh_token)
    )
    if tokens is None:
        if await revoke_session(db_session, claims.session_id):
            commit_even_if_refused(db_session)
            after_commit(db_session, forget_revoked_session, claims.session_id)
        raise APIError(401, "session_revoked", "The refresh token is spent or revoked.")
    return tokens_of(tokens)


@blueprint.post("/logout")
@require_auth
@responds(None, 204)
async def logout(auth: Auth) -> tuple[str, int]:
    """Revoke the caller's session: its refresh and access tokens stop working."""
    db_session = session()
    await revoke_session(db_session, auth.session_id)
    after_commit(db_session, forget_revoked_session, auth.session_id)
    return "", 204


@blueprint.get("/me")
@require_auth
@responds(UserOut)
async def me(auth: Auth) -> dict[str, Any]:
    """The caller's account."""
    user = await session().get(User, auth.user_id)
    if user is None:
        raise APIError(401, "unauthorized", "The account no longer exists.")
    return user_of(user)


# Data functions: they take the session and never commit.


async def create_user(db_session: AsyncSession, email: str, password_hash: str) -> User:
    user = User(email=email, password_hash=password_hash)
    db_session.add(user)
    try:
        await db_session.flush()
    except IntegrityError:
        raise APIError(409, "conflict", "That email is already registered.") from None
    return user


async def find_user_by_email(db_session: AsyncSession, email: str) -> User | None:
    try:
        normalized = normalize_email(email)
    except ValueError:
        return None
    result = await db_session.execute(select(User).where(User.email == normalized))
    return result.scalar_one_or_none()


async def start_session(db_session: AsyncSession, user_id: uuid.UUID) -> IssuedTokens:
    session_id = uuid.uuid4()
    tokens = issue_tokens(user_id, session_id)
    db_session.add(
        AuthSession(
            id=session_id,
            user_id=user_id,
            refresh_token_hash=tokens.refresh_token_hash,
            expires_at=datetime.now(UTC) + REFRESH_TOKEN_LIFETIME,
        )
    )
    await db_session.flush()
    return tokens


async def rotate_refresh_token(
    db_session: AsyncSession, user_id: uuid.UUID, session_id: uuid.UUID, presented_hash: str
) -> IssuedTokens | None:
    """Swap the session's one live refresh token for a new pair, atomically.

    The conditional UPDATE matches only while the presented token is the live
    one, so of concurrent refreshes with one token exactly one wins.
    """
    tokens = issue_tokens(user_id, session_id)
    result = await db_session.execute(
        update(AuthSession)
        .where(
            AuthSession.id == session_id,
            AuthSession.user_id == user_id,
            AuthSession.refresh_token_hash == presented_hash,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > datetime.now(UTC),
        )
        .values(refresh_token_hash=tokens.refresh_token_hash)
        .returning(AuthSession.id)
    )
    return tokens if result.first() is not None else None


async def revoke_session(db_session: AsyncSession, session_id: uuid.UUID) -> bool:
    """Revoke a session; whether it was live until now."""
    result = await db_session.execute(
        update(AuthSession)
        .where(AuthSession.id == session_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
        .returning(AuthSession.id)
    )
    return result.first() is not None
