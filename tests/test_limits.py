"""Rate limits: keys, the login and registration limits, and the 429 shape."""

from collections.abc import AsyncIterator

import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from taskflow.config import Config

from .conftest import PASSWORD, create_user, problem_of, running

AUTH_LIMIT = 3


@pytest.fixture
async def limited_app(environ: dict[str, str]) -> AsyncIterator[Quart]:
    """An app behind one trusted proxy, with a tight login/registration limit."""
    config = Config.from_env(
        {
            **environ,
            "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE": str(AUTH_LIMIT),
            "TASKFLOW_TRUSTED_PROXY_HOPS": "1",
        }
    )
    async with running(config) as app:
        yield app


def from_address(address: str, forged: str | None = None) -> dict[str, str]:
    """Headers as the trusted proxy sends them: whatever the client claimed, then
    the address the proxy saw."""
    return {"X-Forwarded-For": f"{forged}, {address}" if forged else address}


async def test_login_is_limited_per_email_across_addresses(limited_app: Quart) -> None:
    client = limited_app.test_client()
    user = await create_user(client, "target@example.com")  # one login spent
    body = {"email": user.email, "password": "guess-guess"}
    statuses = []
    for n in range(AUTH_LIMIT + 1):
        response = await client.post("/auth/login", json=body, headers=from_address(f"10.0.0.{n}"))
        statuses.append(response.status_code)
    assert statuses[: AUTH_LIMIT - 1] == [401] * (AUTH_LIMIT - 1)
    assert statuses[-1] == 429
    # Another account is not affected by the attack on this one.
    other = await client.post(
        "/auth/register",
        json={"email": "other@example.com", "password": PASSWORD},
        headers=from_address("10.9.9.9"),
    )
    assert other.status_code == 201


async def test_registration_is_limited_per_address_and_forged_hops_do_not_help(
    limited_app: Quart,
) -> None:
    client: Client = limited_app.test_client()
    statuses = []
    for n in range(AUTH_LIMIT + 2):
        response = await client.post(
            "/auth/register",
            json={"email": f"user{n}@example.com", "password": PASSWORD},
            headers=from_address("192.0.2.7", forged=f"203.0.113.{n}"),
        )
        statuses.append(response.status_code)
    assert statuses == [201] * AUTH_LIMIT + [429, 429]


async def test_429_is_a_problem_with_retry_after_and_ratelimit_headers(
    limited_app: Quart,
) -> None:
    client = limited_app.test_client()
    body = {"email": "nobody@example.com", "password": PASSWORD}
    for _ in range(AUTH_LIMIT):
        await client.post("/auth/login", json=body, headers=from_address("198.51.100.1"))
    response = await client.post("/auth/login", json=body, headers=from_address("198.51.100.1"))
    problem_of(response, await response.get_json(), 429, "rate_limited")
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["RateLimit-Limit"] == str(AUTH_LIMIT)
    assert response.headers["RateLimit-Remaining"] == "0"
    assert int(response.headers["RateLimit-Reset"]) >= 1
