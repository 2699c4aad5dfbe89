"""The one health policy for Redis, shared by everything in a process that uses it.

Redis only makes TaskFlow faster and shared (limits, the cache, session
marks, live events); the database and process memory can stand in for it. So
a Redis that refuses connections, stops answering or answers slowly must cost
a request at most one short deadline, never a timeout per call:

- every call has a deadline (``TASKFLOW_REDIS_TIMEOUT_MS``);
- after a failure or a missed deadline, every caller skips Redis for a
  back-off window (``TASKFLOW_REDIS_BACKOFF_MS``) and uses its fallback at
  once;
- when the window is over, one caller probes (the others keep skipping while
  it does, for at most one deadline), and Redis is back if it answers.

Callers write one pattern: ``await gate.call(lambda redis: redis.get(key))``
and, on ``RedisUnavailable``, their fallback. The same exception stands for
"no Redis configured", so the embedded default takes the fallback path too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

import redis.asyncio as aioredis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis is not configured, backed off, or just failed; use the fallback."""


class RedisGate:
    def __init__(
        self, client: aioredis.Redis | None, deadline_seconds: float, backoff_seconds: float
    ) -> None:
        self.client = client
        self.deadline = deadline_seconds
        self.backoff = backoff_seconds
        self._down_since: float | None = None
        self._skip_until = 0.0
        self._dropping: asyncio.Task[None] | None = None

    @property
    def configured(self) -> bool:
        return self.client is not None

    @property
    def healthy(self) -> bool:
        """Whether Redis answered the last call made through this gate."""
        return self.client is not None and self._down_since is None

    async def close(self) -> None:
        if self._dropping is not None:
            await self._dropping
        if self.client is not None:
            await self.client.aclose()

    async def call(self, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """``command(redis)``'s result, within the deadline; ``RedisUnavailable``
        at once while Redis is backed off, or when this call fails."""
        client = self.client
        now = time.monotonic()
        if client is None or now < self._skip_until:
            raise RedisUnavailable
        if self._down_since is not None:
            # This call is the probe: the others skip until it is over (a
            # deadline, and the one extension a late event loop gives it).
            self._skip_until = now + 2 * self.deadline
        return await self._attempt(command, client)

    async def probe(self) -> bool:
        """Whether Redis answers a PING now, back-off or not (for ``/readyz``)."""
        if self.client is None:
            return False
        try:
            await self._attempt(lambda redis: redis.ping(), self.client)
        except RedisUnavailable:
            return False
        return True

    async def _attempt(
        self, command: Callable[[aioredis.Redis], Awaitable[T]], client: aioredis.Redis
    ) -> T:
        try:
            async with asyncio.timeout(None) as timeout:
                deadline = Deadline(timeout, self.deadline)
                try:
                    result = await command(client)
                finally:
                    deadline.cancel()
        except (RedisError, OSError, TimeoutError) as error:
            self._failed(error)
            if self._dropping is None or self._dropping.done():
                self._dropping = asyncio.create_task(self._drop_idle_connections(client))
            raise RedisUnavailable from error
        self._answered()
        return result

    @staticmethod
    async def _drop_idle_connections(client: aioredis.Redis) -> None:
        """The pool's idle connections are likely as broken as the one that
        failed (a Redis restarted, a failover): dropped, in the background,
        so that the probe after the back-off connects afresh rather than find
        the next broken one."""
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await client.connection_pool.disconnect(inuse_connections=False)

    def _failed(self, error: Exception) -> None:
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "Redis did not answer (%s): limits, the cache, session checks and live "
                "events fall back to process memory and the database",
                type(error).__name__,
            )
        self._skip_until = now + self.backoff

    def _answered(self) -> None:
        if self._down_since is not None:
            log.warning(
                "Redis answers again after %.1f s: shared state is back",
                time.monotonic() - self._down_since,
            )
            self._down_since = None
            self._skip_until = 0.0


class Deadline:
    """Ends an ``asyncio.timeout`` block once Redis has had *seconds* to answer.

    A deadline on Redis, not on this process's event loop: in a burst, the
    loop can be too busy to read a reply that arrived in time (a hundred
    requests at once on one worker delay each turn of the loop by 150 ms and
    more). So when the deadline passes while the loop runs late, the call is
    given once more as long as the loop was late (at most the deadline again),
    and the block ends only after the loop's turn: a reply read in that turn
    still wins.
    """

    def __init__(self, timeout: asyncio.Timeout, seconds: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout, self._seconds = timeout, seconds
        self._due = self._loop.time() + seconds
        self._extended = False
        self._handle = self._loop.call_at(self._due, self._passed)

    def cancel(self) -> None:
        self._handle.cancel()

    def _passed(self) -> None:
        now = self._loop.time()
        late = now - self._due
        if late > self._seconds / 10 and not self._extended:
            self._extended = True
            self._due = now + min(late, self._seconds)
            self._handle = self._loop.call_at(self._due, self._passed)
        else:
            # A time already past is scheduled with call_soon: after the wake-ups
            # of this turn.
            self._timeout.reschedule(now)
