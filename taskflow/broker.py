"""The event broker: committed events carried to every process of the deployment.

The database's event log is the truth; the broker only makes delivery fast.
With Redis, every process holds one pub/sub connection and hands each message
to its sinks (the WebSocket hub, in ``streams``); without Redis (the embedded
default, a single process) publishing hands the message straight to them.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .jsonio import dumps

if TYPE_CHECKING:
    from .data.events import Published

    Sink = Callable[[Published], None]

CHANNEL = "taskflow:events"
RECONNECT_DELAY_SECONDS = 0.5
# How often the receiving loop looks up from Redis to see whether it should stop.
POLL_SECONDS = 0.25

log = logging.getLogger(__name__)


class Broker:
    """Hands every published message to this process's sinks.

    Sinks are plain callables that must not block: they hand the message to a
    queue of their own.
    """

    def __init__(self) -> None:
        self._sinks: list[Sink] = []

    def subscribe(self, sink: Sink) -> None:
        self._sinks.append(sink)

    def unsubscribe(self, sink: Sink) -> None:
        self._sinks.remove(sink)

    def dispatch(self, message: Published) -> None:
        for sink in tuple(self._sinks):
            sink(message)

    @property
    def connected(self) -> bool:
        """Whether messages published elsewhere reach this process right now."""
        return True

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, message: Published) -> None:
        raise NotImplementedError


class InProcessBroker(Broker):
    async def publish(self, message: Published) -> None:
        self.dispatch(message)


class RedisBroker(Broker):
    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__()
        self._redis = redis
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = asyncio.Event()

    @property
    def connected(self) -> bool:
        return self.subscribed.is_set()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._receive_forever(), name="redis-broker")

    async def close(self) -> None:
        # Stopped by a flag, not by cancelling: redis-py can swallow a
        # cancellation that lands mid-read and go on reading forever.
        self._closing = True
        if self._task is not None:
            await self._task

    async def publish(self, message: Published) -> None:
        # The event is already committed to the log; a Redis outage must not
        # fail the request that wrote it. Subscribers catch up from the log.
        try:
            await self._redis.publish(CHANNEL, dumps(message))
        except (RedisError, OSError) as error:
            log.warning("event not published: %s", type(error).__name__)

    async def _receive_forever(self) -> None:
        while not self._closing:
            try:
                async with self._redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CHANNEL)
                    self.subscribed.set()
                    while not self._closing:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=POLL_SECONDS
                        )
                        if message is not None:
                            self.dispatch(orjson.loads(message["data"]))
            except (RedisError, OSError) as error:
                if self.subscribed.is_set():
                    log.warning("event subscription lost: %s", type(error).__name__)
                self.subscribed.clear()
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)
