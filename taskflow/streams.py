"""Fan-out: this process's per-project event streams and their subscriptions.

The ``Hub`` keeps one *stream* per project that has local subscribers. A
stream turns the broker's messages into the project's events in log order
with no gap: every message names the event before it (``prev_id``), and a
stream that finds one missing (still on its way from another instance, or
lost while Redis was away) reads the gap from the event log. While the broker
is disconnected, streams poll the log instead; while it is connected, the hub
still compares each stream's position with the log's once a second, so
that an event whose publisher could not reach Redis (a partition of that
instance only) arrives anyway.

A ``Subscription`` is one socket's interest in one project: until the socket
has caught up with the stream from the log, then live.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Protocol

import orjson
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from .broker import Broker
from .data.events import (
    Envelope,
    EventKind,
    Published,
    events_after,
    latest_event_id,
    latest_event_ids,
)

log = logging.getLogger(__name__)

POLL_SECONDS = 0.5
# How often, while the broker is connected, the hub compares each stream with
# the log (an event committed a look ago and not brought by then was lost: its
# publisher could not reach Redis).
LOG_LOOK_SECONDS = 1.0


def frame_of(message: object) -> str:
    """A message as one WebSocket text frame."""
    return orjson.dumps(message).decode()


class Subscriber(Protocol):
    """What a subscription needs of its socket."""

    user_id: uuid.UUID

    def enqueue(self, frame: str) -> None: ...

    def end_subscription(self, subscription: Subscription, reason: str) -> None: ...


class EventLog(Protocol):
    """Where streams read what the broker did not bring."""

    def after(self, project_id: uuid.UUID, since: int) -> AsyncIterator[Envelope]: ...

    async def latest_id(self, project_id: uuid.UUID) -> int: ...

    async def latest_ids(self, project_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]: ...


class DatabaseLog:
    """The event log in the database, each read in a short session of its own."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession]) -> None:
        self._sessionmaker = sessionmaker

    async def after(self, project_id: uuid.UUID, since: int) -> AsyncIterator[Envelope]:
        async with self._sessionmaker() as db_session:
            async for event in events_after(db_session, project_id, since):
                yield event

    async def latest_id(self, project_id: uuid.UUID) -> int:
        async with self._sessionmaker() as db_session:
            return await latest_event_id(db_session, project_id)

    async def latest_ids(self, project_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        async with self._sessionmaker() as db_session:
            return await latest_event_ids(db_session, project_ids)


class Subscription:
    """One socket's subscription to one project.

    Until it goes live, its socket is being sent the project's log (paced by
    the reader, see ``ws``) and the stream's events are left to that, but for a
    ``project.deleted``, which the log loses with the project. Live, each of
    the stream's events is passed on once, in order. A ``member.removed`` of
    the subscriber later than the log position at which the membership was
    confirmed (``member_at``) ends the subscription unsent; a
    ``project.deleted`` ends it once sent.
    """

    def __init__(self, subscriber: Subscriber, project_id: uuid.UUID) -> None:
        self.subscriber = subscriber
        self.project_id = project_id
        self.member_at = 0
        self.last_id = 0
        self.live = False
        self.ended = False
        self._deleted: tuple[Envelope, str] | None = None

    def offer(self, event: Envelope, frame: str) -> None:
        """Take the stream's next event."""
        if self.live:
            self.pass_on(event, frame)
        elif event["event"] == EventKind.PROJECT_DELETED:
            self._deleted = (event, frame)

    def go_live(self) -> None:
        self.live = True
        if self._deleted is not None:
            self.pass_on(*self._deleted)

    def admit(self, event: Envelope) -> bool:
        """Whether *event* is to be sent: each once, in order. Ends the
        subscription at a removal of the subscriber."""
        if self.ended or event["id"] <= self.last_id:
            return False
        self.last_id = event["id"]
        if (
            event["event"] == EventKind.MEMBER_REMOVED
            and event["id"] > self.member_at
            and event["data"].get("user_id") == str(self.subscriber.user_id)
        ):
            self.subscriber.end_subscription(self, "removed")
            return False
        return True

    def sent(self, event: Envelope) -> None:
        if event["event"] == EventKind.PROJECT_DELETED:
            self.subscriber.end_subscription(self, "project_deleted")

    def pass_on(self, event: Envelope, frame: str) -> None:
        if self.admit(event):
            self.subscriber.enqueue(frame)
            self.sent(event)


class Stream:
    """This process's view of one project's events: in log order, no gap.

    Messages are queued from construction on; they are read once ``start``
    says where the log stood.
    """

    def __init__(self, project_id: uuid.UUID, event_log: EventLog) -> None:
        self.project_id = project_id
        self.last_id = 0
        self.subscriptions: set[Subscription] = set()
        self._log = event_log
        self._inbox: asyncio.Queue[Published | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self, last_id: int) -> None:
        self.last_id = last_id
        self._task = asyncio.create_task(self._run(), name=f"stream-{self.project_id}")

    def stop(self) -> asyncio.Task[None] | None:
        if self._task is not None:
            self._task.cancel()
        return self._task

    def receive(self, message: Published) -> None:
        self._inbox.put_nowait(message)

    def catch_up(self) -> None:
        """Read the log for whatever the broker has not brought."""
        self._inbox.put_nowait(None)

    async def _run(self) -> None:
        while True:
            message = await self._inbox.get()
            try:
                if message is None:
                    await self._read_log()
                elif message["envelope"]["id"] <= self.last_id:
                    continue  # already delivered, from the log
                else:
                    if message["prev_id"] > self.last_id:
                        await self._read_log(before=message["envelope"]["id"])
                    self._deliver(message["envelope"])
            except Exception:  # a database hiccup: read the log again shortly
                log.exception("stream %s could not read the event log", self.project_id)
                asyncio.get_running_loop().call_later(POLL_SECONDS, self.catch_up)

    async def _read_log(self, before: int | None = None) -> None:
        async for event in self._log.after(self.project_id, self.last_id):
            if before is not None and event["id"] >= before:
                return
            self._deliver(event)

    def _deliver(self, event: Envelope) -> None:
        self.last_id = event["id"]
        frame = frame_of(event)
        for subscription in tuple(self.subscriptions):
            subscription.offer(event, frame)


class ByteBudget:
    """Bytes of frames waiting to be sent, across this process's sockets."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0


class Socket(Protocol):
    user_id: uuid.UUID

    def close(self, code: int, reason: str) -> None: ...


class Hub:
    """The process's streams, fed by the broker, and its open sockets."""

    def __init__(self, broker: Broker, event_log: EventLog, send_budget: ByteBudget) -> None:
        self.broker = broker
        self.event_log = event_log
        self.send_budget = send_budget
        self.streams: dict[uuid.UUID, Stream] = {}
        self.sockets: set[Socket] = set()
        self._joining = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None
        # The streams that were behind the log at the last look, and how far.
        self._behind: dict[uuid.UUID, int] = {}

    async def start(self) -> None:
        self.broker.subscribe(self.receive)
        self._watcher = asyncio.create_task(self._watch_broker(), name="hub-watch")

    async def close(self) -> None:
        self.broker.unsubscribe(self.receive)
        tasks = [task for stream in self.streams.values() if (task := stream.stop())]
        if self._watcher is not None:
            self._watcher.cancel()
            tasks.append(self._watcher)
        await asyncio.gather(*tasks, return_exceptions=True)

    async def join(self, subscription: Subscription) -> None:
        async with self._joining:
            stream = self.streams.get(subscription.project_id)
            if stream is None:
                # Receive first, then read where the log stands: whatever is
                # published from here on lands after that point or is dropped
                # as already covered.
                stream = self.streams[subscription.project_id] = Stream(
                    subscription.project_id, self.event_log
                )
                try:
                    stream.start(await self.event_log.latest_id(subscription.project_id))
                except BaseException:
                    del self.streams[subscription.project_id]
                    raise
            stream.subscriptions.add(subscription)

    def position(self, project_id: uuid.UUID) -> int:
        """The id of the last event this process's stream of the project has passed on."""
        stream = self.streams.get(project_id)
        return stream.last_id if stream is not None else 0

    def leave(self, subscription: Subscription) -> None:
        subscription.ended = True
        stream = self.streams.get(subscription.project_id)
        if stream is None:
            return
        stream.subscriptions.discard(subscription)
        if not stream.subscriptions:
            stream.stop()
            del self.streams[subscription.project_id]

    def receive(self, message: Published) -> None:
        stream = self.streams.get(uuid.UUID(message["project_id"]))
        if stream is not None:
            stream.receive(message)

    async def _watch_broker(self) -> None:
        """Read the log while the broker is away, and once more when it is back;
        and while it is connected, when it has not brought an event that the
        log has had for a look (one published by a process cut off from
        Redis while this one still reaches it)."""
        was_connected = True
        loop = asyncio.get_running_loop()
        next_look = loop.time()
        while True:
            await asyncio.sleep(POLL_SECONDS)
            connected = self.broker.connected
            if not connected or not was_connected:
                self._catch_up_all()
            elif self.broker.crosses_processes and self.streams and loop.time() >= next_look:
                next_look = loop.time() + LOG_LOOK_SECONDS
                try:
                    await self._look_for_lost_messages()
                except Exception:  # a database hiccup: look again next time
                    log.exception("could not read the event log's latest id")
            was_connected = connected

    async def _look_for_lost_messages(self) -> None:
        for project_id, latest in self._behind.items():
            stream = self.streams.get(project_id)
            if stream is not None and stream.last_id < latest:
                # Committed a look ago and still not brought: lost on the way.
                stream.catch_up()
        latest_ids = await self.event_log.latest_ids(list(self.streams))
        self._behind = {
            project_id: latest
            for project_id, latest in latest_ids.items()
            if (stream := self.streams.get(project_id)) is not None and latest > stream.last_id
        }

    def _catch_up_all(self) -> None:
        for stream in tuple(self.streams.values()):
            stream.catch_up()

    def open_sockets(self, user_id: uuid.UUID) -> int:
        return sum(1 for socket in self.sockets if socket.user_id == user_id)

    def restart(self, code: int, reason: str) -> None:
        """Close every socket, so that its client reconnects elsewhere."""
        for socket in tuple(self.sockets):
            socket.close(code, reason)
