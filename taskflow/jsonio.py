"""JSON in and out: strict parsing of request bodies and fast encoding of responses."""

from __future__ import annotations

import uuid
from typing import Any

import orjson
from pydantic_core import to_jsonable_python
from quart import Request, Response
from quart.json.provider import DefaultJSONProvider

from .errors import APIError, validation_failed

# More members than any request body of the API has fields.
MAX_MEMBERS = 64


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


class JSONRequest(Request):
    """A request whose JSON body must be ``application/json`` and strict JSON.

    strict: valid UTF-8, no NaN or Infinity, no number beyond a double, at most
    1024 levels deep (orjson's limit).
    """

    async def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any:
        # Two Content-Type headers are no type at all: refuse rather than pick one.
        if not (force or self.is_json) or len(self.headers.getlist("Content-Type")) > 1:
            if silent:
                return None
            raise APIError(415)
        body = await self.get_data(cache=cache, as_text=False)
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            if silent:
                return None
            raise APIError(400) from None
        if not silent and isinstance(value, dict) and len(value) > MAX_MEMBERS:
            # Refused before validation, which would spend time on, and list,
            # every unknown member of an object built to be expensive.
            message = f"has more than {MAX_MEMBERS} members"
            raise validation_failed([{"field": "body", "message": message}])
        return value
