"""The OpenAPI document agrees with the routes, and /docs renders it offline."""

import asyncio
import gzip
import os
import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest
from quart import Quart
from quart.typing import TestClientProtocol as Client

from .support import live_server

HIDDEN = {"openapi", "swagger_ui", "ops.docs_asset"}
PROBLEM = {"$ref": "#/components/schemas/Problem"}


async def spec_of(client: Client) -> dict[str, Any]:
    response = await client.get("/openapi.json")
    assert response.status_code == 200
    spec: dict[str, Any] = await response.get_json()
    return spec


async def test_every_route_is_described_with_its_errors(app: Quart, client: Client) -> None:
    spec = await spec_of(client)
    described = 0
    for rule in app.url_map.iter_rules():
        if rule.websocket or rule.endpoint in HIDDEN:
            continue
        path = re.sub(r"<(?:[^:>]*:)?([^>]+)>", r"{\1}", rule.rule)
        for method in (rule.methods or set()) - {"HEAD", "OPTIONS"}:
            operation = spec["paths"][path][method.lower()]
            described += 1
            assert operation.get("summary"), (path, method)
            responses = operation["responses"]
            assert any(status < "400" for status in responses), (path, method)
            for status, response in responses.items():
                if status >= "400":
                    assert response["content"]["application/problem+json"]["schema"] == PROBLEM
            assert {"429", "500", "503"} <= set(responses)
            if rule.arguments:
                assert "404" in responses
            if "security" in operation:
                assert "401" in responses
            if "requestBody" in operation:
                assert {"400", "413", "415", "422"} <= set(responses)
    assert described >= 20


async def test_conditional_and_idempotent_requests_are_described(
    app: Quart, client: Client
) -> None:
    spec = await spec_of(client)
    keyed = 0
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            headers = {p["name"]: p for p in operation.get("parameters", []) if p["in"] == "header"}
            responses = operation["responses"]
            if method in ("post", "patch"):
                assert "Idempotency-Key" in headers, (path, method)
                assert "400" in responses
            kept = "Makes a retry safe" in headers.get("Idempotency-Key", {}).get("description", "")
            if kept:
                assert "security" in operation, (path, method)
                keyed += 1
                assert {"409", "422"} <= set(responses), (path, method)
                for status, response in responses.items():
                    if status < "300":
                        assert "Idempotent-Replayed" in response["headers"], (path, method)
            if "412" in responses:
                assert "If-Match" in headers, (path, method)
    assert keyed >= 6  # projects, project, members, tasks, task, logout…
    for secret in ("/auth/tokens", "/auth/register", "/auth/login"):  # never kept
        key = spec["paths"][secret]["post"]["parameters"]
        assert "not kept" in next(p for p in key if p["name"] == "Idempotency-Key")["description"]
    for path in ("/tasks/{task_id}", "/projects/{project_id}"):
        read = spec["paths"][path]["get"]
        assert "If-None-Match" in {p["name"] for p in read["parameters"]}
        assert "ETag" in read["responses"]["304"]["headers"]
        assert "ETag" in read["responses"]["200"]["headers"]
        for method in ("put", "patch", "delete"):
            assert "412" in spec["paths"][path][method]["responses"], (path, method)
    for path in ("/projects", "/projects/{project_id}/tasks"):
        created = spec["paths"][path]["post"]["responses"]["201"]["headers"]
        assert {"Location", "ETag", "Idempotent-Replayed"} <= set(created)


async def test_task_list_parameters_and_models(client: Client) -> None:
    spec = await spec_of(client)
    operation = spec["paths"]["/projects/{project_id}/tasks"]["get"]
    names = {parameter["name"] for parameter in operation["parameters"]}
    assert names >= {
        "project_id", "status", "assignee_id", "due_before", "due_after", "q", "sort", "limit",
        "cursor",
    }  # fmt: skip
    assert operation["security"] == [{"bearer": []}]
    schemas = spec["components"]["schemas"]
    assert set(schemas["TaskOut"]["properties"]) == {
        "id", "project_id", "title", "description", "status", "assignee_id", "due_date",
        "created_at", "updated_at",
    }  # fmt: skip
    create = spec["paths"]["/projects/{project_id}/tasks"]["post"]
    assert "412" not in create["responses"] and "201" in create["responses"]
    assert "412" in spec["paths"]["/tasks/{task_id}"]["patch"]["responses"]
    assert "403" in spec["paths"]["/projects/{project_id}"]["delete"]["responses"]
    assert "204" in spec["paths"]["/projects/{project_id}"]["delete"]["responses"]


async def test_emails_are_described_as_the_server_takes_them(client: Client) -> None:
    spec = await spec_of(client)
    for path in ("/auth/register", "/projects/{project_id}/members"):
        body = spec["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        email = body["schema"]["properties"]["email"]
        assert (email["type"], email["format"], email["maxLength"]) == ("string", "email", 254)
        # No pattern: the server takes every address email-validator takes.
        assert "pattern" not in email, path
        assert "email-validator" in email["description"]
        assert "trimmed" in email["description"] and "DNS" in email["description"]


async def test_docs_page_loads_nothing_from_elsewhere(client: Client) -> None:
    page = (await (await client.get("/docs")).get_data()).decode()
    assets = re.findall(r'(?:src|href)="([^"]+)"', page)
    assert assets and all(asset.startswith("/") for asset in assets), assets
    for asset in assets:
        response = await client.get(asset)
        assert response.status_code == 200, asset
        assert len(await response.get_data()) > 1000
        # Over 1 KiB, so compressed like any other body.
        packed = await client.get(asset, headers={"Accept-Encoding": "gzip"})
        assert packed.headers["Content-Encoding"] == "gzip", asset
        assert gzip.decompress(await packed.get_data()) == await response.get_data()
        assert packed.headers["Content-Type"] == response.headers["Content-Type"]
    for elsewhere in ("../__init__.py", "..%2f__init__.py", "nope.js", "/etc/passwd"):
        missing = await client.get(f"/docs/assets/{elsewhere}")
        assert missing.status_code == 404, elsewhere


# CI installs Chromium; there a missing browser is a failure, not a skip.
@pytest.mark.skipif(
    shutil.which("chromium") is None and not os.environ.get("CI"), reason="needs chromium"
)
async def test_docs_render_in_a_browser_with_no_internet(
    environ: dict[str, str], tmp_path: Path
) -> None:
    async with live_server(environ) as url:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"{url}/docs")).status_code == 200
        browser = await asyncio.create_subprocess_exec(
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={tmp_path}", "--virtual-time-budget=10000", "--dump-dom",
            f"{url}/docs",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(browser.communicate(), 60)
        dom = output.decode()
    # Swagger UI ran and drew an operation block for the routes.
    assert "opblock" in dom
    for path in ("/auth/login", "/projects/{project_id}/tasks", "/tasks/{task_id}"):
        assert path.replace("{", "").replace("}", "") in dom.replace("{", "").replace("}", "")
