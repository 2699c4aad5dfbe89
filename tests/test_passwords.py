"""Passwords: bcrypt's C-string boundary, and what registration refuses."""

from __future__ import annotations

import pytest
from quart.typing import TestClientProtocol as Client

from taskflow.passwords import has_control_characters

from .support import PASSWORD, create_user, problem_of


@pytest.mark.parametrize(
    "password",
    ["abc\x00abc\x00abc", "\x00" * 8, "tab\there-long", "line\nbreak-pw", "del\x7fete-pw"],
)
async def test_a_password_with_a_control_character_is_refused(
    client: Client, password: str
) -> None:
    response = await client.post(
        "/auth/register", json={"email": "nul@example.com", "password": password}
    )
    body = await response.get_json()
    problem_of(response, body, 422, "validation_failed")
    assert body["errors"][0]["field"] == "password"
    assert "control characters" in body["errors"][0]["message"]


async def test_what_a_nul_would_cut_to_never_logs_in(client: Client) -> None:
    """bcrypt stops at a NUL: were "abc\\0…" accepted, "abc" would log in."""
    for password in ("abc\x00abc\x00abc", "\x00" * 8):
        await client.post("/auth/register", json={"email": "cut@example.com", "password": password})
    for attempt in ("abc", "", "abc\x00abc\x00abc", "\x00" * 8):
        response = await client.post(
            "/auth/login", json={"email": "cut@example.com", "password": attempt}
        )
        problem_of(response, await response.get_json(), 401, "invalid_credentials")


async def test_a_login_with_a_control_character_is_the_usual_401(client: Client) -> None:
    user = await create_user(client)
    response = await client.post(
        "/auth/login", json={"email": user.email, "password": PASSWORD + "\x00anything"}
    )
    problem_of(response, await response.get_json(), 401, "invalid_credentials")
    # The real password still works.
    ok = await client.post("/auth/login", json={"email": user.email, "password": PASSWORD})
    assert ok.status_code == 200


def test_control_characters_are_the_c0_and_c1_sets_and_delete() -> None:
    assert all(has_control_characters(chr(code)) for code in [*range(0x20), *range(0x7F, 0xA0)])
    assert not any(has_control_characters(text) for text in ("pässwörd", "пароль", "密码 🔑", " "))
