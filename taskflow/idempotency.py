"""Idempotency keys: a POST or PATCH retried with its ``Idempotency-Key`` is
answered once, as the IETF draft "The Idempotency-Key HTTP Header Field" and
Stripe have it.

A key belongs to the caller (the user of the bearer token). The first request
with it claims it (``claim``, before the view runs), and its response is
stored in the same transaction as the write it made (``keep``, just before
the request's commit), so no crash can leave a write without its key or a key
without its write. A repeat of that request gets the stored response;
anything else with the key is refused.

Concurrent requests with one key are told apart by the database: on
PostgreSQL the claim is a transaction-scoped advisory lock, which every
instance sees and the commit or rollback releases (a repeat that finds it
held is a 409). The embedded SQLite runs one writing transaction at a time,
so a repeat waits for the first request to finish and gets its replay.

Kept keys expire after ``KEEP_FOR``; each request that keeps one deletes a
batch of expired ones, so the table needs no cron.

A response that carries a secret (a new API token, a webhook's signing
secret) is never kept: TaskFlow stores no secret it could hand back. Such
routes (``answers_with_a_secret``), like those without a bearer token, check
a key's form and keep nothing.
"""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

from quart import Quart, Response, current_app, g, request
from sqlalchemy import bindparam, delete, func, insert, select, tuple_
from sqlalchemy.ext.asyncio import AsyncSession

from .db import commit_even_if_refused, roll_back, rows, session
from .errors import APIError
from .models import IdempotencyKey
from .security import REQUIRES_AUTH_ATTRIBUTE, request_caller

KEEPS_NO_RESPONSE_ATTRIBUTE = "_taskflow_keeps_no_response"
KEY_HEADER = "Idempotency-Key"
REPLAYED_HEADER = "Idempotent-Replayed"
KEYED_METHODS = ("POST", "PATCH")
KEEP_FOR = timedelta(hours=24)
# Responses a retry must not see again: it runs anew.
NEVER_KEPT = (401, 429)
KEPT_HEADERS = ("Content-Type", "Location", "ETag")
PURGE_BATCH = 100
IN_PROGRESS_RETRY_AFTER_SECONDS = 1

VISIBLE_ASCII = re.compile(r"[\x21-\x7e]{1,255}")
# An RFC 8941 string: printable ASCII, with `"` and `\` escaped by a backslash.
QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')


F = TypeVar("F", bound=Callable[..., Any])


def answers_with_a_secret(view: F) -> F:
    """Mark a route whose response carries a secret: its key is never kept."""
    setattr(view, KEEPS_NO_RESPONSE_ATTRIBUTE, True)
    return view


def keeps_responses(view: Callable[..., Any] | None, method: str) -> bool:
    """Whether a request to *view* with a key has its response kept."""
    return (
        method.upper() in KEYED_METHODS
        and getattr(view, REQUIRES_AUTH_ATTRIBUTE, False)
        and not getattr(view, KEEPS_NO_RESPONSE_ATTRIBUTE, False)
    )


def key_of_request() -> str | None:
    """The request's key, None without one; a 400 for a malformed one."""
    values = request.headers.getlist(KEY_HEADER)
    if not values:
        return None
    key = parse_key(values[0]) if len(values) == 1 else None
    if key is None:
        raise APIError(
            400,
            "invalid_idempotency_key",
            f"{KEY_HEADER} must be one value of 1 to 255 visible ASCII characters.",
        )
    return key


def parse_key(value: str) -> str | None:
    """The key a header value names (None: malformed): 1-255 visible ASCII
    characters, bare or in the quoted form (a value that starts and ends with
    `"` is read as the quoted form)."""
    key = value
    if len(value) > 1 and value[0] == value[-1] == '"':
        quoted = QUOTED.fullmatch(value)
        key = re.sub(r"\\(.)", r"\1", quoted.group(1)) if quoted is not None else ""
    return key if VISIBLE_ASCII.fullmatch(key) else None


@dataclass(frozen=True)
class Claim:
    """A key this request holds: its response is to be kept."""

    user_id: uuid.UUID
    key: str
    fingerprint: str

    @property
    def lock_id(self) -> int:
        digest = hashlib.sha256(f"{self.user_id}:{self.key}".encode()).digest()
        return int.from_bytes(digest[:8], "big", signed=True)


def fingerprint(body: bytes) -> str:
    """What a repeat must match: the method, the path and the body, byte for byte."""
    digest = hashlib.sha256(f"{request.method} {request.path}\n".encode())
    digest.update(body)
    return digest.hexdigest()


KEPT = select(
    IdempotencyKey.fingerprint,
    IdempotencyKey.status,
    IdempotencyKey.headers,
    IdempotencyKey.body,
).where(IdempotencyKey.user_id == bindparam("user_id"), IdempotencyKey.key == bindparam("key"))
FORGET_EXPIRED = delete(IdempotencyKey).where(
    IdempotencyKey.user_id == bindparam("user_id"),
    IdempotencyKey.key == bindparam("key"),
    IdempotencyKey.expires_at <= bindparam("now"),
)
# Expired keys, a batch at a time; on PostgreSQL skipping those another
# request is deleting, so that concurrent purges never wait for each other.
EXPIRED = (
    select(IdempotencyKey.user_id, IdempotencyKey.key)
    .where(IdempotencyKey.expires_at <= bindparam("now"))
    .order_by(IdempotencyKey.expires_at)
    .limit(PURGE_BATCH)
    .with_for_update(skip_locked=True)
)
PURGE = delete(IdempotencyKey).where(
    tuple_(IdempotencyKey.user_id, IdempotencyKey.key).in_(EXPIRED)
)


async def _lock(db_session: AsyncSession, claim: Claim) -> bool:
    """Take the claim's lock for this transaction; False if another holds it.

    SQLite has no such lock and needs none: the transaction's first statement
    takes the database's write lock, which serialises this with every claim.
    """
    if db_session.get_bind().dialect.name != "postgresql":
        return True
    locked = await rows(db_session, select(func.pg_try_advisory_xact_lock(claim.lock_id)))
    return bool(locked.scalar_one())


async def kept_response(db_session: AsyncSession, claim: Claim) -> Any | None:
    """The response kept for the claim's key, if one is (an expired one is deleted)."""
    params = {"user_id": claim.user_id, "key": claim.key}
    await rows(db_session, FORGET_EXPIRED, {**params, "now": datetime.now(UTC)})
    return (await rows(db_session, KEPT, params)).first()


def in_progress() -> APIError:
    return APIError(
        409,
        "conflict",
        f"A request with this {KEY_HEADER} is still running; retry it later.",
        headers={"Retry-After": str(IN_PROGRESS_RETRY_AFTER_SECONDS)},
    )


async def claim_key() -> Response | None:
    """Before the view of a keyed POST or PATCH: claim its key, or answer a
    repeat with the kept response (None: the view runs)."""
    if request.method not in KEYED_METHODS:
        return None
    key = key_of_request()
    view = current_app.view_functions.get(request.endpoint or "")
    if key is None or not keeps_responses(view, request.method):
        return None  # see the README: the routes without a bearer token keep nothing
    caller = await request_caller()
    if caller is None:
        return None  # the view answers 401
    claim = Claim(caller.user_id, key, fingerprint(await request.get_data(True, False, False)))
    db_session = session()
    if not await _lock(db_session, claim):
        raise in_progress()
    kept = await kept_response(db_session, claim)
    if kept is not None:
        if kept.fingerprint != claim.fingerprint:
            raise APIError(
                422,
                "idempotency_key_reused",
                f"This {KEY_HEADER} was used for another request (method, path or body).",
            )
        return Response(kept.body, kept.status, headers={**kept.headers, REPLAYED_HEADER: "true"})
    g.idempotency_claim = claim
    return None


async def keep_response(response: Response) -> Response:
    """Store the response of a request that claimed a key, to commit with its write.

    A refusal (a 404, 409, 412, 422…) wrote nothing: its transaction is rolled
    back, the key claimed again and kept alone. 401, 429 and 5xx are not kept.
    """
    claim: Claim | None = g.idempotency_claim if "idempotency_claim" in g else None
    if claim is None or response.status_code in NEVER_KEPT or response.status_code >= 500:
        return response
    db_session = session()
    if response.status_code >= 400 and not db_session.info.get("commit_even_if_refused"):
        await roll_back(db_session)
        # Between the rollback and this claim a repeat may have run (and kept
        # its own response), or be running: then this one is not kept.
        if not await _lock(db_session, claim) or await kept_response(db_session, claim):
            return response
        commit_even_if_refused(db_session)
    now = datetime.now(UTC)
    await rows(db_session, PURGE, {"now": now})
    headers = {name: response.headers[name] for name in KEPT_HEADERS if name in response.headers}
    await rows(
        db_session,
        insert(IdempotencyKey).values(
            user_id=claim.user_id,
            key=claim.key,
            fingerprint=claim.fingerprint,
            status=response.status_code,
            headers=headers,
            body=await response.get_data(as_text=False),
            expires_at=now + KEEP_FOR,
        ),
    )
    return response


def init_app(app: Quart) -> None:
    """Register the claim and the keeping; after the rate limiter (a refused
    request claims nothing) and after ``db.init_app`` (after-request hooks run
    in reverse: the response is kept before ``db.finish_request`` commits)."""
    app.before_request(claim_key)
    app.after_request(keep_response)
