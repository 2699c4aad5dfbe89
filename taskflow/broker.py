"""The event broker: committed events carried to every process of the deployment.

The database's event log is the truth; the broker only makes delivery fast.
With Redis, every process holds one pub/sub connection and hands each message
to its sinks (the WebSocket hub, in ``streams``); without Redis (the embedded
default, a single process) publishing hands the message straight to them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import orjson
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from .jsonio import dumps
from .redis_gate import RedisGate, RedisUnavailable

if TYPE_CHECKING:
    from .data.events import Published

    Sink = Callable[[Published], None]

CHANNEL = "taskflow:events"
RECONNECT_DELAY_SECONDS = 0.5
# How often the receiving loop looks up from Redis to see whether it should stop.
POLL_SECONDS = 0.25
# A subscription that has heard nothing for HEARTBEAT_SECONDS pings Redis; one
# that has heard nothing, not even the answer, for SILENT_SECONDS is lost and
# made again (generous: a busy event loop reads answers late).
HEARTBEAT_SECONDS = 1.0
SILENT_SECONDS = 3.0

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

    @property
    def crosses_processes(self) -> bool:
        """Whether messages travel between processes (and so can be lost on the way)."""
        return False

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
    """Publishes through the Redis gate; receives on a subscription of its own
    that it pings, so that a Redis that stops answering (not only one that
    drops the connection) counts as lost within a heartbeat."""

    def __init__(self, redis: RedisGate) -> None:
        super().__init__()
        self._redis = redis
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.subscribed = asyncio.Event()

    @property
    def connected(self) -> bool:
        # Not while the gate leaves Redis alone: what this process publishes
        # meanwhile does not reach Redis, so its streams read the log.
        return self.subscribed.is_set() and self._redis.healthy

    @property
    def crosses_processes(self) -> bool:
        return True

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
        with contextlib.suppress(RedisUnavailable):
            await self._redis.call(lambda redis: redis.publish(CHANNEL, dumps(message)))

    async def _receive_forever(self) -> None:
        assert self._redis.client is not None  # nosec B101: a RedisBroker has a client
        while not self._closing:
            try:
                async with self._redis.client.pubsub() as pubsub:
                    await self._receive(pubsub)
            except (RedisError, OSError, SubscriptionSilent) as error:
                if self.subscribed.is_set():
                    log.warning("event subscription lost: %s", type(error).__name__)
                self.subscribed.clear()
                await asyncio.sleep(RECONNECT_DELAY_SECONDS)

    async def _receive(self, pubsub: PubSub) -> None:
        await pubsub.subscribe(CHANNEL)
        loop = asyncio.get_running_loop()
        heard_at = pinged_at = probed_at = loop.time()
        while not self._closing:
            message = await pubsub.get_message(timeout=POLL_SECONDS)
            now = loop.time()
            if message is not None:
                heard_at = now
                if message["type"] == "subscribe":
                    self.subscribed.set()
                elif message["type"] == "message":
                    self.dispatch(orjson.loads(message["data"]))
            if now - heard_at > SILENT_SECONDS:
                raise SubscriptionSilent
            if now - heard_at >= HEARTBEAT_SECONDS and now - pinged_at >= HEARTBEAT_SECONDS:
                await pubsub.ping()
                pinged_at = now
            if not self._redis.healthy and now - probed_at >= HEARTBEAT_SECONDS:
                # Probe for the gate too, so that it learns Redis is back even
                # when no request comes to try (this process only streams).
                probed_at = now
                with contextlib.suppress(RedisUnavailable):
                    await self._redis.call(lambda redis: redis.ping())


class SubscriptionSilent(Exception):
    """Redis stopped answering on the subscription's connection."""
