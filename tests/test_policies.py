"""Policies that hold for every route, found by walking ``app.url_map``, so a
new route cannot forget its authentication or its rate limit."""

import uuid

from quart import Quart
from quart.typing import TestClientProtocol as Client
from werkzeug.routing import Rule

from taskflow.idempotency import keeps_responses

from .support import create_user, problem_of

# Routes anyone may call. Everything else must refuse a caller without a token.
PUBLIC_ENDPOINTS = {
    "auth.register",
    "auth.login",
    "auth.refresh",
    "ops.healthz",
    "ops.readyz",
    "openapi",
    "swagger_ui",
    "ops.docs_asset",
}
BODY_METHODS = {"POST", "PUT", "PATCH"}


def http_routes(app: Quart) -> list[tuple[Rule, str, str]]:
    """Every (rule, method, concrete URL) the app serves over HTTP."""
    routes = []
    for rule in app.url_map.iter_rules():
        if rule.websocket:
            continue
        url = rule.rule
        for argument in rule.arguments:
            url = url.replace(f"<uuid:{argument}>", str(uuid.uuid4()))
            url = url.replace(f"<{argument}>", "x")
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            routes.append((rule, method, url))
    return routes


async def test_every_route_but_the_public_ones_requires_a_token(app: Quart, client: Client) -> None:
    endpoints = {rule.endpoint for rule in app.url_map.iter_rules()}
    assert endpoints >= PUBLIC_ENDPOINTS, "a public endpoint was renamed: update this list"
    checked = 0
    for rule, method, url in http_routes(app):
        if rule.endpoint in PUBLIC_ENDPOINTS:
            continue
        body = {"json": {}} if method in BODY_METHODS else {}
        response = await client.open(url, method=method, **body)
        problem_of(response, await response.get_json(), 401, "unauthorized")
        assert response.headers["WWW-Authenticate"] == "Bearer"
        checked += 1
    assert checked >= 2  # logout and me at least


async def test_every_route_is_rate_limited(app: Quart, client: Client) -> None:
    for _rule, method, url in http_routes(app):
        body = {"json": {}} if method in BODY_METHODS else {}
        response = await client.open(url, method=method, **body)
        assert int(response.headers["RateLimit-Limit"]) > 0, (method, url)
        assert "RateLimit-Remaining" in response.headers
        assert "RateLimit-Reset" in response.headers


async def test_every_post_and_patch_takes_an_idempotency_key(app: Quart, client: Client) -> None:
    """A malformed key is a 400 on every one; on every route with a bearer
    token the first answer is kept, so the key cannot serve another body."""
    user = await create_user(client)
    keyed = 0
    for rule, method, url in http_routes(app):
        if method not in ("POST", "PATCH"):
            continue
        headers = {**user.headers, "Idempotency-Key": "not valid"}
        response = await client.open(url, method=method, json={}, headers=headers)
        problem_of(response, await response.get_json(), 400, "invalid_idempotency_key")
        if not keeps_responses(app.view_functions[rule.endpoint], method):
            continue  # no bearer token, or a secret in the response: checked, not kept
        if rule.endpoint == "auth.logout":
            continue  # its first answer ends the session the repeat would need
        key = f"policy-{rule.endpoint}"
        headers = {**user.headers, "Idempotency-Key": key}
        first = await client.open(url, method=method, json={"a": 1}, headers=headers)
        assert first.status_code < 500
        again = await client.open(url, method=method, json={"a": 1}, headers=headers)
        assert again.headers.get("Idempotent-Replayed") == "true", (method, url)
        other = await client.open(url, method=method, json={"a": 2}, headers=headers)
        problem_of(other, await other.get_json(), 422, "idempotency_key_reused")
        keyed += 1
    assert keyed >= 5
