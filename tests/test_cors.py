"""CORS as the contract words it, through the app's test client: preflights
answered or refused, every response to an allowed origin readable by its
page, ``Vary`` kept, preflights rate-limited; and the WebSocket, which CORS
does not govern, open to a page of any origin that holds a token."""

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from quart import Blueprint, Quart, Response
from quart.typing import TestClientProtocol as Client

from taskflow.config import Config

from .support import create_project, create_task, create_user, problem_of, running

APP_ORIGIN = "https://app.example.com"
DEV_ORIGIN = "http://localhost:3000"
OTHER_ORIGINS = [
    "https://evil.example",
    "null",  # sandboxed frames and file:// pages
    "https://app.example.com.evil.example",
    "http://app.example.com",  # another scheme is another origin
    "https://app.example.com:8443",
    "https://APP.example.com/",
]
ALLOWED_HEADERS = {
    "authorization", "content-type", "if-match", "if-none-match", "idempotency-key",
    "x-request-id",
}  # fmt: skip
EXPOSED_HEADERS = {
    "etag", "location", "retry-after", "ratelimit-limit", "ratelimit-remaining",
    "ratelimit-reset", "x-request-id", "idempotent-replayed",
}  # fmt: skip

vary_probe = Blueprint("vary_probe", __name__)


@vary_probe.get("/test/vary")
async def varies_by_encoding() -> Response:
    """A response that already varies, as a compressed one does."""
    return Response("{}", content_type="application/json", headers={"Vary": "Accept-Encoding"})


@pytest.fixture
async def cors_app(environ: dict[str, str]) -> AsyncIterator[Quart]:
    config = Config.from_env({**environ, "TASKFLOW_CORS_ORIGINS": f"{APP_ORIGIN}, {DEV_ORIGIN}"})
    async with running(config, vary_probe) as app:
        yield app


@pytest.fixture
def cors_client(cors_app: Quart) -> Client:
    return cors_app.test_client()


def listed(value: str | None) -> set[str]:
    return {item.strip().lower() for item in (value or "").split(",") if item.strip()}


def preflight(origin: str, method: str = "PATCH", headers: str = "authorization, if-match") -> Any:
    return {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }


def assert_readable_by(response: Any, origin: str) -> None:
    """The page of *origin* may read *response* and the headers it needs."""
    assert response.headers["Access-Control-Allow-Origin"] == origin
    assert listed(response.headers.get("Access-Control-Expose-Headers")) >= EXPOSED_HEADERS
    assert "origin" in listed(response.headers.get("Vary"))
    assert "Access-Control-Allow-Credentials" not in response.headers


def cors_headers(response: Any) -> list[str]:
    names = {name for name, _value in response.headers.items()}
    return sorted(name for name in names if name.lower().startswith("access-control-"))


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PATCH", "/tasks/{task}"),
        ("POST", "/projects"),
        ("DELETE", "/projects/{project}"),
        ("GET", "/auth/me"),
        ("POST", "/auth/login"),
    ],
)
async def test_a_preflight_from_an_allowed_origin_is_204_with_every_header(
    cors_client: Client, method: str, path: str
) -> None:
    path = path.format(task=uuid.uuid4(), project=uuid.uuid4())
    for origin in (APP_ORIGIN, DEV_ORIGIN):
        response = await cors_client.options(path, headers=preflight(origin, method))
        assert response.status_code == 204
        assert await response.get_data() == b""
        assert_readable_by(response, origin)
        assert listed(response.headers["Access-Control-Allow-Methods"]) >= {
            "get", "post", "put", "patch", "delete",
        }  # fmt: skip
        assert listed(response.headers["Access-Control-Allow-Headers"]) >= ALLOWED_HEADERS
        assert int(response.headers["Access-Control-Max-Age"]) >= 600
        assert response.headers["X-Request-ID"]


async def test_a_preflight_for_a_path_that_does_not_exist_is_answered_and_the_request_gets_its_404(
    cors_client: Client,
) -> None:
    # The preflight answers "may this origin send this?", not "does it exist?":
    # the page then reads the request's own answer, not a bare network error.
    for path, status, code in (
        ("/nowhere", 404, "not_found"),
        ("/tasks/not-a-uuid", 404, "not_found"),
        (f"/tasks/{uuid.uuid4()}", 401, "unauthorized"),
        ("/auth/me", 405, "method_not_allowed"),
    ):
        response = await cors_client.options(path, headers=preflight(APP_ORIGIN, "PATCH"))
        assert response.status_code == 204, path
        assert_readable_by(response, APP_ORIGIN)
        response = await cors_client.patch(path, json={}, headers={"Origin": APP_ORIGIN})
        problem_of(response, await response.get_json(), status, code)
        assert_readable_by(response, APP_ORIGIN)


@pytest.mark.parametrize("origin", OTHER_ORIGINS)
async def test_a_preflight_from_any_other_origin_is_403_forbidden_with_no_cors_headers(
    cors_client: Client, origin: str
) -> None:
    for path in ("/projects", f"/tasks/{uuid.uuid4()}", "/nowhere"):
        response = await cors_client.options(path, headers=preflight(origin))
        problem_of(response, await response.get_json(), 403, "forbidden")
        assert cors_headers(response) == [], path


async def test_with_no_origins_configured_every_preflight_is_refused(client: Client) -> None:
    response = await client.options("/projects", headers=preflight(APP_ORIGIN, "POST"))
    problem_of(response, await response.get_json(), 403, "forbidden")
    assert cors_headers(response) == []
    response = await client.get("/healthz", headers={"Origin": APP_ORIGIN})
    assert response.status_code == 200
    assert cors_headers(response) == []
    # Nothing depends on Origin, so nothing says it does.
    assert "origin" not in listed(response.headers.get("Vary"))


async def test_options_that_is_not_a_preflight_stays_405(cors_client: Client) -> None:
    for headers in (
        {},
        {"Access-Control-Request-Method": "POST"},  # no Origin
        {"Origin": "https://evil.example"},  # no Access-Control-Request-Method
    ):
        response = await cors_client.options("/projects", headers=headers)
        problem_of(response, await response.get_json(), 405, "method_not_allowed")
        assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
        assert cors_headers(response) == []
    # An allowed origin's page may still read that 405 (every response to it).
    response = await cors_client.options("/projects", headers={"Origin": APP_ORIGIN})
    problem_of(response, await response.get_json(), 405, "method_not_allowed")
    assert_readable_by(response, APP_ORIGIN)


async def test_every_response_to_an_allowed_origin_is_readable_with_its_headers_exposed(
    cors_client: Client,
) -> None:
    page = {"Origin": APP_ORIGIN}
    owner = await create_user(cors_client)
    project = await create_project(cors_client, owner)
    task = await create_task(cors_client, project, owner)
    with_token = {**page, **owner.headers}

    created = await cors_client.post("/projects", json={"name": "P"}, headers=with_token)
    assert created.status_code == 201 and created.headers["Location"]
    assert_readable_by(created, APP_ORIGIN)
    read = await cors_client.get(f"/tasks/{task['id']}", headers=with_token)
    assert read.status_code == 200 and read.headers["ETag"]
    assert_readable_by(read, APP_ORIGIN)
    stale = await cors_client.patch(
        f"/tasks/{task['id']}",
        json={"title": "x"},
        headers={**with_token, "If-Match": '"stale"'},
    )
    problem_of(stale, await stale.get_json(), 412, "precondition_failed")
    assert_readable_by(stale, APP_ORIGIN)
    deleted = await cors_client.delete(f"/projects/{project['id']}", headers=with_token)
    assert deleted.status_code == 204
    assert_readable_by(deleted, APP_ORIGIN)

    unauthorized = await cors_client.get("/auth/me", headers=page)
    problem_of(unauthorized, await unauthorized.get_json(), 401, "unauthorized")
    assert_readable_by(unauthorized, APP_ORIGIN)
    invalid = await cors_client.post("/projects", json={"name": ""}, headers=with_token)
    problem_of(invalid, await invalid.get_json(), 422, "validation_failed")
    assert_readable_by(invalid, APP_ORIGIN)
    not_json = await cors_client.post(
        "/projects", data="{", headers={**with_token, "Content-Type": "application/json"}
    )
    problem_of(not_json, await not_json.get_json(), 400, "invalid_json")
    assert_readable_by(not_json, APP_ORIGIN)
    wrong_method = await cors_client.put("/auth/me", headers=with_token)
    problem_of(wrong_method, await wrong_method.get_json(), 405, "method_not_allowed")
    assert_readable_by(wrong_method, APP_ORIGIN)


async def test_a_request_from_another_origin_is_served_without_cors_headers(
    cors_client: Client,
) -> None:
    # Not a preflight: the server answers, the browser keeps the answer from the page.
    response = await cors_client.get("/healthz", headers={"Origin": "https://evil.example"})
    assert response.status_code == 200
    assert cors_headers(response) == []
    assert "origin" in listed(response.headers["Vary"])
    same_origin_tools = await cors_client.get("/healthz")  # curl, scripts: no Origin
    assert cors_headers(same_origin_tools) == []
    assert "origin" in listed(same_origin_tools.headers["Vary"])


async def test_vary_origin_is_added_to_the_vary_already_there(cors_app: Quart) -> None:
    async def compress(response: Response) -> Response:
        # As a compression hook registered after CORS's does.
        response.vary.add("Accept-Encoding")
        return response

    client = cors_app.test_client()
    # A body large enough to compress: the app's own hooks, in their own order.
    spec = await client.get(
        "/openapi.json", headers={"Origin": APP_ORIGIN, "Accept-Encoding": "gzip"}
    )
    assert_readable_by(spec, APP_ORIGIN)
    if spec.headers.get("Content-Encoding") == "gzip":
        assert vary_fields(spec) == ["accept-encoding", "origin"]

    cors_app.after_request(compress)
    for origin in (APP_ORIGIN, "https://evil.example"):
        response = await client.get("/test/vary", headers={"Origin": origin})
        assert vary_fields(response) == ["accept-encoding", "origin"]
        response = await client.get("/healthz", headers={"Origin": origin})
        assert vary_fields(response) == ["accept-encoding", "origin"]


def vary_fields(response: Any) -> list[str]:
    """Every field named by the response's Vary headers, sorted, repeats kept."""
    return sorted(
        field.strip().lower()
        for line in response.headers.getlist("Vary")
        for field in line.split(",")
        if field.strip()
    )


async def test_preflights_are_rate_limited_like_every_request(environ: dict[str, str]) -> None:
    limited = {
        **environ,
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": "3",
        "TASKFLOW_CORS_ORIGINS": APP_ORIGIN,
    }
    async with running(Config.from_env(limited)) as app:
        client = app.test_client()
        remaining = []
        for _ in range(3):
            response = await client.options("/projects", headers=preflight(APP_ORIGIN, "POST"))
            assert response.status_code == 204
            remaining.append(int(response.headers["RateLimit-Remaining"]))
        assert remaining == sorted(remaining, reverse=True)
        # Over the limit, a preflight is refused before its origin is looked
        # at; the allowed origin's page may read its 429.
        for origin in (APP_ORIGIN, "https://evil.example"):
            refused = await client.options("/tasks/x", headers=preflight(origin, "PATCH"))
            problem_of(refused, await refused.get_json(), 429, "rate_limited")
            assert int(refused.headers["Retry-After"]) >= 1
            assert refused.headers["RateLimit-Remaining"] == "0"
            if origin == APP_ORIGIN:
                assert_readable_by(refused, APP_ORIGIN)
            else:
                assert cors_headers(refused) == []


async def test_a_websocket_is_not_refused_for_its_origin(cors_app: Quart) -> None:
    # CORS does not govern WebSockets, and a socket is authenticated by a
    # token its page presents, never a cookie: a page of any origin that
    # holds a token may use it, as any other client may.
    client = cors_app.test_client()
    user = await create_user(client)
    async with client.websocket(
        "/ws", headers={"Origin": "https://evil.example", **user.headers}
    ) as socket:
        ready = json.loads(await socket.receive())
    assert ready == {"type": "ready", "user_id": user.id}
