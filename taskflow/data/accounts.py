"""Users and their login sessions (the refresh-token families)."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta
from typing import TypedDict

from sqlalchemy import bindparam, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import rows
from ..errors import APIError
from ..models import AuthSession, User
from ..schemas import normalize_email
from ..tokens import REFRESH_TOKEN_LIFETIME, Caller, IssuedTokens, issue_tokens


class UserRecord(TypedDict):
    id: uuid.UUID
    email: str
    created_at: datetime


def user_record(user: User) -> UserRecord:
    return {"id": user.id, "email": user.email, "created_at": user.created_at}


async def create_user(db_session: AsyncSession, email: str, password_hash: str) -> UserRecord:
    user = User(email=email, password_hash=password_hash)
    db_session.add(user)
    try:
        await db_session.flush()
    except IntegrityError:
        raise APIError(409, "conflict", "That email is already registered.") from None
    return user_record(user)


async def get_user(db_session: AsyncSession, user_id: uuid.UUID) -> UserRecord | None:
    user = await db_session.get(User, user_id)
    return user_record(user) if user is not None else None


async def find_user_by_email(db_session: AsyncSession, email: str) -> User | None:
    try:
        normalized = normalize_email(email)
    except ValueError:
        return None
    result = await db_session.execute(select(User).where(User.email == normalized))
    return result.scalar_one_or_none()


async def start_session(
    db_session: AsyncSession, user_id: uuid.UUID, secret_key: str
) -> IssuedTokens:
    caller = Caller(user_id, uuid.uuid4())
    tokens = issue_tokens(caller, secret_key)
    db_session.add(
        AuthSession(
            id=caller.session_id,
            user_id=user_id,
            refresh_token_hash=tokens.refresh_token_hash,
            expires_at=datetime.now(UTC) + REFRESH_TOKEN_LIFETIME,
        )
    )
    await db_session.flush()
    return tokens


async def rotate_refresh_token(
    db_session: AsyncSession, caller: Caller, presented_hash: str, secret_key: str
) -> IssuedTokens | None:
    """Swap the session's one live refresh token for a new pair, atomically.

    The conditional UPDATE matches only while the presented token is the live
    one, so of concurrent refreshes with one token exactly one wins.
    """
    tokens = issue_tokens(caller, secret_key)
    now = datetime.now(UTC)
    result = await db_session.execute(
        update(AuthSession)
        .where(
            AuthSession.id == caller.session_id,
            AuthSession.user_id == caller.user_id,
            AuthSession.refresh_token_hash == presented_hash,
            AuthSession.revoked_at.is_(None),
            AuthSession.expires_at > now,
        )
        .values(
            refresh_token_hash=tokens.refresh_token_hash,
            spent_refresh_token_hash=presented_hash,
            refreshed_at=now,
        )
        .returning(AuthSession.id)
    )
    return tokens if result.first() is not None else None


async def spent_moments_ago(
    db_session: AsyncSession, caller: Caller, presented_hash: str, within: timedelta
) -> bool:
    """Whether the presented refresh token is the live session's last spent one,
    spent no longer than *within* ago: a concurrent refresh of the same client,
    not a thief's replay."""
    result = await db_session.execute(
        select(AuthSession.id).where(
            AuthSession.id == caller.session_id,
            AuthSession.spent_refresh_token_hash == presented_hash,
            AuthSession.refreshed_at > datetime.now(UTC) - within,
            AuthSession.revoked_at.is_(None),
        )
    )
    return result.first() is not None


async def revoke_session(db_session: AsyncSession, session_id: uuid.UUID) -> bool:
    """Revoke a session; whether it was live until now."""
    result = await db_session.execute(
        update(AuthSession)
        .where(AuthSession.id == session_id, AuthSession.revoked_at.is_(None))
        .values(revoked_at=datetime.now(UTC))
        .returning(AuthSession.id)
    )
    return result.first() is not None


LIVE_SESSIONS = select(AuthSession.id).where(
    AuthSession.id.in_(bindparam("session_ids", expanding=True)),
    AuthSession.revoked_at.is_(None),
    AuthSession.expires_at > bindparam("now"),
)


async def live_sessions(
    db_session: AsyncSession, session_ids: Collection[uuid.UUID]
) -> set[uuid.UUID]:
    """Which of *session_ids* are live, in one query."""
    params = {"session_ids": list(session_ids), "now": datetime.now(UTC)}
    return set((await rows(db_session, LIVE_SESSIONS, params)).scalars())
