"""The event broker: committed events fanned out to this process's listeners.

The database's event log is the truth; the broker only makes delivery fast.
With Redis, every process holds one pub/sub connection and fans each message
out in memory to its own listeners; without Redis (the embedded default, a
single process) publishing hands the event straight to the listeners.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import orjson
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from .jsonio import dumps

EventDict = dict[str, Any]
Listener = Callable[[EventDict], None]

CHANNEL = "taskflow:events"
RECONNECT_DELAY_SECONDS = 0.5
# How often the receiving loop looks up from Redis to see whether it should stop.
POLL_SECONDS = 0.25

log = logging.getLogger(__name__)


class Broker:
    """Keeps the listeners per project; subclasses decide how events arrive.

    Listeners are plain callables that must not block: they hand the event to
    a queue of their own.
    """

    def __init__(self) -> None:
        self._listeners: defaultdict[str, set[Listener]] = defaultdict(set)

    def add_listener(self, project_id: str, listener: Listener) -> None:
        self._listeners[project_id].add(listener)

    def remove_listener(self, project_id: str, listener: Listener) -> None:
        listeners = self._listeners.get(project_id)
        if listeners is not None:
            listeners.discard(listener)
            if not listeners:
                del self._listeners[project_id]

    def dispatch(self, event: EventDict) -> None:
        for listener in tuple(self._listeners.get(event["project_id"], ())):
            listener(event)

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None

    async def publish(self, event: EventDict) -> None:
        raise NotImplementedError


class InProcessBroker(Broker):
    async def publish(self, event: EventDict) -> None:
        self.dispatch(event)


class RedisBroker(Broker):
    def __init__(self, redis: aioredis.Redis) -> None:
        super().__init__()
        self._redis = redis
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = asyncio.Event()

    async def start(self) -> None:
        self._task = asyncio.create_task(self._receive_forever(), name="redis-broker")

    async def close(self) -> None:
        # Stopped by a flag, not by cancelling: redis-py can swallow a
        # cancellation that lands mid-read and go on reading forever.
        self._closing = True
        if self._task is not None:
            await self._task

    async def publish(self, event: EventDict) -> None:
        # The event is already committed to the log; a Redis outage must not
        # fail the request that wrote it. Subscribers catch up from the log.
        try:
            await self._redis.publish(CHANNEL, dumps(event))
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
