"""API tokens: created with their secret shown once, listed, deleted, and
found by the hash of the secret a request presents."""

from __future__ import annotations

import uuid
from collections.abc import Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TypedDict

from sqlalchemy import bindparam, delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from ..db import rows
from ..errors import validation_failed
from ..models import ApiToken, ProjectMember, TokenScope
from ..tokens import Caller, Scope, new_api_token, token_hash


class ApiTokenRecord(TypedDict):
    id: uuid.UUID
    name: str
    scope: TokenScope
    project_ids: list[uuid.UUID] | None
    created_at: datetime
    expires_at: datetime
    last_used_at: datetime | None


class CreatedApiToken(ApiTokenRecord):
    token: str


TOKEN_FIELDS = (
    ApiToken.id,
    ApiToken.name,
    ApiToken.scope,
    ApiToken.project_ids,
    ApiToken.created_at,
    ApiToken.expires_at,
    ApiToken.last_used_at,
)


def token_record(row: object) -> ApiTokenRecord:
    record: ApiTokenRecord = row._asdict()  # type: ignore[attr-defined]
    ids = record["project_ids"]
    record["project_ids"] = [uuid.UUID(str(i)) for i in ids] if ids is not None else None
    return record


async def insert_token(
    db_session: AsyncSession,
    user_id: uuid.UUID,
    name: str,
    scope: TokenScope,
    project_ids: list[uuid.UUID] | None,
    lifetime: timedelta,
) -> CreatedApiToken:
    """A new token of *user_id*; *project_ids* must all be projects they are a member of."""
    if project_ids is not None:
        wanted = set(project_ids)
        theirs = await db_session.execute(
            select(ProjectMember.project_id).where(
                ProjectMember.user_id == user_id, ProjectMember.project_id.in_(wanted)
            )
        )
        if set(theirs.scalars()) != wanted:
            raise validation_failed(
                [{"field": "project_ids", "message": "must be projects you are a member of"}]
            )
        project_ids = sorted(wanted)
    secret = new_api_token()
    now = datetime.now(UTC)
    token = ApiToken(
        user_id=user_id,
        name=name,
        scope=scope,
        project_ids=[str(i) for i in project_ids] if project_ids is not None else None,
        token_hash=token_hash(secret),
        created_at=now,
        expires_at=now + lifetime,
    )
    db_session.add(token)
    await db_session.flush()
    return {
        "id": token.id,
        "name": name,
        "scope": scope,
        "project_ids": project_ids,
        "created_at": now,
        "expires_at": token.expires_at,
        "last_used_at": None,
        "token": secret,
    }


async def tokens_of(db_session: AsyncSession, user_id: uuid.UUID) -> list[ApiTokenRecord]:
    """The user's tokens, newest first, without their secrets."""
    result = await db_session.execute(
        select(*TOKEN_FIELDS)
        .where(ApiToken.user_id == user_id)
        .order_by(ApiToken.created_at.desc(), ApiToken.id.desc())
    )
    return [token_record(row) for row in result]


async def delete_token(db_session: AsyncSession, user_id: uuid.UUID, token_id: uuid.UUID) -> bool:
    """Delete the user's token; whether there was one."""
    result = await db_session.execute(
        delete(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.user_id == user_id)
        .returning(ApiToken.id)
    )
    return result.first() is not None


@dataclass(frozen=True)
class KnownToken:
    """What a presented token stands for; never changes while the token lives
    (a deleted token is refused by the session check)."""

    caller: Caller
    expires_at: datetime


TOKEN_BY_HASH = select(
    ApiToken.id, ApiToken.user_id, ApiToken.scope, ApiToken.project_ids, ApiToken.expires_at
).where(ApiToken.token_hash == bindparam("token_hash"))


async def find_token(db_session: AsyncSession, presented_hash: str) -> KnownToken | None:
    row = (await rows(db_session, TOKEN_BY_HASH, {"token_hash": presented_hash})).first()
    if row is None:
        return None
    ids = row.project_ids
    caller = Caller(
        user_id=row.user_id,
        session_id=row.id,
        scope=Scope(row.scope),
        project_ids=frozenset(uuid.UUID(str(i)) for i in ids) if ids is not None else None,
        api_token=True,
    )
    return KnownToken(caller, row.expires_at)


LIVE_TOKENS = select(ApiToken.id).where(
    ApiToken.id.in_(bindparam("token_ids", expanding=True)),
    ApiToken.expires_at > bindparam("now"),
)


async def live_tokens(db_session: AsyncSession, token_ids: Collection[uuid.UUID]) -> set[uuid.UUID]:
    """Which of *token_ids* still exist (were not deleted) and have not
    expired, in one query."""
    params = {"token_ids": list(token_ids), "now": datetime.now(UTC)}
    return set((await rows(db_session, LIVE_TOKENS, params)).scalars())


async def note_use(db_session: AsyncSession, token_id: uuid.UUID) -> None:
    await db_session.execute(
        update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=datetime.now(UTC))
    )
