"""JSON in and out: strict parsing of request bodies and fast encoding of responses."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Generator
from typing import Any

import orjson
from pydantic_core import to_jsonable_python
from quart import Request, Response
from quart.json.provider import DefaultJSONProvider
from werkzeug.exceptions import RequestEntityTooLarge

from .errors import APIError, validation_failed

# More members than any request body of the API has fields.
MAX_MEMBERS = 64


class DuplicateName(ValueError):
    """An object names one member twice, which I-JSON (RFC 7493) refuses and
    orjson would quietly resolve by keeping the last."""


def _members_written(text: bytes) -> int:
    """How many members the objects of valid JSON *text* have, duplicates
    included: outside strings, a colon only ever ends a member's name."""
    # Escaped backslashes go first, then escaped quotes (pairing backslashes
    # left to right, as a parser does): every quote left opens or closes a
    # string, and the text outside strings is every other piece between them.
    text = text.replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(text.split(b'"')[::2]).count(b":")


def _members_kept(value: Any) -> int:
    """How many members the objects of a parsed value have (no recursion: the
    value may be 1024 levels deep)."""
    count, pending = 0, [value]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            count += len(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
    return count


def loads_strict(data: str | bytes) -> Any:
    """Strict JSON, for request bodies and WebSocket messages; ValueError if not.

    Strict: valid UTF-8, no NaN or Infinity, no number beyond a double, at most
    1024 levels deep (orjson's own rules), and no object that names a member
    twice (``DuplicateName``). orjson keeps the last of duplicates, so they
    are found by counting: the text's members against the parsed value's. A
    flat object (every request body the API takes is one) needs no walk of
    the parsed value: its own length is the count.
    """
    value = orjson.loads(data)
    written = _members_written(data.encode() if isinstance(data, str) else data)
    if written == (len(value) if isinstance(value, dict) else 0):
        return value
    if written != _members_kept(value):
        raise DuplicateName("an object names a member twice")
    return value


def json_default(value: Any) -> Any:
    """What orjson does not know natively: above all asyncpg's own UUID class."""
    if isinstance(value, uuid.UUID):
        return str(value)
    return to_jsonable_python(value)


def dumps(value: Any) -> bytes:
    """JSON as TaskFlow writes it everywhere: UTC timestamps end in ``Z``."""
    return orjson.dumps(value, default=json_default, option=orjson.OPT_UTC_Z)


def json_response(value: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    """*value* as a JSON response (bytes: JSON already encoded); what every
    route returns.

    A ready ``Response`` passes quart-schema's result conversion untouched,
    which would otherwise run every returned dict through a fresh pydantic
    TypeAdapter (a tenth of a task page's CPU); routes return plain data that
    orjson serialises directly.
    """
    body = value if isinstance(value, bytes) else dumps(value)
    return Response(body, status=status, headers=headers, mimetype="application/json")


def no_content() -> Response:
    return Response("", status=204)


class ORJSONProvider(DefaultJSONProvider):
    """orjson for every JSON response: timestamps in UTC with ``Z``."""

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        return dumps(obj).decode()

    def loads(self, s: str | bytes, **kwargs: Any) -> Any:
        return orjson.loads(s)

    def response(self, *args: Any, **kwargs: Any) -> Response:
        obj = self._prepare_response_obj(args, kwargs)
        return Response(dumps(obj), mimetype=self.mimetype)


# How much of a body over the limit is read (and dropped) before its 413.
DRAIN_BYTES = 8 * 1024 * 1024


class DrainedBody:
    """A request body that, once over the limit, is read to its end before the
    413 is raised, as long as that end is near.

    Sending a response and closing while the client's bytes are still unread
    makes the kernel reset the connection, which can destroy the response on
    its way: the client sees a reset instead of a 413 (h11 does not keep a
    connection whose request was answered before it was read). So a refused
    body is drained, up to DRAIN_BYTES; beyond that, or a declared length
    beyond it, the 413 is immediate and a reset possible. The same interface
    as Quart's ``Body`` (its ``Request.body_class``), which it replaces.
    """

    def __init__(self, expected_content_length: int | None, max_content_length: int | None):
        self._data = bytearray()
        self._received = 0
        self._max = max_content_length
        self._complete = asyncio.Event()
        self._has_data = asyncio.Event()
        self._too_large = False
        self._drain = expected_content_length is None or expected_content_length <= DRAIN_BYTES
        if max_content_length is not None and (expected_content_length or 0) > max_content_length:
            self._refuse()

    def _refuse(self) -> None:
        self._too_large = True
        self._data.clear()
        if not self._drain:
            self.set_complete()

    def __aiter__(self) -> DrainedBody:
        return self

    async def __anext__(self) -> bytes:
        if self._too_large:
            raise RequestEntityTooLarge()
        if not self._complete.is_set():
            await self._has_data.wait()
        if self._complete.is_set() and not self._data:
            raise StopAsyncIteration()
        data = bytes(self._data)
        self._data.clear()
        self._has_data.clear()
        return data

    def __await__(self) -> Generator[Any, None, bytes]:
        yield from self._complete.wait().__await__()
        if self._too_large:
            raise RequestEntityTooLarge()
        return bytes(self._data)

    def append(self, data: bytes) -> None:
        self._received += len(data)
        if self._too_large:
            if self._received > DRAIN_BYTES:
                self.set_complete()
            return
        self._data.extend(data)
        self._has_data.set()
        if self._max is not None and self._received > self._max:
            self._refuse()

    def set_complete(self) -> None:
        self._complete.set()
        self._has_data.set()

    def set_result(self, data: bytes) -> None:
        self.append(data)
        self.set_complete()

    def clear(self) -> None:
        self._data.clear()


class JSONRequest(Request):
    """A request whose JSON body must be ``application/json`` and strict JSON.

    strict: as ``loads_strict`` has it. A body over the limit is drained
    before its 413 (``DrainedBody``).
    """

    body_class = DrainedBody  # type: ignore[assignment]

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        # Two Content-Type headers are no type at all: refuse rather than pick one.
        if not (force or self.is_json) or len(self.headers.getlist("Content-Type")) > 1:
            if silent:
                return None
            raise APIError(415)
        body = await self.get_data(cache=cache, as_text=False)
        try:
            value = loads_strict(body)
        except DuplicateName:
            if silent:
                return None
            raise APIError(
                400, detail="An object in the request body names a member twice."
            ) from None
        except ValueError:  # orjson.JSONDecodeError
            if silent:
                return None
            raise APIError(400) from None
        if not silent and isinstance(value, dict) and len(value) > MAX_MEMBERS:
            # Refused before validation, which would spend time on, and list,
            # every unknown member of an object built to be expensive.
            message = f"has more than {MAX_MEMBERS} members"
            raise validation_failed([{"field": "body", "message": message}])
        return value
