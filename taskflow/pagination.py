"""Keyset pagination with opaque, tamper-evident cursors.

A cursor names the list it belongs to and the sort key of the last item
served, signed with a key derived from the app's secret. The next page starts
strictly after that key, so no OFFSET is needed and rows inserted meanwhile
never repeat an item.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from typing import Any, Generic, TypedDict, TypeVar

import orjson
from quart import current_app

from .config import Config
from .errors import APIError, validation_failed
from .jsonio import dumps

MAC_BYTES = 16

Item = TypeVar("Item")


def _key() -> bytes:
    config: Config = current_app.config["TASKFLOW"]
    return hashlib.sha256(b"taskflow cursor\x00" + config.secret_key.encode()).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def encode_cursor(scope: str, position: list[Any]) -> str:
    payload = dumps([scope, position])
    mac = hmac.new(_key(), payload, hashlib.sha256).digest()[:MAC_BYTES]
    return f"{_b64(payload)}.{_b64(mac)}"


def decode_cursor(cursor: str, scope: str) -> list[Any]:
    """The position in *cursor*, or a 422 if this server did not make it for *scope*."""
    try:
        payload_text, mac_text = cursor.split(".")
        payload, mac = _unb64(payload_text), _unb64(mac_text)
        expected = hmac.new(_key(), payload, hashlib.sha256).digest()[:MAC_BYTES]
        if not hmac.compare_digest(mac, expected):
            raise ValueError("bad signature")
        cursor_scope, position = orjson.loads(payload)
    except (ValueError, binascii.Error, orjson.JSONDecodeError):
        raise invalid_cursor() from None
    if cursor_scope != scope or not isinstance(position, list):
        raise invalid_cursor()
    return position


def invalid_cursor() -> APIError:
    return validation_failed(
        [{"field": "cursor", "message": "is not a cursor this server made for this list"}]
    )


class Paged(TypedDict, Generic[Item]):
    """A page of a list, as the list routes return it."""

    items: list[Item]
    next_cursor: str | None
