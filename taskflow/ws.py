"""The WebSocket route and its protocol: every change of the projects a client
subscribes to, live (the README's WebSocket section has the protocol).

A socket authenticates first, with the same bearer parser and session check
as REST, and only then becomes a ``Connection``. Each connection has a bounded
send queue; a client that cannot keep up is dropped (it may resume with
``since``), so nobody waits for the slowest. Streams and fan-out are in
``streams``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import uuid
from collections.abc import AsyncGenerator
from datetime import timedelta
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from quart import Blueprint, Quart, current_app, websocket
from quart_rate_limiter import RateLimit

from .access import member_role
from .config import Config
from .data.events import events_after, latest_event_id
from .db import backends
from .errors import APIError
from .limits import MemoryBuckets, rate_limiter
from .security import bearer_token, require_live_session, session_is_live, verify_access_token
from .streams import DatabaseLog, Hub, Subscription, frame_of
from .tokens import Caller

log = logging.getLogger(__name__)

blueprint = Blueprint("ws", __name__)

AUTH_TIMEOUT_SECONDS = 10
MAX_MESSAGE_BYTES = 64 * 1024
SESSION_CHECK_SECONDS = 2.0
CLOSE_TIMEOUT_SECONDS = 1.0

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY_CONNECTIONS = 4429
CLOSE_TOO_SLOW = 1008
CLOSE_TOO_BIG = 1009
CLOSE_RESTARTING = 1012

EXTENSION_KEY = "taskflow.hub"


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

BAD_MESSAGE = frame_of({"type": "error", "code": "bad_message"})


def hub() -> Hub:
    hub_: Hub = current_app.extensions[EXTENSION_KEY]
    return hub_


# Authentication


class Refused(Exception):
    """The socket is to be closed with *code* before it becomes a connection."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


async def authenticate(config: Config) -> Caller:
    """The caller of this socket, from its handshake or its first message."""
    try:
        token = bearer_token(websocket.headers)
    except APIError as error:
        raise Refused(CLOSE_UNAUTHORIZED, "expected a bearer token") from error
    if token is None:
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_SECONDS):
                message = await websocket.receive()
            frame = ClientFrame.validate_json(message)
        except TimeoutError:
            raise Refused(CLOSE_UNAUTHORIZED, "no authentication within 10 seconds") from None
        except ValidationError:
            raise Refused(CLOSE_UNAUTHORIZED, "the first message must authenticate") from None
        if not isinstance(frame, AuthFrame):
            raise Refused(CLOSE_UNAUTHORIZED, "the first message must authenticate")
        token = frame.token.strip()
    try:
        caller = verify_access_token(token)
        async with backends().sessionmaker() as db_session:
            await require_live_session(db_session, caller)
    except APIError as error:
        raise Refused(CLOSE_UNAUTHORIZED, error.code) from None
    connections_per_minute = RateLimit(config.ws_connections_per_minute, timedelta(minutes=1))
    decision = await rate_limiter().buckets.acquire(
        f"ws-connect:{caller.user_id}", connections_per_minute
    )
    if not decision.allowed:
        raise Refused(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
    return caller


# One connection


class Connection:
    """An authenticated socket: its subscriptions, its send queue, its end."""

    def __init__(self, caller: Caller, config: Config) -> None:
        self.caller = caller
        self.user_id = caller.user_id
        self.subscriptions: dict[uuid.UUID, Subscription] = {}
        self.outbox: asyncio.Queue[str] = asyncio.Queue(config.ws_send_queue)
        self.done = asyncio.Event()
        self.close_code: int | None = None
        self.close_reason = ""
        self.message_limit = RateLimit(config.ws_messages_per_second, timedelta(seconds=1))
        self.message_buckets = MemoryBuckets()

    def close(self, code: int, reason: str) -> None:
        """End the connection with *code*; the first reason given is the one sent."""
        if self.close_code is None:
            self.close_code, self.close_reason = code, reason
        self.done.set()

    async def serve(self) -> None:
        await websocket.send(frame_of({"type": "ready", "user_id": str(self.user_id)}))
        hub_ = hub()
        hub_.sockets.add(self)
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._send()),
            asyncio.create_task(self._watch_session()),
        ]
        try:
            await self.done.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for subscription in tuple(self.subscriptions.values()):
                self._unsubscribe(subscription)
            hub_.sockets.discard(self)
        if self.close_code is not None:
            await close_socket(self.close_code, self.close_reason)

    async def _watch_session(self) -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK_SECONDS)
            try:
                async with backends().sessionmaker() as db_session:
                    live = await session_is_live(db_session, self.caller.session_id)
            except Exception:  # the database is away: keep the socket, check again later
                log.warning("session check failed", exc_info=True)
                continue
            if not live:
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
                    self.enqueue(frame_of({"type": "error", "code": "rate_limited"}))
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
            self.enqueue(BAD_MESSAGE)
            return
        try:
            frame = ClientFrame.validate_json(message)
        except ValidationError:
            self.enqueue(BAD_MESSAGE)
            return
        if isinstance(frame, PingFrame):
            self.enqueue(frame_of({"type": "pong"}))
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(frame.project_id, frame.since)
        elif isinstance(frame, UnsubscribeFrame):
            subscription = self.subscriptions.get(frame.project_id)
            if subscription is not None:
                self._unsubscribe(subscription)
            self.enqueue(frame_of({"type": "unsubscribed", "project_id": str(frame.project_id)}))
        else:  # a second auth frame
            self.enqueue(BAD_MESSAGE)

    async def _subscribe(self, project_id: uuid.UUID, since: int | None) -> None:
        if project_id in self.subscriptions:
            self._unsubscribe(self.subscriptions[project_id])
        # Short sessions, never two at once: on SQLite each holds the lock.
        async with backends().sessionmaker() as db_session:
            role = await member_role(db_session, project_id, self.user_id)
        if role is None:
            self.enqueue(
                frame_of({"type": "error", "code": "not_found", "project_id": str(project_id)})
            )
            return
        subscription = Subscription(self, project_id)
        self.subscriptions[project_id] = subscription
        await hub().join(subscription)
        async with backends().sessionmaker() as db_session:
            if since is None:
                last_id = await latest_event_id(db_session, project_id)
            else:
                # Everything after `since`, as the log has it; what commits
                # meanwhile is held by the subscription and follows.
                last_id = since
                async for event in events_after(db_session, project_id, since):
                    self.enqueue(frame_of(event))
                    last_id = event["id"]
        self.enqueue(
            frame_of(
                {"type": "subscribed", "project_id": str(project_id), "last_event_id": last_id}
            )
        )
        subscription.go_live(last_id)

    def _unsubscribe(self, subscription: Subscription) -> None:
        hub().leave(subscription)
        if self.subscriptions.get(subscription.project_id) is subscription:
            del self.subscriptions[subscription.project_id]

    def end_subscription(self, subscription: Subscription, reason: str) -> None:
        """The subscriber may no longer read the project: tell them, and stop."""
        self._unsubscribe(subscription)
        self.enqueue(
            frame_of(
                {
                    "type": "unsubscribed",
                    "project_id": str(subscription.project_id),
                    "reason": reason,
                }
            )
        )

    # Sending

    def enqueue(self, frame: str) -> None:
        try:
            self.outbox.put_nowait(frame)
        except asyncio.QueueFull:
            # Too slow to keep up: drop it rather than make anyone wait.
            self.close(CLOSE_TOO_SLOW, "too slow")

    async def _send(self) -> None:
        try:
            while True:
                await websocket.send(await self.outbox.get())
        finally:
            self.done.set()


async def close_socket(code: int, reason: str) -> None:
    # A stalled client may never read the close frame; do not wait on it.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await websocket.close(code, reason)


@blueprint.websocket("/ws")
async def ws() -> None:
    """Live events: see the README's WebSocket section for the protocol."""
    config: Config = current_app.config["TASKFLOW"]
    await websocket.accept()
    try:
        caller = await authenticate(config)
    except Refused as refused:
        await close_socket(refused.code, refused.reason)
        return
    await Connection(caller, config).serve()


def init_app(app: Quart) -> None:
    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        hub_ = app.extensions[EXTENSION_KEY] = Hub(
            backends().broker, DatabaseLog(backends().sessionmaker)
        )
        await hub_.start()
        # Under hypercorn's workers SIGTERM would end this process outright:
        # instead, close the sockets with 1012 (clients reconnect elsewhere)
        # and let hypercorn wind down.
        loop = asyncio.get_running_loop()
        handled = signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        if handled:
            loop.add_signal_handler(
                signal.SIGTERM, hub_.restart, CLOSE_RESTARTING, "server restarting"
            )
        yield
        if handled:
            loop.remove_signal_handler(signal.SIGTERM)
        await app.extensions.pop(EXTENSION_KEY).close()

    app.register_blueprint(blueprint)
