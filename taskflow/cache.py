"""A read-through cache in Redis, with the database as the truth.

It holds what authorization and the busiest reads look up again and again:
a caller's role in a project, and a task. Entries are bounded by a TTL; a
write invalidates the names it changed after its commit, for every instance
at once, since they all read the same Redis. Without Redis, or while it does
not answer, every read goes to the database.

An invalidation bumps the name's *generation*, and an entry counts only if it
was filled under the current generation. So a reader that fetched the old row
just before a write committed, and stores it just after the invalidation,
stores an entry that is already void: no read after a successful write can
see the old value, on any instance.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import cast

from quart import current_app
from redis.exceptions import RedisError

from .db import RedisBackoff, backends

ENTRY_SECONDS = 60
# A generation outlives the entries filled under it by far more than any
# reader takes between its database read and its fill.
GENERATION_SECONDS = ENTRY_SECONDS + 600
log = logging.getLogger(__name__)

_backoff = RedisBackoff(
    log, "the cache is bypassed while Redis does not answer", "the cache is used again"
)


def membership(project_id: uuid.UUID, user_id: uuid.UUID) -> str:
    """The name of a user's role in a project (or of their having none)."""
    return f"member:{project_id}:{user_id}"


def task(task_id: uuid.UUID) -> str:
    return f"task:{task_id}"


def _entry_key(name: str) -> str:
    return f"taskflow:cache:{name}"


def _generation_key(name: str) -> str:
    return f"taskflow:cache-generation:{name}"


async def through(name: str, load: Callable[[], Awaitable[bytes]]) -> bytes:
    """The cached value of *name*, or ``load()``'s, which is then cached."""
    redis = backends().redis
    if redis is None or not current_app.config["TASKFLOW"].cache_enabled or not _backoff.ready():
        return await load()
    try:
        # The client returns bytes: it is not made with decode_responses.
        found = cast(list[bytes | None], await redis.mget(_entry_key(name), _generation_key(name)))
    except (RedisError, OSError) as error:
        _backoff.failed(error)
        return await load()
    _backoff.answered()
    entry, generation = found[0], found[1] or b"0"
    if entry is not None:
        filled_under, _, value = entry.partition(b":")
        if filled_under == generation:
            return value
    value = await load()
    try:
        await redis.set(_entry_key(name), generation + b":" + value, ex=ENTRY_SECONDS)
    except (RedisError, OSError) as error:
        _backoff.failed(error)
    return value


async def invalidate(*names: str) -> None:
    """Void the entries of *names* everywhere; called once the change committed."""
    redis = backends().redis
    if redis is None or not names:
        return
    try:
        async with redis.pipeline(transaction=False) as pipeline:
            for name in names:
                pipeline.incr(_generation_key(name))
                pipeline.expire(_generation_key(name), GENERATION_SECONDS)
            await pipeline.execute()
    except (RedisError, OSError) as error:
        # Readers bypass the cache while Redis is away; were it to come back
        # without this invalidation, an entry lives at most ENTRY_SECONDS.
        log.warning("cache invalidation failed: %s", type(error).__name__)
