"""The WebSocket route and its protocol: every change of the projects a client
subscribes to, live (the README's WebSocket section has the protocol).

A socket authenticates first, with the same bearer parser and session check
as REST, and only then becomes a ``Connection``. Each connection's frames
wait in an ``Outbox`` bounded in bytes; a client that cannot keep up with live
events is dropped (it may resume with ``since``), so nobody waits for the
slowest, and a catch-up is paced by the client's reading. Streams and fan-out
are in ``streams``.

A fan-out sends one event to every subscriber at once, so a frame's way out
is kept short: frames go straight to the ASGI server's send callable (which
``DirectSend`` puts in the socket's scope), without Quart's per-send work,
and each login session is checked once however many sockets it holds
(``SessionWatch``). Whether hypercorn compresses frames is
``ws_compression``'s (bench/README.md, "WebSocket fan-out (issue 17)").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import timedelta
from typing import Annotated, Literal, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from quart import Blueprint, Quart, current_app, websocket
from quart_rate_limiter import RateLimit

from . import ws_compression
from .access import current_role
from .config import Config
from .data.events import READ_PAGE_SIZE, event_page, latest_event_id
from .db import backends
from .errors import APIError
from .jsonio import loads_strict
from .limits import MemoryBuckets, address_key, rate_limiter
from .security import authenticate, bearer_token, sessions_live
from .streams import ByteBudget, DatabaseLog, Hub, Subscription, frame_of
from .tokens import Caller

log = logging.getLogger(__name__)
access_log = logging.getLogger("taskflow.access")

blueprint = Blueprint("ws", __name__)

AUTH_TIMEOUT_SECONDS = 10
MAX_MESSAGE_BYTES = 64 * 1024
SESSION_CHECK_SECONDS = 2.0
CLOSE_TIMEOUT_SECONDS = 1.0

# Subscriptions one socket may hold at once.
MAX_SUBSCRIPTIONS = 100

CLOSE_UNAUTHORIZED = 4401
CLOSE_TOO_MANY_CONNECTIONS = 4429
CLOSE_TOO_SLOW = 1008
CLOSE_TOO_BIG = 1009
CLOSE_RESTARTING = 1012
CLOSE_SERVER_ERROR = 1011

EXTENSION_KEY = "taskflow.hub"
SESSIONS_KEY = "taskflow.ws_sessions"
# Where ``DirectSend`` puts a socket's ASGI send callable in its scope.
SEND_EXTENSION = "taskflow.send"


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


AnyFrame = AuthFrame | SubscribeFrame | UnsubscribeFrame | PingFrame
ClientFrame: TypeAdapter[AnyFrame] = TypeAdapter(Annotated[AnyFrame, Field(discriminator="type")])


def error_frame(code: str, project_id: uuid.UUID | None = None) -> str:
    if project_id is None:
        return frame_of({"type": "error", "code": code})
    return frame_of({"type": "error", "code": code, "project_id": str(project_id)})


BAD_MESSAGE = error_frame("bad_message")


def hub() -> Hub:
    hub_: Hub = current_app.extensions[EXTENSION_KEY]
    return hub_


# Authentication


class Refused(Exception):
    """The socket is to be closed with *code* before it becomes a connection."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


async def authenticate_socket(config: Config) -> Caller:
    """The caller of this socket, from its handshake or its first message."""
    # Before authentication a socket is the route's, limited per address as
    # every route is.
    per_address = RateLimit(config.rate_limit_per_minute, timedelta(minutes=1))
    address = await rate_limiter().buckets.acquire(
        f"ws-handshake:{await address_key()}", per_address
    )
    if not address.allowed:
        raise Refused(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
    try:
        token = bearer_token(websocket.headers)
    except APIError as error:
        raise Refused(CLOSE_UNAUTHORIZED, "expected one bearer token") from error
    if token is None:
        try:
            async with asyncio.timeout(AUTH_TIMEOUT_SECONDS):
                message = await websocket.receive()
        except TimeoutError:
            raise Refused(CLOSE_UNAUTHORIZED, "no authentication within 10 seconds") from None
        if too_big(message):
            raise Refused(CLOSE_TOO_BIG, "message over 64 KiB")
        frame = parse_frame(message)
        if not isinstance(frame, AuthFrame):
            raise Refused(CLOSE_UNAUTHORIZED, "the first message must authenticate")
        token = frame.token.strip()
    try:
        caller = await authenticate(token)
    except APIError as error:
        raise Refused(CLOSE_UNAUTHORIZED, error.code) from None
    except Exception:
        log.exception("websocket authentication failed")
        raise Refused(CLOSE_SERVER_ERROR, "try again later") from None
    per_user = RateLimit(config.ws_connections_per_minute, timedelta(minutes=1))
    decision = await rate_limiter().buckets.acquire(f"ws-connect:{caller.user_id}", per_user)
    if not decision.allowed:
        raise Refused(CLOSE_TOO_MANY_CONNECTIONS, "too many connections")
    if hub().open_sockets(caller.user_id) >= config.ws_sockets_per_user:
        raise Refused(CLOSE_TOO_MANY_CONNECTIONS, "too many open connections")
    return caller


def too_big(message: str | bytes) -> bool:
    return len(message) > MAX_MESSAGE_BYTES or (
        isinstance(message, str) and len(message.encode()) > MAX_MESSAGE_BYTES
    )


def parse_frame(message: str | bytes) -> AnyFrame | None:
    """A client's text frame, or None for anything else: a binary frame, bad
    JSON, an unknown type."""
    if not isinstance(message, str):
        return None
    try:
        return ClientFrame.validate_python(loads_strict(message))
    except (ValueError, ValidationError):  # not strict JSON (duplicate names too), not a frame
        return None


class Outbox:
    """A socket's frames waiting to be sent, bounded in memory: its own bytes
    and its worker's (``ByteBudget``).

    A live frame that would exceed a bound is refused: the reader is too slow.
    A frame of a catch-up waits until the reader has made room, within half of
    each bound (the other half is for live frames), so a client far behind is
    paced by its own reading; one frame always fits in an empty outbox.
    """

    def __init__(self, limit: int, worker: ByteBudget) -> None:
        self._frames: deque[tuple[str, int]] = deque()
        self._bytes = 0
        self._limit = limit
        self._worker = worker
        self._readable = asyncio.Event()
        self._drained = asyncio.Event()

    def _fits(self, size: int, share: float) -> bool:
        return (
            self._bytes + size <= self._limit * share
            and self._worker.used + size <= self._worker.limit * share
        )

    def _append(self, frame: str, size: int) -> None:
        self._frames.append((frame, size))
        self._bytes += size
        self._worker.used += size
        self._readable.set()

    def put(self, frame: str) -> bool:
        size = sys.getsizeof(frame)
        if not self._fits(size, 1.0):
            return False
        self._append(frame, size)
        return True

    async def put_paced(self, frame: str) -> None:
        size = sys.getsizeof(frame)
        while self._frames and not self._fits(size, 0.5):
            self._drained.clear()
            await self._drained.wait()
        self._append(frame, size)

    async def get(self) -> str:
        while not self._frames:
            self._readable.clear()
            await self._readable.wait()
        frame, size = self._frames.popleft()
        self._bytes -= size
        self._worker.used -= size
        self._drained.set()
        return frame

    @property
    def waiting(self) -> bool:
        """Whether frames are waiting."""
        return bool(self._frames)

    def clear(self) -> None:
        self._worker.used -= self._bytes
        self._frames.clear()
        self._bytes = 0


# One connection


class Connection:
    """An authenticated socket: its subscriptions, its outbox, its end."""

    def __init__(self, caller: Caller, config: Config) -> None:
        self.caller = caller
        self.user_id = caller.user_id
        self.subscriptions: dict[uuid.UUID, Subscription] = {}
        self.outbox = Outbox(config.ws_send_buffer_bytes, hub().send_budget)
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
        sessions: SessionWatch = current_app.extensions[SESSIONS_KEY]
        hub_.sockets.add(self)
        sessions.add(self)
        tasks = [
            asyncio.create_task(self._receive()),
            asyncio.create_task(self._send(asgi_send())),
        ]
        try:
            await self.done.wait()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            sessions.discard(self)
            for subscription in tuple(self.subscriptions.values()):
                self._unsubscribe(subscription)
            hub_.sockets.discard(self)
            self.outbox.clear()
        if self.close_code is not None:
            await close_socket(self.close_code, self.close_reason)

    # Receiving

    async def _receive(self) -> None:
        try:
            while True:
                message = await websocket.receive()
                if too_big(message):
                    self.close(CLOSE_TOO_BIG, "message over 64 KiB")
                    return
                if not self.message_buckets.acquire("messages", self.message_limit).allowed:
                    self.enqueue(error_frame("rate_limited"))
                    continue
                await self._handle(message)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("websocket receive failed")
        finally:
            self.done.set()

    async def _handle(self, message: str | bytes) -> None:
        frame = parse_frame(message)
        if isinstance(frame, PingFrame):
            self.enqueue(frame_of({"type": "pong"}))
        elif isinstance(frame, SubscribeFrame):
            await self._subscribe(frame.project_id, frame.since)
        elif isinstance(frame, UnsubscribeFrame):
            subscription = self.subscriptions.get(frame.project_id)
            if subscription is not None:
                self._unsubscribe(subscription)
            self.enqueue(frame_of({"type": "unsubscribed", "project_id": str(frame.project_id)}))
        else:  # not a frame of the protocol, or a second auth frame
            self.enqueue(BAD_MESSAGE)

    async def _subscribe(self, project_id: uuid.UUID, since: int | None) -> None:
        if project_id in self.subscriptions:
            self._unsubscribe(self.subscriptions[project_id])
        if len(self.subscriptions) >= MAX_SUBSCRIPTIONS:
            self.enqueue(error_frame("too_many_subscriptions", project_id))
            return
        hub_ = hub()
        subscription = Subscription(self, project_id)
        # Join first, then read where the log stands, then check the
        # membership as the database has it now: a removal that commits later
        # has a later event, which the subscription will see and stop at.
        await hub_.join(subscription)
        try:
            # Short sessions, never two at once: on SQLite each holds the lock.
            async with backends().read_sessionmaker() as db_session:
                position = await latest_event_id(db_session, project_id)
                role = await current_role(db_session, project_id, self.caller)
        except BaseException:
            hub_.leave(subscription)
            raise
        if role is None:
            hub_.leave(subscription)
            self.enqueue(error_frame("not_found", project_id))
            return
        self.subscriptions[project_id] = subscription
        subscription.member_at = position
        # Ids are one sequence across projects: a `since` beyond this project's
        # log would skip its next events.
        subscription.last_id = position if since is None else min(since, position)
        await self._catch_up(subscription)
        if subscription.ended:
            return
        self.enqueue(
            frame_of(
                {
                    "type": "subscribed",
                    "project_id": str(project_id),
                    "last_event_id": subscription.last_id,
                }
            )
        )
        subscription.go_live()

    async def _catch_up(self, subscription: Subscription) -> None:
        """Send the log from the subscription's position to the stream's, paced
        by the reader; a page at a time, no session held while the client reads.

        Between the last check and going live nothing awaits, so every event
        the stream passes on afterwards is one this did not send.
        """
        while not subscription.ended:
            if subscription.last_id >= hub().position(subscription.project_id):
                return
            async with backends().read_sessionmaker() as db_session:
                page = await event_page(
                    db_session, subscription.project_id, subscription.last_id, READ_PAGE_SIZE
                )
            if not page.items:
                return  # the log has no more: the project was deleted meanwhile
            for event in page.items:
                if subscription.admit(event):
                    await self.outbox.put_paced(frame_of(event))
                    subscription.sent(event)

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
        if not self.outbox.put(frame):
            # Too slow to keep up: drop it rather than make anyone wait.
            self.close(CLOSE_TOO_SLOW, "too slow")

    async def _send(self, send: ASGISendCallable) -> None:
        """Send the outbox's frames as they come. Straight to the server: Quart's
        ``websocket.send`` yields to the loop and fires a signal on every frame,
        which in a fan-out to a thousand sockets is a good part of the tail."""
        try:
            while True:
                frame = await self.outbox.get()
                await send({"type": "websocket.send", "bytes": None, "text": frame})
                if self.outbox.waiting:
                    # A catch-up: let the other sockets have the loop between frames.
                    await asyncio.sleep(0)
        finally:
            self.done.set()


class SessionWatch:
    """The login sessions (and API tokens) of this process's sockets, all
    checked every ``SESSION_CHECK_SECONDS`` by one loop, their marks read from
    Redis in one round trip (``sessions_live``) however many sockets and
    sessions there are: a revoked one closes its sockets with 4401. (One check
    per socket was a Redis call every 2 ms for a thousand sockets, and more
    than Redis's pool and then the database's could serve once a fan-out held
    the loop up.)"""

    def __init__(self) -> None:
        self._sockets: dict[uuid.UUID, set[Connection]] = {}
        self._checker: asyncio.Task[None] | None = None

    def add(self, connection: Connection) -> None:
        self._sockets.setdefault(connection.caller.session_id, set()).add(connection)
        if self._checker is None:
            self._checker = asyncio.create_task(self._check_forever(), name="ws-sessions")

    def discard(self, connection: Connection) -> None:
        session_id = connection.caller.session_id
        sockets = self._sockets.get(session_id)
        if sockets is None:
            return
        sockets.discard(connection)
        if not sockets:
            del self._sockets[session_id]

    async def _check_forever(self) -> None:
        while True:
            await asyncio.sleep(SESSION_CHECK_SECONDS)
            callers = [next(iter(sockets)).caller for sockets in self._sockets.values()]
            try:
                live = await sessions_live(callers)
            except Exception:  # the database is away: keep the sockets, check again later
                log.warning("session check failed", exc_info=True)
                continue
            for caller, is_live in zip(callers, live, strict=True):
                if not is_live:
                    for connection in tuple(self._sockets.get(caller.session_id, ())):
                        connection.close(CLOSE_UNAUTHORIZED, "session_revoked")

    async def close(self) -> None:
        if self._checker is not None:
            self._checker.cancel()
            await asyncio.gather(self._checker, return_exceptions=True)


class DirectSend:
    """ASGI middleware: puts a WebSocket's send callable in its scope's
    extensions (``SEND_EXTENSION``), where ``Connection`` finds it through
    ``websocket.scope``. Everything else passes through untouched."""

    def __init__(
        self, app: Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
    ) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket":
            extensions = {**(scope.get("extensions") or {}), SEND_EXTENSION: {"send": send}}
            scope["extensions"] = extensions
        await self.app(scope, receive, send)


def asgi_send() -> ASGISendCallable:
    """This socket's ASGI send callable (``DirectSend``)."""
    extensions = websocket.scope.get("extensions") or {}
    return cast(ASGISendCallable, extensions[SEND_EXTENSION]["send"])


async def close_socket(code: int, reason: str) -> None:
    # A stalled client may never read the close frame; do not wait on it.
    with contextlib.suppress(Exception):
        async with asyncio.timeout(CLOSE_TIMEOUT_SECONDS):
            await websocket.close(code, reason)


@blueprint.websocket("/ws")
async def ws() -> None:
    """Live events: see the README's WebSocket section for the protocol."""
    config: Config = current_app.config["TASKFLOW"]
    started = time.perf_counter()
    close_code: int | None = None
    try:
        await websocket.accept()
        try:
            caller = await authenticate_socket(config)
        except Refused as refused:
            close_code = refused.code
            await close_socket(refused.code, refused.reason)
            return
        connection = Connection(caller, config)
        try:
            await connection.serve()
        finally:
            close_code = connection.close_code
    finally:
        log_socket(started, close_code)


def log_socket(started: float, close_code: int | None) -> None:
    """One access-log line per socket when it ends, as for a request: its close
    code, or null when the client (or hypercorn) ended it."""
    access_log.info(
        "websocket",
        extra={
            "fields": {
                "path": websocket.path,
                "close_code": close_code,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
        },
    )


def init_app(app: Quart) -> None:
    ws_compression.install(app.config["TASKFLOW"].ws_compression)
    app.asgi_app = DirectSend(app.asgi_app)  # type: ignore[method-assign]

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        config: Config = app.config["TASKFLOW"]
        hub_ = app.extensions[EXTENSION_KEY] = Hub(
            backends().broker,
            DatabaseLog(backends().read_sessionmaker),
            ByteBudget(config.ws_worker_buffer_bytes),
        )
        sessions = app.extensions[SESSIONS_KEY] = SessionWatch()
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
        await sessions.close()
        del app.extensions[SESSIONS_KEY]

    app.register_blueprint(blueprint)
