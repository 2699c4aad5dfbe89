"""Authentication: register, login, refresh, logout, me; and API tokens."""

from __future__ import annotations

import uuid
from datetime import timedelta
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator
from quart import Blueprint, Response
from quart_rate_limiter import rate_limit
from quart_schema import validate_request

from ..data import accounts, api_tokens
from ..db import after_commit, commit_even_if_refused, session
from ..errors import APIError
from ..idempotency import answers_with_a_secret
from ..jsonio import json_response, no_content
from ..limits import AUTH_LIMITS
from ..models import TokenScope
from ..openapi import documents, responds
from ..passwords import (
    BCRYPT_MAX_BYTES,
    NO_CONTROL_CHARACTERS,
    has_control_characters,
    hasher,
)
from ..schemas import Email, RequestModel, TokenName
from ..security import forget_revoked_session, login_only, require_auth, secret_key
from ..tokens import API_TOKEN_PREFIX, Caller, IssuedTokens, TokenType, token_hash, verify_token

blueprint = Blueprint("auth", __name__, url_prefix="/auth")

MIN_PASSWORD_LENGTH = 8
# How long a spent refresh token may come back from the same client's
# concurrent requests before its return is taken as theft.
REUSE_INTERVAL = timedelta(seconds=10)
# The scheme's name, not a secret.
TOKEN_TYPE = "bearer"  # noqa: S105  # nosec B105


class Credentials(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: str = Field(max_length=1024)
    password: str


class Registration(Credentials):
    email: Email
    # At most 72 bytes in UTF-8, which JSON Schema cannot say: 72 characters is its bound.
    password: str = Field(
        json_schema_extra={
            "minLength": MIN_PASSWORD_LENGTH,
            "maxLength": BCRYPT_MAX_BYTES,
            "pattern": NO_CONTROL_CHARACTERS,
        }
    )

    @field_validator("password")
    @classmethod
    def _password(cls, value: str) -> str:
        if len(value) < MIN_PASSWORD_LENGTH:
            raise ValueError(f"must be at least {MIN_PASSWORD_LENGTH} characters")
        if len(value.encode()) > BCRYPT_MAX_BYTES:
            raise ValueError(f"must be at most {BCRYPT_MAX_BYTES} bytes in UTF-8")
        if has_control_characters(value):
            raise ValueError("must not contain control characters (bcrypt stops at a NUL)")
        return value


class UserOut(BaseModel):
    id: uuid.UUID
    email: str
    created_at: AwareDatetime


@blueprint.post("/register")
@rate_limit(limits=AUTH_LIMITS)
@documents(409)
@validate_request(Registration)
@responds(UserOut, 201)
async def register(data: Registration) -> Response:
    """Create an account.

    The email is stored lower-cased; the password must be 8 characters to 72
    UTF-8 bytes. A taken email is a 409.
    """
    password_hash = await hasher().hash(data.password)
    return json_response(await accounts.create_user(session(), data.email, password_hash), 201)


class TokensOut(BaseModel):
    access_token: str
    refresh_token: str
    token_type: Literal["bearer"]
    expires_in: int


def tokens_response(tokens: IssuedTokens) -> Response:
    return json_response(
        {
            "access_token": tokens.access_token,
            "refresh_token": tokens.refresh_token,
            "token_type": TOKEN_TYPE,
            "expires_in": tokens.expires_in,
        }
    )


@blueprint.post("/login")
@rate_limit(limits=AUTH_LIMITS)
@documents(401)
@validate_request(Credentials)
@responds(TokensOut)
async def login(data: Credentials) -> Response:
    """Exchange email and password for an access and a refresh token.

    Unknown email, wrong password and over-long password are the same 401
    `invalid_credentials`, after the same work.
    """
    db_session = session()
    user = await accounts.find_user_by_email(db_session, data.email)
    user_id, password_hash = (user.id, user.password_hash) if user else (None, None)
    # The hash takes a quarter of a second. Nothing is written yet: end the
    # transaction, so that its connection serves other requests meanwhile.
    await db_session.rollback()
    matched = await hasher().check(data.password, password_hash)
    if user_id is None or not matched:
        raise APIError(401, "invalid_credentials", "The email or password is wrong.")
    return tokens_response(await accounts.start_session(db_session, user_id, secret_key()))


class RefreshRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    refresh_token: str


@blueprint.post("/refresh")
@documents(401)
@validate_request(RefreshRequest)
@responds(TokensOut)
async def refresh(data: RefreshRequest) -> Response:
    """Spend a refresh token for a new pair.

    A refresh token works once. Presented again within 10 seconds of being
    spent (a client's concurrent refreshes), it is a 401 `token_expired` and
    nothing else happens; later, it is taken as theft: the whole session is
    revoked, its newest tokens included.
    """
    if data.refresh_token.startswith(API_TOKEN_PREFIX):
        raise APIError(403, "forbidden", "An API token cannot be refreshed.")
    holder = verify_token(data.refresh_token, TokenType.REFRESH, secret_key())
    db_session = session()
    presented = token_hash(data.refresh_token)
    tokens = await accounts.rotate_refresh_token(db_session, holder, presented, secret_key())
    if tokens is None:
        if await accounts.spent_moments_ago(db_session, holder, presented, REUSE_INTERVAL):
            raise APIError(401, "token_expired", "The refresh token was just spent.")
        if await accounts.revoke_session(db_session, holder.session_id):
            commit_even_if_refused(db_session)
            after_commit(db_session, forget_revoked_session, holder.session_id)
        raise APIError(401, "session_revoked", "The refresh token is spent or revoked.")
    return tokens_response(tokens)


@blueprint.post("/logout")
@require_auth
@login_only
@responds(None, 204)
async def logout(caller: Caller) -> Response:
    """Revoke the caller's session: its refresh and access tokens stop working."""
    db_session = session()
    await accounts.revoke_session(db_session, caller.session_id)
    after_commit(db_session, forget_revoked_session, caller.session_id)
    return no_content()


@blueprint.get("/me")
@require_auth
@responds(UserOut)
async def me(caller: Caller) -> Response:
    """The caller's account."""
    user = await accounts.get_user(session(), caller.user_id)
    if user is None:
        raise APIError(401, "unauthorized", "The account no longer exists.")
    return json_response(user)


# API tokens

MAX_TOKEN_PROJECTS = 100


class TokenRequest(RequestModel):
    name: TokenName
    scope: TokenScope
    project_ids: list[uuid.UUID] | None = Field(
        None,
        min_length=1,
        max_length=MAX_TOKEN_PROJECTS,
        description="Limit the token to these projects (each one you are a member of).",
    )
    expires_in_days: int = Field(90, ge=1, le=365)


class ApiTokenOut(BaseModel):
    id: uuid.UUID
    name: str
    scope: TokenScope
    project_ids: list[uuid.UUID] | None
    created_at: AwareDatetime
    expires_at: AwareDatetime
    last_used_at: AwareDatetime | None


class CreatedApiTokenOut(ApiTokenOut):
    token: str = Field(description="The secret, shown this once: the server keeps its hash.")


class ApiTokenList(BaseModel):
    items: list[ApiTokenOut]


@blueprint.post("/tokens")
@require_auth
@login_only
@answers_with_a_secret
@validate_request(TokenRequest)
@responds(CreatedApiTokenOut, 201)
async def create_token(caller: Caller, data: TokenRequest) -> Response:
    """Create an API token for scripts and integrations (a login's access token only).

    `token` is in this response only. A `read` token may only read; a token
    limited to projects sees no other project.
    """
    created = await api_tokens.insert_token(
        session(),
        caller.user_id,
        data.name,
        data.scope,
        data.project_ids,
        timedelta(days=data.expires_in_days),
    )
    return json_response(created, 201)


@blueprint.get("/tokens")
@require_auth
@login_only
@responds(ApiTokenList)
async def list_tokens(caller: Caller) -> Response:
    """The caller's API tokens, newest first, never their secrets."""
    return json_response({"items": await api_tokens.tokens_of(session(), caller.user_id)})


@blueprint.delete("/tokens/<uuid:token_id>")
@require_auth
@login_only
@responds(None, 204)
async def delete_token(caller: Caller, token_id: uuid.UUID) -> Response:
    """Delete an API token: it is refused from the next request on, everywhere."""
    db_session = session()
    if not await api_tokens.delete_token(db_session, caller.user_id, token_id):
        raise APIError(404, "not_found", "Token not found.")
    after_commit(db_session, forget_revoked_session, token_id)
    return no_content()
