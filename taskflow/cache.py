"""A read-through cache in Redis, with the database as the truth.

It holds what authorization and the busiest reads look up again and again:
a caller's role in a project, and a task (their keys are made where those are
read: ``access.role_key``, ``data.tasks.task_key``). Entries are bounded by a
TTL; a write invalidates the keys it changed after its commit, for every
instance at once, since they all read the same Redis. Without Redis, or while
it does not answer, every read goes to the database.

An invalidation bumps the key's *generation*, and an entry counts only if it
was filled under the current generation. So a reader that fetched the old row
just before a write committed, and stores it just after the invalidation,
stores an entry that is already void: no read after a successful write can
see the old value, on any instance.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeVar, cast

from quart import current_app, g
from redis.asyncio import Redis

from .db import backends
from .redis_gate import RedisUnavailable

ENTRY_SECONDS = 60
# A generation outlives the entries filled under it by far more than any
# reader takes between its database read and its fill.
GENERATION_SECONDS = ENTRY_SECONDS + 600
log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class CacheKey(Generic[T]):
    """What is cached under *name*, and how its value is stored in Redis."""

    name: str
    encode: Callable[[T], bytes]
    decode: Callable[[bytes], T]

    @property
    def entry(self) -> str:
        return f"taskflow:cache:{self.name}"

    @property
    def generation(self) -> str:
        return f"taskflow:cache-generation:{self.name}"


def enabled() -> bool:
    return bool(current_app.config["TASKFLOW"].cache_enabled)


def redis_keys(keys: Sequence[CacheKey[Any]]) -> list[str]:
    """The Redis keys ``keep_read`` takes the values of: each key's entry and generation."""
    return [name for key in keys for name in (key.entry, key.generation)]


def keep_read(keys: Sequence[CacheKey[Any]], values: Sequence[bytes | None]) -> None:
    """Keep for this request what the limiter's step in Redis read of *keys*
    (the values of their ``redis_keys``), so that ``through`` needs no round
    trip of its own for them."""
    read: dict[str, tuple[bytes | None, bytes | None]] = g.setdefault("cache_read", {})
    for index, key in enumerate(keys):
        read[key.name] = (values[2 * index], values[2 * index + 1])


async def through(key: CacheKey[T], load: Callable[[], Awaitable[T]]) -> T:
    """The cached value of *key*, or ``load()``'s, which is then cached."""
    if not enabled():
        return await load()
    redis = backends().redis
    already_read = g.get("cache_read", {}).pop(key.name, None)
    if already_read is not None:
        entry, generation = already_read
    else:
        try:
            # The client returns bytes: it is not made with decode_responses.
            entry, generation = cast(
                list[bytes | None], await redis.call(lambda r: r.mget(key.entry, key.generation))
            )
        except RedisUnavailable:
            return await load()
    generation = generation or b"0"
    if entry is not None:
        filled_under, _, stored = entry.partition(b":")
        if filled_under == generation:
            return key.decode(stored)
    value = await load()
    filled = generation + b":" + key.encode(value)
    with contextlib.suppress(RedisUnavailable):
        await redis.call(lambda r: r.set(key.entry, filled, ex=ENTRY_SECONDS))
    return value


async def invalidate(*keys: CacheKey[Any]) -> None:
    """Void the entries of *keys* everywhere; called once the change committed."""
    redis = backends().redis
    if not redis.configured or not keys:
        return

    async def bump(client: Redis) -> None:
        async with client.pipeline(transaction=False) as pipeline:
            for key in keys:
                pipeline.incr(key.generation)
                pipeline.expire(key.generation, GENERATION_SECONDS)
            await pipeline.execute()

    try:
        await redis.call(bump)
    except RedisUnavailable:
        # Readers on this instance bypass the cache while Redis is away. An
        # instance that still reads Redis (a partition of this one only) may
        # serve the old entry until it expires: at most ENTRY_SECONDS.
        log.warning("cache invalidation not sent: Redis is unavailable")
