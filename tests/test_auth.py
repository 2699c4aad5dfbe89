"""CONTRACT "Auth": the journey, every error, token tampering, rotation and theft."""

import asyncio
import base64
import json
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import jwt
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client
from sqlalchemy import delete, select, update

from taskflow import security
from taskflow.config import Config
from taskflow.db import backends
from taskflow.models import AuthSession, User
from taskflow.passwords import BCRYPT_QUEUE, BCRYPT_THREADS, hasher

from .support import PASSWORD, create_user, login, problem_of, redis_only, running, statements


async def json_of(response: Any) -> Any:
    return await response.get_json()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_the_whole_journey(client: Client) -> None:
    response = await client.post(
        "/auth/register", json={"email": "  Ada@Example.COM ", "password": PASSWORD}
    )
    assert response.status_code == 201
    user = await json_of(response)
    assert set(user) == {"id", "email", "created_at"}
    assert user["email"] == "ada@example.com"
    assert user["created_at"].endswith("Z")

    tokens = await login(client, "ADA@example.com")
    assert set(tokens) == {"access_token", "refresh_token", "token_type", "expires_in"}
    assert (tokens["token_type"], tokens["expires_in"]) == ("bearer", 900)

    me = await client.get("/auth/me", headers=bearer(tokens["access_token"]))
    assert (me.status_code, await json_of(me)) == (200, user)

    refreshed = await client.post("/auth/refresh", json={"refresh_token": tokens["refresh_token"]})
    assert refreshed.status_code == 200
    second = await json_of(refreshed)
    assert second["refresh_token"] != tokens["refresh_token"]
    assert second["access_token"] != tokens["access_token"]

    again = await client.post("/auth/refresh", json={"refresh_token": second["refresh_token"]})
    assert again.status_code == 200
    third = await json_of(again)
    assert (await client.get("/auth/me", headers=bearer(third["access_token"]))).status_code == 200

    logout = await client.post("/auth/logout", headers=bearer(third["access_token"]))
    assert logout.status_code == 204
    assert await logout.get_data() == b""

    for token in (third["access_token"], tokens["access_token"]):
        refused = await client.get("/auth/me", headers=bearer(token))
        problem_of(refused, await json_of(refused), 401, "session_revoked")
        assert refused.headers["WWW-Authenticate"] == "Bearer"
    refused = await client.post("/auth/refresh", json={"refresh_token": third["refresh_token"]})
    problem_of(refused, await json_of(refused), 401, "session_revoked")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@b", "password": PASSWORD}, "email"),
        ({"email": ("x" * 250) + "@example.com", "password": PASSWORD}, "email"),
        ({"email": "short@example.com", "password": "seven77"}, "password"),
        # 37 characters, 74 bytes: short enough in characters, too long for bcrypt.
        ({"email": "long@example.com", "password": "é" * 37}, "password"),
        ({"email": "long@example.com", "password": "x" * 73}, "password"),
        ({"email": "extra@example.com", "password": PASSWORD, "id": "mine"}, "id"),
        ({"password": PASSWORD}, "email"),
        ({"email": "nopass@example.com"}, "password"),
        ({"email": 5, "password": PASSWORD}, "email"),
    ],
)
async def test_registration_is_validated(client: Client, body: dict[str, Any], field: str) -> None:
    response = await client.post("/auth/register", json=body)
    payload = await json_of(response)
    problem_of(response, payload, 422, "validation_failed")
    assert field in [error["field"] for error in payload["errors"]]


async def test_password_limits_are_inclusive(client: Client) -> None:
    for email, password in (("eight@example.com", "8" * 8), ("bytes@example.com", "x" * 72)):
        response = await client.post("/auth/register", json={"email": email, "password": password})
        assert response.status_code == 201
        await login(client, email, password)


async def test_taken_email_is_409_whatever_its_case(client: Client) -> None:
    await create_user(client, "taken@example.com")
    response = await client.post(
        "/auth/register", json={"email": "TAKEN@example.com", "password": PASSWORD}
    )
    problem_of(response, await json_of(response), 409, "conflict")


async def test_concurrent_registrations_of_one_email_make_one_account(client: Client) -> None:
    body = {"email": "race@example.com", "password": PASSWORD}
    responses = await asyncio.gather(*(client.post("/auth/register", json=body) for _ in range(8)))
    assert sorted(r.status_code for r in responses) == [201] + [409] * 7


async def test_bad_logins_are_one_indistinguishable_401(client: Client) -> None:
    await create_user(client, "known@example.com")
    attempts = [
        {"email": "known@example.com", "password": "wrong password"},
        {"email": "unknown@example.com", "password": PASSWORD},
        {"email": "known@example.com", "password": "x" * 73},
        {"email": "known@example.com", "password": "x" * 100_000},
        {"email": "not an email", "password": PASSWORD},
    ]
    bodies = []
    for attempt in attempts:
        response = await client.post("/auth/login", json=attempt)
        body = await json_of(response)
        problem_of(response, body, 401, "invalid_credentials")
        bodies.append({k: v for k, v in body.items() if k != "request_id"})
    assert all(body == bodies[0] for body in bodies)


async def test_unknown_email_costs_the_same_bcrypt_work(environ: dict[str, str]) -> None:
    # At a real cost the hash dominates: an unknown email must not answer faster.
    async with running(Config.from_env({**environ, "TASKFLOW_BCRYPT_ROUNDS": "10"})) as app:
        client = app.test_client()
        await create_user(client, "timed@example.com")

        async def seconds(email: str) -> float:
            started = time.perf_counter()
            await client.post("/auth/login", json={"email": email, "password": "nope-nope"})
            return time.perf_counter() - started

        # Interleaved, so that a burst of load on the machine falls on both.
        samples: dict[str, list[float]] = {"timed@example.com": [], "nobody@example.com": []}
        for _ in range(7):
            for email, timings in samples.items():
                timings.append(await seconds(email))
        known, unknown = (sorted(timings)[3] for timings in samples.values())
        assert 0.5 < unknown / known < 2, (known, unknown)


def forge(config: Config, token: str, **changes: Any) -> str:
    """Re-sign *token*'s claims with *changes*; ``key``/``header`` override those."""
    header = jwt.get_unverified_header(token)
    claims = jwt.decode(token, options={"verify_signature": False})
    key = changes.pop("key", config.secret_key)
    header.update(changes.pop("header", {}))
    claims.update(changes)
    return jwt.encode(claims, key, algorithm="HS256", headers=header)


def unsigned(token: str) -> str:
    """The same claims with ``alg: none`` and no signature."""

    def b64(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = jwt.decode(token, options={"verify_signature": False})
    return f"{b64({'alg': 'none', 'typ': 'at+jwt'})}.{b64(claims)}."


def edited_payload(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    claims["sub"] = "00000000-0000-0000-0000-000000000000"
    edited = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{edited}.{signature}"


async def test_tampered_tokens_are_refused(client: Client, config: Config) -> None:
    user = await create_user(client)
    access, refresh = user.access_token, user.refresh_token
    past = datetime.now(UTC) - timedelta(hours=1)
    bad_access = {
        "alg none": unsigned(access),
        "wrong key": forge(config, access, key="another-secret-key-of-enough-length!"),
        "edited payload": edited_payload(access),
        "wrong issuer": forge(config, access, iss="someone-else"),
        "wrong audience": forge(config, access, aud="another-api"),
        "refresh token as access": refresh,
        "typ rewritten to access": forge(config, refresh, header={"typ": "at+jwt"}),
        "missing jti": jwt.encode(
            {
                k: v
                for k, v in jwt.decode(access, options={"verify_signature": False}).items()
                if k != "jti"
            },
            config.secret_key,
            algorithm="HS256",
            headers={"typ": "at+jwt"},
        ),
        "garbage": "not.a.token",
    }
    for name, token in bad_access.items():
        response = await client.get("/auth/me", headers=bearer(token))
        problem_of(response, await json_of(response), 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer", name

    expired = forge(config, access, exp=int(past.timestamp()), iat=int(past.timestamp()) - 60)
    response = await client.get("/auth/me", headers=bearer(expired))
    problem_of(response, await json_of(response), 401, "token_expired")

    for name, token in {
        "access token as refresh": access,
        "refresh with wrong key": forge(config, refresh, key="x" * 40),
        "refresh typ rewritten": forge(config, access, header={"typ": "rt+jwt"}),
    }.items():
        response = await client.post("/auth/refresh", json={"refresh_token": token})
        problem_of(response, await json_of(response), 401, "unauthorized")
        assert name

    # None of that harmed the real session.
    assert (await client.get("/auth/me", headers=bearer(access))).status_code == 200


@pytest.mark.parametrize(
    "header", ["", "Bearer", "Bearer ", "Basic dXNlcjpwYXNz", "Token abc", "bearer"]
)
async def test_missing_or_malformed_authorization_is_401(client: Client, header: str) -> None:
    response = await client.get("/auth/me", headers={"Authorization": header} if header else {})
    problem_of(response, await json_of(response), 401, "unauthorized")
    assert response.headers["WWW-Authenticate"] == "Bearer"


async def test_token_of_a_deleted_user_is_refused(client: Client, app: Quart) -> None:
    user = await create_user(client)
    async with app.app_context(), backends().engine.begin() as connection:
        await connection.execute(delete(User).where(User.email == user.email))
    response = await client.get("/auth/me", headers=user.headers)
    assert response.status_code == 401
    response = await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
    assert response.status_code == 401


async def age_the_last_refresh(app: Quart, seconds: float) -> None:
    """Move every session's last refresh *seconds* into the past."""
    async with app.app_context(), backends().engine.begin() as connection:
        refreshed = await connection.execute(
            select(AuthSession.id, AuthSession.refreshed_at).where(
                AuthSession.refreshed_at.is_not(None)
            )
        )
        for session_id, refreshed_at in refreshed.all():
            await connection.execute(
                update(AuthSession)
                .where(AuthSession.id == session_id)
                .values(refreshed_at=refreshed_at - timedelta(seconds=seconds))
            )


async def test_reusing_a_spent_refresh_token_revokes_the_whole_session(
    app: Quart, client: Client
) -> None:
    user = await create_user(client)
    first = await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
    newest = await json_of(first)
    await age_the_last_refresh(app, 11)  # past the reuse interval: a thief's replay

    replay = await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
    problem_of(replay, await json_of(replay), 401, "session_revoked")

    # The thief's replay took the legitimate newest tokens down with it.
    response = await client.post("/auth/refresh", json={"refresh_token": newest["refresh_token"]})
    problem_of(response, await json_of(response), 401, "session_revoked")
    for token in (newest["access_token"], user.access_token):
        response = await client.get("/auth/me", headers=bearer(token))
        problem_of(response, await json_of(response), 401, "session_revoked")

    # Other sessions of the same user are untouched.
    other = await login(client, user.email)
    assert (await client.get("/auth/me", headers=bearer(other["access_token"]))).status_code == 200


async def test_a_token_spent_moments_ago_is_token_expired_and_revokes_nothing(
    app: Quart, client: Client
) -> None:
    user = await create_user(client)
    first = await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
    newest = await json_of(first)
    await age_the_last_refresh(app, 9)  # still within the 10 s

    again = await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
    problem_of(again, await json_of(again), 401, "token_expired")
    me = await client.get("/auth/me", headers=bearer(newest["access_token"]))
    assert me.status_code == 200
    following = await client.post("/auth/refresh", json={"refresh_token": newest["refresh_token"]})
    assert following.status_code == 200


async def test_of_concurrent_refreshes_exactly_one_succeeds_and_its_tokens_work(
    client: Client,
) -> None:
    user = await create_user(client)
    body = {"refresh_token": user.refresh_token}
    responses = await asyncio.gather(*(client.post("/auth/refresh", json=body) for _ in range(20)))
    statuses = sorted(response.status_code for response in responses)
    assert statuses == [200] + [401] * 19
    losers = [await json_of(r) for r in responses if r.status_code == 401]
    assert {loser["code"] for loser in losers} == {"token_expired"}
    (winner,) = [await json_of(r) for r in responses if r.status_code == 200]
    me = await client.get("/auth/me", headers=bearer(winner["access_token"]))
    assert me.status_code == 200
    following = await client.post("/auth/refresh", json={"refresh_token": winner["refresh_token"]})
    assert following.status_code == 200


async def test_healthz_answers_while_logins_hash(environ: dict[str, str]) -> None:
    async with running(Config.from_env({**environ, "TASKFLOW_BCRYPT_ROUNDS": "12"})) as app:
        client = app.test_client()
        await create_user(client, "busy@example.com")
        finished: list[str] = []

        async def one_login() -> None:
            await client.post("/auth/login", json={"email": "busy@example.com", "password": "x"})
            finished.append("login")

        logins = [asyncio.create_task(one_login()) for _ in range(8)]
        await asyncio.sleep(0.05)  # the logins are hashing now
        for _ in range(5):
            response = await client.get("/healthz")
            assert response.status_code == 200
            finished.append("healthz")
        await asyncio.gather(*logins)
        # Every probe answered before the first of the 8 logins did.
        assert finished[:5] == ["healthz"] * 5


async def test_logins_beyond_the_hashing_queue_are_503_at_once(environ: dict[str, str]) -> None:
    config = Config.from_env(
        {**environ, "TASKFLOW_BCRYPT_ROUNDS": "12", "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE": "1000"}
    )
    async with running(config) as app:
        client = app.test_client()
        await create_user(client, "flood@example.com")
        flood = 3 * (BCRYPT_THREADS + BCRYPT_QUEUE)

        async def one_login() -> tuple[int, float, str | None]:
            started = time.perf_counter()
            response = await client.post(
                "/auth/login", json={"email": "flood@example.com", "password": PASSWORD}
            )
            return (
                response.status_code,
                time.perf_counter() - started,
                response.headers.get("Retry-After"),
            )

        answers = await asyncio.gather(*(one_login() for _ in range(flood)))
    served = [answer for answer in answers if answer[0] == 200]
    refused = [answer for answer in answers if answer[0] == 503]
    assert len(served) + len(refused) == flood, answers
    # The threads and the queue are used to the full; the rest are told to
    # come back, without waiting for a hash first. (Exactly the capacity is
    # served when all arrive at once; on SQLite, where looking the user up is
    # serialised, a late arrival may find a place freed meanwhile.)
    capacity = BCRYPT_THREADS + BCRYPT_QUEUE
    assert len(served) >= capacity and len(refused) >= flood // 3, answers
    assert all(retry_after == "1" for _, _, retry_after in refused)
    served_seconds = sorted(seconds for _, seconds, _ in served)
    assert max(seconds for _, seconds, _ in refused) < served_seconds[len(served_seconds) // 2]


async def test_a_login_the_busy_cores_cannot_hash_in_time_is_503_at_the_deadline(
    environ: dict[str, str],
) -> None:
    async with running(Config.from_env({**environ, "TASKFLOW_BCRYPT_ROUNDS": "14"})) as app:
        async with app.app_context():
            hasher().deadline_seconds = 0.05
        client = app.test_client()
        started = time.perf_counter()
        response = await client.post(
            "/auth/register", json={"email": "late@example.com", "password": PASSWORD}
        )
        seconds = time.perf_counter() - started
    problem_of(response, await response.get_json(), 503, "service_unavailable")
    assert response.headers["Retry-After"] == "1"
    assert seconds < 0.5  # a cost-14 hash takes a second or more


async def test_logs_never_hold_passwords_or_tokens(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    # Started here, not by a fixture, so that its log handler writes to this capture.
    async with running(config) as app:
        client = app.test_client()
        user = await create_user(client, "logged@example.com")
        await client.post("/auth/login", json={"email": user.email, "password": "wrong-password"})
        refreshed = await json_of(
            await client.post("/auth/refresh", json={"refresh_token": user.refresh_token})
        )
        await client.get("/auth/me", headers=bearer("garbage-token-value"))
        await client.post("/auth/logout", headers=bearer(refreshed["access_token"]))
    logged = capsys.readouterr().err
    assert "taskflow.access" in logged
    for secret in (
        PASSWORD,
        "wrong-password",
        "garbage-token-value",
        user.access_token,
        user.refresh_token,
        refreshed["access_token"],
        refreshed["refresh_token"],
    ):
        assert secret not in logged


async def test_openapi_describes_the_auth_routes(client: Client) -> None:
    spec = await json_of(await client.get("/openapi.json"))
    expected = {
        ("/auth/register", "post"): {"201", "409", "422", "415", "400", "413", "429"},
        ("/auth/login", "post"): {"200", "401", "422", "429"},
        ("/auth/refresh", "post"): {"200", "401", "422", "429"},
        ("/auth/logout", "post"): {"204", "401", "429"} - {"204"},
        ("/auth/me", "get"): {"200", "401", "429"},
    }
    for (path, method), statuses in expected.items():
        operation = spec["paths"][path][method]
        assert statuses <= set(operation["responses"]), (path, operation["responses"].keys())
        assert operation["summary"]
        problem = operation["responses"]["429"]["content"]["application/problem+json"]
        assert problem["schema"] == {"$ref": "#/components/schemas/Problem"}
    for path in ("/auth/register", "/auth/login", "/auth/refresh"):
        assert "requestBody" in spec["paths"][path]["post"]
        assert "security" not in spec["paths"][path]["post"]
    assert spec["paths"]["/auth/me"]["get"]["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"


async def test_with_redis_down_the_database_answers_the_session_check(
    environ: dict[str, str],
) -> None:
    dead_redis = {**environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    async with running(Config.from_env(dead_redis)) as app:
        client = app.test_client()
        user = await create_user(client)
        assert (await client.get("/auth/me", headers=user.headers)).status_code == 200
        assert (await client.post("/auth/logout", headers=user.headers)).status_code == 204
        response = await client.get("/auth/me", headers=user.headers)
        problem_of(response, await json_of(response), 401, "session_revoked")


@pytest.mark.parametrize("redis", ["down", pytest.param("marks expired", marks=redis_only)])
async def test_many_sessions_are_checked_in_one_query_a_kind(
    environ: dict[str, str], redis: str
) -> None:
    # A worker's WebSocket sessions are all checked at once (ws.SessionWatch):
    # while Redis is away, or for marks it no longer has, one query for the
    # login sessions and one for the API tokens, not one a session.
    if redis == "down":
        environ = {**environ, "REDIS_URL": "redis://127.0.0.1:1/0"}
    async with running(Config.from_env(environ)) as app:
        client = app.test_client()
        users = [await create_user(client) for _ in range(4)]
        kept, deleted = [
            await (
                await client.post(
                    "/auth/tokens", json={"name": "CI", "scope": "read"}, headers=users[0].headers
                )
            ).get_json()
            for _ in range(2)
        ]
        tokens = [user.access_token for user in users] + [kept["token"], deleted["token"]]
        async with app.app_context():
            # The callers of six open sockets; then a logout and a deleted token.
            callers = [await security.token_caller(token) for token in tokens]
        delete_token = f"/auth/tokens/{deleted['id']}"
        assert (await client.delete(delete_token, headers=users[0].headers)).status_code == 204
        assert (await client.post("/auth/logout", headers=users[1].headers)).status_code == 204
        async with app.app_context():
            keys = [security.session_mark_key(caller.session_id) for caller in callers]
            if redis == "marks expired":
                await backends().redis.call(lambda r: r.delete(*keys))
            async with statements(app) as sent:
                live = await security.sessions_live(callers)
            assert live == [True, False, True, True, True, False]
            assert len(sent) == 2, sent
            if redis == "marks expired":
                marks = await backends().redis.call(lambda r: r.mget(keys))
                assert marks == [b"1", b"0", b"1", b"1", b"1", b"0"]
                async with statements(app) as sent:
                    assert await security.sessions_live(callers) == live
                assert sent == []
