"""The data model: typed SQLAlchemy 2.0 tables for PostgreSQL and SQLite alike."""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    Uuid,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware timestamp that always comes back in UTC.

    SQLite keeps no offset, so values are stored as UTC and marked UTC again
    when read; naive values are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# JSONB on PostgreSQL (compact, indexable), plain JSON text elsewhere.
JSONDocument = JSON().with_variant(JSONB(), "postgresql")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map: ClassVar[dict[Any, Any]] = {datetime: UTCDateTime, uuid.UUID: Uuid}


class TaskStatus(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"


class TokenScope(enum.StrEnum):
    READ = "read"
    WRITE = "write"


class MemberRole(enum.StrEnum):
    OWNER = "owner"
    MEMBER = "member"


def _enum(enum_class: type[enum.Enum], name: str) -> Enum:
    return Enum(enum_class, name=name, values_callable=lambda e: [m.value for m in e])


class User(Base):
    __tablename__ = "users"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    email: Mapped[str] = mapped_column(String(254), unique=True)
    password_hash: Mapped[str] = mapped_column(String(60))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuthSession(Base):
    """One login: the refresh-token family that rotation and revocation act on."""

    __tablename__ = "auth_sessions"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # SHA-256 of the one refresh token of this session that may still be spent,
    # and of the one spent before it, when (a client's concurrent refreshes
    # present it again for a few seconds; later, it is a thief's).
    refresh_token_hash: Mapped[str] = mapped_column(String(64))
    spent_refresh_token_hash: Mapped[str | None] = mapped_column(String(64))
    refreshed_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    revoked_at: Mapped[datetime | None]


class ApiToken(Base):
    """A long-lived token for scripts and integrations: only its hash is kept.

    Its id serves as a login session's would: the session check (a Redis mark,
    else this table) is how a deleted token is refused everywhere."""

    __tablename__ = "api_tokens"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    name: Mapped[str] = mapped_column(String(100))
    scope: Mapped[TokenScope] = mapped_column(_enum(TokenScope, "token_scope"))
    # The projects it is limited to (ids as strings); null: all of the user's.
    project_ids: Mapped[list[str] | None] = mapped_column(JSONDocument)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)  # SHA-256
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime]
    last_used_at: Mapped[datetime | None]


class Project(Base):
    __tablename__ = "projects"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    description: Mapped[str | None] = mapped_column(Text)
    owner_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    # Bumped on every write of the project's own fields; its ETag names it.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class ProjectMember(Base):
    """Who may see a project; the owner has a row too, with the role ``owner``."""

    __tablename__ = "project_members"
    __table_args__ = (Index(None, "user_id", "project_id"),)

    project_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("projects.id", ondelete="CASCADE"), primary_key=True
    )
    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    role: Mapped[MemberRole] = mapped_column(_enum(MemberRole, "member_role"))
    added_at: Mapped[datetime] = mapped_column(default=utcnow)


SEARCH_DOCUMENT = "to_tsvector('simple', title || ' ' || coalesce(description, ''))"


class Task(Base):
    __tablename__ = "tasks"
    __table_args__ = (
        # One index per sort order of the task list, each ending in id for keyset paging.
        Index(None, "project_id", "created_at", "id"),
        Index(None, "project_id", "updated_at", "id"),
        Index(None, "project_id", "due_date", "id"),
        Index(None, "project_id", "title", "id"),
        Index(None, "assignee_id", "project_id"),
        # Full-text search, on PostgreSQL only (the embedded default searches by
        # substring): the very expression the task list's `q` filter uses.
        Index("ix_tasks_search", text(SEARCH_DOCUMENT), postgresql_using="gin").ddl_if(
            dialect="postgresql"
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(500))
    description: Mapped[str | None] = mapped_column(Text)
    status: Mapped[TaskStatus] = mapped_column(
        _enum(TaskStatus, "task_status"), default=TaskStatus.PENDING
    )
    assignee_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL")
    )
    due_date: Mapped[datetime | None]
    # Bumped on every write; the ETag is derived from it and If-Match compares it.
    version: Mapped[int] = mapped_column(Integer, default=1, server_default=text("1"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)


class Event(Base):
    """The event log: one row per write, the source of truth for the live feed."""

    __tablename__ = "events"
    __table_args__ = (Index(None, "project_id", "id"),)

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    # The event's kind (`task.created`…): a column named as the contract's field.
    kind: Mapped[str] = mapped_column("event", String(32))
    actor_id: Mapped[uuid.UUID | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    occurred_at: Mapped[datetime] = mapped_column(default=utcnow)
    data: Mapped[dict[str, Any]] = mapped_column(JSONDocument)
    changes: Mapped[dict[str, Any] | None] = mapped_column(JSONDocument)


class IdempotencyKey(Base):
    """A caller's ``Idempotency-Key`` and the response its request got, kept
    for a while; written in the transaction of the request's own write."""

    __tablename__ = "idempotency_keys"

    user_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"), primary_key=True
    )
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    # SHA-256 of the request's method, path and body: what a repeat must match.
    fingerprint: Mapped[str] = mapped_column(String(64))
    status: Mapped[int] = mapped_column(Integer)
    headers: Mapped[dict[str, str]] = mapped_column(JSONDocument)
    body: Mapped[bytes] = mapped_column(LargeBinary)
    expires_at: Mapped[datetime] = mapped_column(index=True)


class Webhook(Base):
    """A URL the project's events are POSTed to, and where its delivery stands.

    ``position`` is the id of the last event of the project it has finished
    (delivered, filtered out or given up): events go out one at a time, each
    after the one before it, so ordering and replay are a matter of moving it.
    ``attempt`` counts the failures of the event after it. A deliverer holds
    the webhook while ``lease_until`` lies ahead (``lease_owner`` names its
    claim), so that no two processes send to it at once.
    """

    __tablename__ = "webhooks"
    __table_args__ = (Index(None, "project_id", "created_at"), Index(None, "next_attempt_at"))

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    project_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("projects.id", ondelete="CASCADE"))
    url: Mapped[str] = mapped_column(String(2048))
    # The kinds of event it receives; null: every kind.
    events: Mapped[list[str] | None] = mapped_column(JSONDocument)
    description: Mapped[str | None] = mapped_column(Text)
    # Kept as given (signing is an HMAC, which needs the key itself); the
    # previous one signs too, until `previous_secret_until`, after a rotation.
    secret: Mapped[str] = mapped_column(String(100))
    previous_secret: Mapped[str | None] = mapped_column(String(100))
    previous_secret_until: Mapped[datetime | None]
    active: Mapped[bool] = mapped_column(default=True)
    disabled_reason: Mapped[str | None] = mapped_column(String(200))
    position: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime] = mapped_column(default=utcnow)
    lease_until: Mapped[datetime | None]
    lease_owner: Mapped[uuid.UUID | None]
    failing_since: Mapped[datetime | None]
    last_success_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class WebhookDelivery(Base):
    """One attempt to deliver an event to a webhook: its delivery log, read
    newest first, the oldest rows purged as new ones come."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index(None, "webhook_id", "attempted_at", "id"),)

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid.uuid4)
    webhook_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("webhooks.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigInteger)
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(String(300))
    duration_ms: Mapped[int] = mapped_column(Integer)
    attempted_at: Mapped[datetime]
