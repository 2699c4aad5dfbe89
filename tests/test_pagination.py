"""Cursors: a position round-trips; anything this server did not make for the list is a 422."""

import base64
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from quart import Quart

from taskflow import create_app
from taskflow.config import Config
from taskflow.errors import APIError
from taskflow.pagination import decode_cursor, encode_cursor

SECRET = "x" * 40
SCOPE = f"tasks:{uuid.uuid4()}:-created_at"
POSITION: list[Any] = ["2024-05-01T12:00:00+00:00", str(uuid.uuid4())]
ID = str(uuid.uuid4())


def tampered(text: str) -> str:
    """*text* with its first character changed."""
    return ("B" if text[0] == "A" else "A") + text[1:]


def make_app(secret_key: str = SECRET) -> Quart:
    return create_app(
        Config(database_url="sqlite+aiosqlite:///:memory:", redis_url=None, secret_key=secret_key)
    )


@pytest.fixture
def app() -> Iterator[Quart]:
    yield make_app()


def assert_invalid_cursor(cursor: str, scope: str = SCOPE) -> None:
    with pytest.raises(APIError) as raised:
        decode_cursor(cursor, scope)
    assert raised.value.status == 422
    assert raised.value.code == "validation_failed"
    assert [error["field"] for error in raised.value.errors or []] == ["cursor"]


@pytest.mark.parametrize(
    "position",
    [POSITION, [None, str(uuid.uuid4())], ["a title with spaces, é and \u2028", "id"], []],
)
async def test_a_cursor_round_trips_its_position(app: Quart, position: list[Any]) -> None:
    async with app.app_context():
        cursor = encode_cursor(SCOPE, position)
        assert decode_cursor(cursor, SCOPE) == position


async def test_a_cursor_is_url_safe_text(app: Quart) -> None:
    async with app.app_context():
        cursor = encode_cursor(SCOPE, ["?&=/+ " * 10, str(uuid.uuid4())])
    assert cursor.replace("-", "").replace("_", "").replace(".", "").isalnum()
    assert "=" not in cursor


async def test_a_cursor_for_another_list_is_refused(app: Quart) -> None:
    async with app.app_context():
        other_project = encode_cursor(f"tasks:{uuid.uuid4()}:-created_at", POSITION)
        other_sort = encode_cursor(SCOPE.replace("-created_at", "created_at"), POSITION)
        assert_invalid_cursor(other_project)
        assert_invalid_cursor(other_sort)


async def test_a_changed_cursor_is_refused(app: Quart) -> None:
    async with app.app_context():
        cursor = encode_cursor(SCOPE, POSITION)
        payload, mac = cursor.split(".")
        assert_invalid_cursor(tampered(cursor))
        assert_invalid_cursor(f"{payload}.{tampered(mac)}")
        assert_invalid_cursor(f"{payload[:-1]}.{mac}")
        assert_invalid_cursor(f"{payload}.{mac[:-1]}")


async def test_a_cursor_with_an_edited_position_or_another_cursors_signature_is_refused(
    app: Quart,
) -> None:
    """Still well-formed: only the signature tells these from a cursor of this server."""
    async with app.app_context():
        payload, mac = encode_cursor(SCOPE, POSITION).split(".")
        text = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        edited = base64.urlsafe_b64encode(text.replace(b"2024", b"2025")).rstrip(b"=").decode()
        assert edited != payload
        assert_invalid_cursor(f"{edited}.{mac}")
        other_payload, other_mac = encode_cursor(SCOPE, [POSITION[0], ID]).split(".")
        assert_invalid_cursor(f"{payload}.{other_mac}")
        assert_invalid_cursor(f"{other_payload}.{mac}")
        signature = bytearray(base64.urlsafe_b64decode(mac + "=" * (-len(mac) % 4)))
        signature[-1] ^= 1  # every byte of the signature counts
        flipped = base64.urlsafe_b64encode(signature).rstrip(b"=").decode()
        assert_invalid_cursor(f"{payload}.{flipped}")


async def test_a_cursor_signed_with_another_secret_is_refused(app: Quart) -> None:
    async with make_app("y" * 40).app_context():
        foreign = encode_cursor(SCOPE, POSITION)
    async with app.app_context():
        assert_invalid_cursor(foreign)
        # The same list and position, signed here, is accepted: only the key differs.
        assert decode_cursor(encode_cursor(SCOPE, POSITION), SCOPE) == POSITION


async def test_a_position_that_is_not_a_list_is_refused(app: Quart) -> None:
    async with app.app_context():
        assert_invalid_cursor(encode_cursor(SCOPE, {"after": "x"}))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "garbage",
    ["", "garbage", ".", "a.b.c", "%%%.%%%", "é.é", "AAAA.AAAA", "e30.", "\x00.\x00"],
)
async def test_garbage_is_refused(app: Quart, garbage: str) -> None:
    async with app.app_context():
        assert_invalid_cursor(garbage)
