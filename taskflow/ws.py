"""The WebSocket: every change of the projects a client subscribes to, live.

Each process keeps one *stream* per project that has local subscribers. A
stream turns the broker's messages into the project's events in log order
with no gap: every message names the event before it (``prev_id``), and a
stream that finds one missing — still on its way from another instance, or
lost while Redis was away — reads the gap from the event log. While the
broker is disconnected, streams poll the log instead. Each connection has a
bounded send queue; a client that cannot keep up is dropped (it may resume
with ``since``), so nobody waits for the slowest.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from quart import Blueprint, Quart, current_app, websocket
from quart_rate_limiter import RateLimit
from sqlalchemy.ext.asyncio import AsyncSession

from .blueprints.projects import member_role
from .broker import Broker, RedisBroker
from .config import Config
from .db import backends
from .errors import APIError
from .events import events_after, latest_event_id
from .limits import MemoryBuckets, rate_limiter
from .security import ACCESS_TYPE, decode_token, session_is_active

log = logging.getLogger(__name__)

blueprint = Blueprint("ws", __name__)

AUTH_TIMEOUT_SECONDS = 10
MAX_MESSAGE_BYTES = 64 * 1024
SESSION_CHECK_SECONDS = 2.0
POLL_SECONDS = 0.5
REPLAY_PAGE_SIZE = 500
CLOSE_TIMEOUT_SECONDS = 1.0

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY_CONNECTIONS = 4429
CLOSE_TOO_SLOW = 1008
CLOSE_TOO_BIG = 1009
CLOSE_RESTARTING = 1012

EXTENSION_KEY = "taskflow.fanout"


# Frames a client sends


class Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


class AuthFrame(Frame):
    type: Literal["auth"]
    token: str


class SubscribeFrame(Frame):
    type: Literal["subscribe"]
    project_id: uuid.UUID
    since: int | None = Field(None, ge=0, le=2**63 - 1)


class UnsubscribeFrame(Frame):
    type: Literal["unsubscribe"]
    project_id: uuid.UUID


class PingFrame(Frame):
    type: Literal["ping"]


ClientFrame = TypeAdapter(
    Annotated[
        AuthFrame | SubscribeFrame | UnsubscribeFrame | PingFrame, Field(discriminator="type")
    ]
)


def text(message: dict[str, Any]) -> str:
    return orjson.dumps(message).decode()


# The process's streams


class Subscription:
    """One connection's subscription to one project."""

    def __init__(self, connection: Connection, project_id: str) -> None:
        self.connection = connection
        self.project_id = project_id
        self.last_id = 0
        self.live = False
        self.held: list[tuple[dict[str, Any], str]] = []
        self.ended = False

    def offer(self, event: dict[str, Any], frame: str) -> None:
        """Take the stream's next event: held until the replay is sent, then sent."""
        if self.ended:
            return
        if not self.live:
            self.held.append((event, frame))
            return
        self.send(event, frame)

    def go_live(self, last_id: int) -> None:
        self.last_id = max(self.last_id, last_id)
        self.live = True
        held, self.held = self.held, []
        for event, frame in held:
            self.send(event, frame)

    def send(self, event: dict[str, Any], frame: str) -> None:
        if self.ended or event["id"] <= self.last_id:
            return
        self.last_id = event["id"]
        kind = event["event"]
        if kind == "member.removed" and event["data"].get("user_id") == self.connection.user_id:
            self.connection.end_subscription(self, "removed")
            return
        self.connection.enqueue(frame)
        if kind == "project.deleted":
            self.connection.end_subscription(self, "project_deleted")


class Stream:
    """This process's view of one project's events: in log order, no gap."""

    def __init__(self, project_id: str, last_id: int) -> None:
        self.project_id = project_id
        self.last_id = last_id
        self.subscriptions: set[Subscription] = set()
        self.inbox: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(), name=f"stream-{project_id}")

    def receive(self, message: dict[str, Any]) -> None:
        self.inbox.put_nowait(message)

    def catch_up(self) -> None:
        self.inbox.put_nowait(None)

    async def _run(self) -> None:
        while True:
            message = await self.inbox.get()
            try:
                if message is None:
                    await self._read_log()
                elif message["event"]["id"] <= self.last_id:
                    continue  # already delivered, from the log
                else:
                    if message["prev_id"] > self.last_id:
                        await self._read_log(before=message["event"]["id"])
                    self._deliver(message["event"])
            except Exception:  # a database hiccup: read the log again shortly
                log.exception("stream %s could not read the event log", self.project_id)
                asyncio.get_running_loop().call_later(POLL_SECONDS, self.catch_up)

    async def _read_log(self, before: int | None = None) -> None:
        async with backends().sessionmaker() as db_session:
            while True:
                events = await events_after(
                    db_session, uuid.UUID(self.project_id), self.last_id, REPLAY_PAGE_SIZE
                )
                for event in events:
                    if before is not None and event["id"] >= before:
                        return
                    self._deliver(event)
                if len(events) < REPLAY_PAGE_SIZE:
                    return

    def _deliver(self, event: dict[str, Any]) -> None:
        self.last_id = event["id"]
        frame = text(event)
        for subscription in tuple(self.subscriptions):
            subscription.offer(event, frame)


class Fanout:
    """The process's streams and connections."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.streams: dict[str, Stream] = {}
        self.connections: set[Connection] = set()
        self._stream_lock = asyncio.Lock()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._watcher = asyncio.create_task(self._watch_broker(), name="fanout-watch")

    async def close(self) -> None:
        tasks = [stream.task for stream in self.streams.values()]
        if self._watcher is not None:
            tasks.append(self._watcher)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def join(self, subscription: Subscription) -> None:
        async with self._stream_lock:
            stream = self.streams.get(subscription.project_id)
            if stream is None:
                # Listen first, then read where the log stands: whatever is
                # published from here on lands after that point or is dropped
                # as already covered.
                self.broker.add_listener(subscription.project_id, self._on_message)
                async with backends().sessionmaker() as db_session:
                    last_id = await latest_event_id(db_session, uuid.UUID(subscription.project_id))
                stream = self.streams[subscription.project_id] = Stream(
                    subscription.project_id, last_id
                )
            stream.subscriptions.add(subscription)

    def leave(self, subscription: Subscription) -> None:
        stream = self.streams.get(subscription.project_id)
        if stream is None:
            return
        stream.subscriptions.discard(subscription)
        if not stream.subscriptions:
            self.broker.remove_listener(subscription.project_id, self._on_message)
            stream.task.cancel()
            del self.streams[subscription.project_id]

    def _on_message(self, message: dict[str, Any]) -> None:
        stream = self.streams.get(message["project_id"])
        if stream is not None:
            stream.receive(message)

    def connected(self) -> bool:
        return not isinstance(self.broker, RedisBroker) or self.broker.subscribed.is_set()

    async def _watch_broker(self) -> None:
        """Read the log while the broker is away, and once more when it is back."""
        was_connected = True
        while True:
            await asyncio.sleep(POLL_SECONDS)
            connected = self.connected()
            if not connected or not was_connected:
                for stream in tuple(self.streams.values()):
                    stream.catch_up()
            was_connected = connected

    def restart(self) -> None:
        """Close every socket with 1012 so its client reconnects elsewhere."""
        for connection in tuple(self.connections):
            connection.close(CLOSE_RESTARTING, "server restarting")


def fanout() -> Fanout:
    fanout_: Fanout = current_app.extensions[EXTENSION_KEY]
    return fanout_


# One connection


class Connection:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.user_id = ""
        self.session_id = uuid.UUID(int=0)
        self.subscriptions: dict[str, Subscription] = {}
        self.outbox: asyncio.Queue[str] = asyncio.Queue(config.ws_send_queue)
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.message_limit = RateLimit(config.ws_messages_per_second, timedelta(seconds=1))
        self.message_buckets = MemoryBuckets()

    async def serve(self) -> None:
        await websocket.accept()
        if not await self.authenticate():
            await self._close_now()
            return
        registry = fanout()
        registry.connections.add(self)
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._send()),
            asyncio.create_task(self._watch_session(self.session_id)),
        ]
        try:
            await self.done.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for subscription in tuple(self.subscriptions.values()):
                self._unsubscribe(subscription)
            registry.connections.discard(self)
        await self._close_now()

    async def _close_now(self) -> None:
        if self.close_code is None:
            return
        # A stalled client may never read the close frame; do not wait on it.
        with contextlib.suppress(Exception):
            async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
                await websocket.close(self.close_code, self.close_reason)

    def close(self, code: int, reason: str) -> None:
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.done.set()

    # Authentication

    async def authenticate(self) -> bool:
        header = websocket.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer":
                return self._refuse("expected a bearer token")
        else:
            try:
                async with asyncio.timeout(AUTH_TIMEOUT_SECONDS):
                    message = await websocket.receive()
                frame = ClientFrame.validate_json(message)
            except TimeoutError:
                return self._refuse("no authentication within 10 seconds")
            except ValidationError:
                return self._refuse("the first message must authenticate")
            if not isinstance(frame, AuthFrame):
                return self._refuse("the first message must authenticate")
            token = frame.token
        try:
            claims = decode_token(token.strip(), ACCESS_TYPE)
        except APIError as error:
            return self._refuse(error.code)
        async with backends().sessionmaker() as db_session:
            if not await session_is_active(db_session, claims.session_id):
                return self._refuse("session_revoked")
        self.user_id, self.session_id = str(claims.user_id), claims.session_id
        connections_per_minute = RateLimit(
            self.config.ws_connections_per_minute, timedelta(minutes=1)
        )
        decision = await rate_limiter().buckets.acquire(
            f"ws-connect:{self.user_id}", connections_per_minute
        )
        if not decision.allowed:
            self.close_code, self.close_reason = CLOSE_TOO_MANY_CONNECTIONS, "too many connections"
            return False
        await websocket.send(text({"type": "ready", "user_id": self.user_id}))
        return True

    def _refuse(self, reason: str) -> bool:
        self.close_code, self.close_reason = CLOSE_UNAUTHORIZED, reason
        return False

    async def _watch_session(self, session_id: uuid.UUID) -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK_SECONDS)
            try:
                async with backends().sessionmaker() as db_session:
                    active = await session_is_active(db_session, session_id)
            except Exception:  # the database is away: keep the socket, check again later
                log.warning("session check failed", exc_info=True)
                continue
            if not active:
                self.close(CLOSE_UNAUTHORIZED, "session_revoked")
                return

    # Receiving

    async def _receive(self) -> None:
        try:
            while True:
                message = await websocket.receive()
                size = len(message.encode() if isinstance(message, str) else message)
                if size > MAX_MESSAGE_BYTES:
                    self.close(CLOSE_TOO_BIG, "message over 64 KiB")
                    return
                if not self.message_buckets.acquire("messages", self.message_limit).allowed:
                    self.enqueue(text({"type": "error", "code": "rate_limited"}))
                    continue
                await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("websocket receive failed")
        finally:
            self.done.set()

    async def _handle(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            self.enqueue(text({"type": "error", "code": "bad_message"}))
            return
        try:
            frame = ClientFrame.validate_json(message)
        except ValidationError:
            self.enqueue(text({"type": "error", "code": "bad_message"}))
            return
        if isinstance(frame, PingFrame):
            self.enqueue(text({"type": "pong"}))
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(str(frame.project_id), frame.since)
        elif isinstance(frame, UnsubscribeFrame):
            project_id = str(frame.project_id)
            subscription = self.subscriptions.get(project_id)
            if subscription is not None:
                self._unsubscribe(subscription)
            self.enqueue(text({"type": "unsubscribed", "project_id": project_id}))
        else:  # a second auth frame
            self.enqueue(text({"type": "error", "code": "bad_message"}))

    async def _subscribe(self, project_id: str, since: int | None) -> None:
        if project_id in self.subscriptions:
            self._unsubscribe(self.subscriptions[project_id])
        # Short sessions, never two at once: on SQLite each holds the lock.
        async with backends().sessionmaker() as db_session:
            role = await member_role(db_session, uuid.UUID(project_id), uuid.UUID(self.user_id))
        if role is None:
            self.enqueue(text({"type": "error", "code": "not_found", "project_id": project_id}))
            return
        subscription = Subscription(self, project_id)
        self.subscriptions[project_id] = subscription
        await fanout().join(subscription)
        async with backends().sessionmaker() as db_session:
            if since is None:
                last_id = await latest_event_id(db_session, uuid.UUID(project_id))
            else:
                # Everything after `since`, as the log has it; what commits
                # meanwhile is held by the subscription and follows.
                last_id = since
                async for event in replay(db_session, uuid.UUID(project_id), since):
                    self.enqueue(text(event))
                    last_id = event["id"]
        self.enqueue(
            text({"type": "subscribed", "project_id": project_id, "last_event_id": last_id})
        )
        subscription.go_live(last_id)

    def _unsubscribe(self, subscription: Subscription) -> None:
        subscription.ended = True
        fanout().leave(subscription)
        if self.subscriptions.get(subscription.project_id) is subscription:
            del self.subscriptions[subscription.project_id]

    def end_subscription(self, subscription: Subscription, reason: str) -> None:
        """The subscriber may no longer read the project: tell them, and stop."""
        self._unsubscribe(subscription)
        self.enqueue(
            text({"type": "unsubscribed", "project_id": subscription.project_id, "reason": reason})
        )

    # Sending

    def enqueue(self, frame: str) -> None:
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            # Too slow to keep up: drop it rather than make anyone wait.
            self.close_code, self.close_reason = CLOSE_TOO_SLOW, "too slow"
            self.done.set()

    async def _send(self) -> None:
        try:
            while True:
                await websocket.send(await self.outbox.get())
        finally:
            self.done.set()


async def replay(
    db_session: AsyncSession, project_id: uuid.UUID, since: int
) -> AsyncIterator[dict[str, Any]]:
    while True:
        events = await events_after(db_session, project_id, since, REPLAY_PAGE_SIZE)
        for event in events:
            yield event
        if len(events) < REPLAY_PAGE_SIZE:
            return
        since = events[-1]["id"]


@blueprint.websocket("/ws")
async def ws() -> None:
    """Live events: see the README's WebSocket section for the protocol."""
    await Connection(current_app.config["TASKFLOW"]).serve()


def restart_sockets(app: Quart) -> None:
    """Close every socket of *app* with 1012, for a shutdown."""
    registry: Fanout | None = app.extensions.get(EXTENSION_KEY)
    if registry is not None:
        registry.restart()


def init_app(app: Quart) -> None:
    async def start() -> None:
        registry = app.extensions[EXTENSION_KEY] = Fanout(backends().broker)
        await registry.start()
        # Under hypercorn's workers SIGTERM would kill this process outright;
        # instead, close the sockets with 1012 and let hypercorn wind down.
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGTERM, restart_sockets, app)

    async def stop() -> None:
        registry: Fanout | None = app.extensions.pop(EXTENSION_KEY, None)
        if registry is not None:
            await registry.close()

    app.before_serving(start)
    # Before the database and the broker close (after_serving runs in order).
    app.after_serving_funcs.insert(0, stop)
    app.register_blueprint(blueprint)
