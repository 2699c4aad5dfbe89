"""A webhook receiver for the tests: a small HTTP/1.1 server on 127.0.0.1
(plain, or TLS with a certificate the test gives) that records every request
it gets and answers each as the test says: a status and headers, after a
delay, or only once the test lets it go. It counts the requests it holds at
once per path (one path per webhook), so that a test can show no webhook was
ever sent two requests at once."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

MAX_HEADER_LINES = 100


@dataclass
class Received:
    path: str
    headers: dict[str, str]  # names lower-cased
    body: bytes
    at: float  # time.monotonic()

    @property
    def event(self) -> dict[str, Any]:
        event: dict[str, Any] = orjson.loads(self.body)
        return event

    @property
    def event_id(self) -> int:
        return int(self.event["id"])


@dataclass
class Reply:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0
    hold: asyncio.Event | None = None  # answer only once it is set


Answer = Callable[[Received], Reply | Awaitable[Reply]]


class Receiver:
    """``async with Receiver() as receiver``: serves until the block ends."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.requests: list[Received] = []
        self.answer: Answer = lambda _request: Reply()
        self.port = 0
        self.holding: dict[str, int] = {}
        self.most_held: dict[str, int] = {}
        self._ssl = ssl_context
        self._server: asyncio.Server | None = None
        self._arrived = asyncio.Condition()
        self._handlers: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> Receiver:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self._ssl)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for handler in tuple(self._handlers):
            handler.cancel()
        await asyncio.gather(*self._handlers, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2):
                await self._server.wait_closed()

    def url(self, path: str = "/hook", host: str = "127.0.0.1") -> str:
        scheme = "https" if self._ssl else "http"
        return f"{scheme}://{host}:{self.port}{path}"

    def to(self, path: str) -> list[Received]:
        return [request for request in self.requests if request.path == path]

    async def wait_for(
        self, done: Callable[[list[Received]], bool], timeout: float = 10
    ) -> list[Received]:
        """Wait until *done* holds of the requests received; fail after *timeout* s."""
        async with asyncio.timeout(timeout), self._arrived:
            await self._arrived.wait_for(lambda: done(self.requests))
        return self.requests

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            await self._exchange(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request_line = (await reader.readline()).decode("latin-1")
        if not request_line:
            return
        _method, path, _version = request_line.split(" ", 2)
        headers: dict[str, str] = {}
        for _ in range(MAX_HEADER_LINES):
            line = (await reader.readline()).decode("latin-1").rstrip("\r\n")
            if not line:
                break
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        received = Received(path, headers, body, time.monotonic())
        self.holding[path] = self.holding.get(path, 0) + 1
        self.most_held[path] = max(self.most_held.get(path, 0), self.holding[path])
        async with self._arrived:
            self.requests.append(received)
            self._arrived.notify_all()
        try:
            reply = self.answer(received)
            if not isinstance(reply, Reply):
                reply = await reply
            if reply.delay:
                await asyncio.sleep(reply.delay)
            if reply.hold is not None:
                await reply.hold.wait()
        finally:
            self.holding[path] -= 1
        head = [f"HTTP/1.1 {reply.status} Answer", "Content-Length: 0", "Connection: close"]
        head += [f"{name}: {value}" for name, value in reply.headers.items()]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()


def verify(secret: str, request: Received, tolerance_seconds: int = 300) -> int:
    """Check *request*'s Standard Webhooks signature with *secret*, written
    from the specification (not the server's code); the number of
    signatures it carries that *secret* made (0 or 1)."""
    message_id = request.headers["webhook-id"]
    timestamp = request.headers["webhook-timestamp"]
    assert abs(time.time() - int(timestamp)) < tolerance_seconds
    key = base64.b64decode(secret.split("_", 1)[1])
    signed = message_id.encode() + b"." + timestamp.encode() + b"." + request.body
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    versions_and_signatures = [
        part.split(",", 1) for part in request.headers["webhook-signature"].split(" ")
    ]
    assert all(version == "v1" for version, _ in versions_and_signatures)
    return sum(hmac.compare_digest(expected, signature) for _, signature in versions_and_signatures)
