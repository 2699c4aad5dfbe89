"""Compression: bodies over 1 KiB go out gzip when Accept-Encoding allows it,
with Vary; small bodies, 204 and 304 never do."""

import gzip
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest
from quart import Blueprint, Quart, Response
from quart.typing import TestClientProtocol as Client

from taskflow.compression import MIN_BYTES, THREAD_BYTES, allows_gzip
from taskflow.config import Config

from .support import TestUser, create_project, create_task, live_server, register_user, running

GZIP = {"Accept-Encoding": "gzip"}


def is_gzip(response: Any) -> bool:
    return bool(response.headers.get("Content-Encoding") == "gzip")


def varies_on_accept_encoding(response: Any) -> bool:
    vary = ",".join(value for name, value in response.headers.items() if name.lower() == "vary")
    fields = vary.split(",")
    return "accept-encoding" in {field.strip().lower() for field in fields}


async def body_of(response: Any) -> bytes:
    """The body as sent, checked against its Content-Length."""
    body: bytes = await response.get_data()
    assert int(response.headers["Content-Length"]) == len(body)
    return body


async def task_page(client: Client, owner: TestUser, tasks: int = 50) -> str:
    """A project with *tasks* tasks; the URL of its first page, all of them."""
    project = await create_project(client, owner)
    for n in range(tasks):
        await create_task(client, project, owner, title=f"Task number {n} of the page")
    return f"/projects/{project['id']}/tasks?limit={tasks}"


@pytest.mark.parametrize(
    ("accept_encoding", "allowed"),
    [
        ("gzip", True),
        ("GZip", True),
        ("x-gzip", True),
        ("gzip, deflate, br, zstd", True),
        ("br;q=1.0, gzip;q=0.8, *;q=0.1", True),
        ("gzip;q=0.5", True),  # identity unranked: gzip is preferred
        ("  gzip ;  Q=0.001 ", True),
        ("*", True),
        ("identity;q=0.5, *", True),
        ("gzip;q=0", False),
        ("gzip;q=0.000", False),
        ("GZIP;Q=0, *", False),
        ("*;q=0", False),
        ("*;q=0, identity", False),
        ("identity", False),
        ("identity;q=0", False),  # nothing acceptable: identity all the same
        ("deflate, br", False),
        ("", False),
        ("gzip;q=0.5, identity", False),  # identity ranked above gzip
        ("gzip;q=0.5, *", False),  # so is identity through `*`
        ("gzip;q=2", False),  # malformed weights allow nothing
        ("gzip;q=0.5000", False),
        ("gzip;q=abc", False),
        ("gzip;q=1;q=0", False),
        ("gzip;q=", False),
        ("gzip, gzip;q=0", False),  # named twice: the refusal holds
        (",,;;,=,q=1;gzip", False),
        ("\x00\xff\u2603, ;q=0.5", False),
    ],
)
def test_accept_encoding_is_read_by_rfc_9110(accept_encoding: str, allowed: bool) -> None:
    assert allows_gzip(accept_encoding) is allowed


async def test_a_task_page_goes_out_gzip_and_decompresses_to_the_identity_body(
    client: Client, owner: TestUser
) -> None:
    page = await task_page(client, owner)
    plain = await client.get(page, headers=owner.headers)
    identity = await body_of(plain)
    assert plain.status_code == 200 and len(identity) > MIN_BYTES
    assert not is_gzip(plain) and varies_on_accept_encoding(plain)
    assert len((await plain.get_json())["items"]) == 50

    compressed = await client.get(page, headers={**owner.headers, **GZIP})
    assert compressed.status_code == 200 and is_gzip(compressed)
    assert varies_on_accept_encoding(compressed)
    assert compressed.headers["Content-Type"] == plain.headers["Content-Type"]
    wire = await body_of(compressed)
    assert gzip.decompress(wire) == identity
    assert len(wire) < len(identity) / 4


async def test_the_accept_encoding_header_decides_on_a_large_body(
    client: Client, owner: TestUser
) -> None:
    page = await task_page(client, owner)
    identity = await body_of(await client.get(page, headers=owner.headers))
    for accept_encoding, compressed in (
        (None, False),
        ("gzip", True),
        ("GZIP", True),
        ("deflate, gzip;q=0.9", True),
        ("*", True),
        ("gzip;q=0", False),
        ("identity", False),
        ("*;q=0", False),
        ("", False),
        ("gzip;q=banana, ;;;,,, \t", False),
        ("\u00e9\u00ff; q=\u00e9", False),
    ):
        headers = dict(owner.headers)
        if accept_encoding is not None:
            headers["Accept-Encoding"] = accept_encoding
        response = await client.get(page, headers=headers)
        assert response.status_code == 200, accept_encoding
        assert is_gzip(response) is compressed, accept_encoding
        assert varies_on_accept_encoding(response), accept_encoding
        body = await body_of(response)
        assert (gzip.decompress(body) if compressed else body) == identity, accept_encoding


async def test_head_has_the_headers_of_get(client: Client, owner: TestUser) -> None:
    page = await task_page(client, owner)
    get = await client.get(page, headers={**owner.headers, **GZIP})
    head = await client.head(page, headers={**owner.headers, **GZIP})
    assert head.status_code == 200 and is_gzip(head) and varies_on_accept_encoding(head)
    assert head.headers["Content-Length"] == get.headers["Content-Length"]


async def test_small_bodies_are_never_compressed(client: Client, owner: TestUser) -> None:
    project = await create_project(client, owner)
    task = await create_task(client, project, owner)
    for path, headers in (
        (f"/tasks/{task['id']}", {**owner.headers, **GZIP}),
        ("/healthz", GZIP),
        ("/no/such/path", GZIP),  # a problem+json 404
    ):
        response = await client.get(path, headers=headers)
        body = await body_of(response)
        assert 0 < len(body) <= MIN_BYTES, path
        assert not is_gzip(response) and not varies_on_accept_encoding(response), path


async def test_204_is_never_compressed(client: Client, owner: TestUser) -> None:
    project = await create_project(client, owner)
    task = await create_task(client, project, owner, description="x" * 5000)
    response = await client.delete(f"/tasks/{task['id']}", headers={**owner.headers, **GZIP})
    assert response.status_code == 204
    assert not is_gzip(response)
    assert await response.get_data() == b""


async def test_a_large_problem_follows_the_same_rule(client: Client, owner: TestUser) -> None:
    project = await create_project(client, owner)
    unknown = {f"an_unknown_field_named_{n:02}": n for n in range(25)}
    path = f"/projects/{project['id']}/tasks"
    plain = await client.post(path, json={"title": "T", **unknown}, headers=owner.headers)
    identity = await body_of(plain)
    assert plain.status_code == 422 and len(identity) > MIN_BYTES
    assert not is_gzip(plain) and varies_on_accept_encoding(plain)

    compressed = await client.post(
        path, json={"title": "T", **unknown}, headers={**owner.headers, **GZIP}
    )
    assert compressed.status_code == 422 and is_gzip(compressed)
    assert compressed.headers["Content-Type"] == "application/problem+json"
    problem = json.loads(gzip.decompress(await body_of(compressed)))
    expected = json.loads(identity)
    assert problem.pop("request_id") != expected.pop("request_id")  # each request its own
    assert problem == expected


# Responses no route of the API makes yet, from a probe blueprint.

probe = Blueprint("compression_probe", __name__)
LARGE = b'{"filler": "' + b"abcdefghij" * 200 + b'"}'  # 2 KB of JSON


@probe.get("/probe/vary")
async def already_varies() -> Response:
    response = Response(LARGE, content_type="application/json")
    response.headers.add("Vary", "Origin")
    response.headers.add("Vary", "Authorization")
    return response


@probe.get("/probe/vary-star")
async def varies_on_everything() -> Response:
    return Response(LARGE, content_type="application/json", headers={"Vary": "*"})


@probe.get("/probe/streamed")
async def streamed() -> Response:
    def chunks() -> Iterator[bytes]:
        yield LARGE
        yield LARGE

    return Response(chunks(), content_type="application/json")


@probe.get("/probe/encoded")
async def already_encoded() -> Response:
    return Response(gzip.compress(LARGE), headers={"Content-Encoding": "gzip"})


@probe.get("/probe/huge")
async def huge() -> Response:
    return Response(LARGE * (2 * THREAD_BYTES // len(LARGE)), content_type="application/json")


@probe.get("/probe/exactly-1-kib")
async def exactly_1_kib() -> Response:
    return Response(b"x" * MIN_BYTES, content_type="text/plain")


@pytest.fixture
async def probed(config: Config) -> AsyncIterator[Quart]:
    async with running(config, probe) as app:
        yield app


async def test_vary_is_merged_with_what_the_response_has(probed: Quart) -> None:
    client = probed.test_client()
    response = await client.get("/probe/vary", headers=GZIP)
    assert is_gzip(response)
    assert response.headers.getlist("Vary") == ["Origin, Authorization, Accept-Encoding"]
    response = await client.get("/probe/vary-star", headers=GZIP)
    assert is_gzip(response) and response.headers.getlist("Vary") == ["*"]


async def test_vary_keeps_the_origin_cors_adds(environ: dict[str, str]) -> None:
    origin = "https://app.example.com"
    config = Config.from_env({**environ, "TASKFLOW_CORS_ORIGINS": origin})
    async with running(config) as app:
        response = await app.test_client().get("/openapi.json", headers={"Origin": origin, **GZIP})
    assert response.status_code == 200 and is_gzip(response)
    assert response.headers.getlist("Vary") == ["Origin, Accept-Encoding"]
    assert response.headers["Access-Control-Allow-Origin"] == origin


async def test_streamed_and_encoded_bodies_are_left_alone(probed: Quart) -> None:
    client = probed.test_client()
    response = await client.get("/probe/streamed", headers=GZIP)
    assert not is_gzip(response) and "Vary" not in response.headers
    assert await response.get_data() == LARGE * 2
    response = await client.get("/probe/encoded", headers=GZIP)
    assert response.headers.getlist("Content-Encoding") == ["gzip"]
    assert gzip.decompress(await body_of(response)) == LARGE


async def test_bodies_of_every_size_over_1_kib(probed: Quart) -> None:
    client = probed.test_client()
    response = await client.get("/probe/exactly-1-kib", headers=GZIP)
    assert not is_gzip(response) and len(await body_of(response)) == MIN_BYTES
    response = await client.get("/probe/huge", headers=GZIP)  # compressed in a thread
    assert is_gzip(response)
    body = gzip.decompress(await body_of(response))
    assert len(body) > THREAD_BYTES and body.startswith(LARGE)


async def test_the_bytes_on_the_wire_are_gzip(environ: dict[str, str]) -> None:
    async with live_server(environ) as url, httpx.AsyncClient(base_url=url) as http:
        owner = await register_user(http)
        project = (await http.post("/projects", json={"name": "P"}, headers=owner.headers)).json()
        for n in range(50):
            created = await http.post(
                f"/projects/{project['id']}/tasks", json={"title": f"Task {n}"},
                headers=owner.headers,
            )  # fmt: skip
            assert created.status_code == 201
        page = f"/projects/{project['id']}/tasks?limit=50"
        headers = {**owner.headers, **GZIP}
        async with http.stream("GET", page, headers=headers) as response:
            wire = b"".join([chunk async for chunk in response.aiter_raw()])
        assert response.status_code == 200 and is_gzip(response)
        assert wire[:2] == b"\x1f\x8b" and int(response.headers["Content-Length"]) == len(wire)
        assert varies_on_accept_encoding(response)
        identity = await http.get(page, headers={**owner.headers, "Accept-Encoding": "identity"})
        assert not is_gzip(identity) and gzip.decompress(wire) == identity.content

        head = await http.head(page, headers=headers)
        assert head.status_code == 200 and is_gzip(head) and head.content == b""
        assert head.headers["Content-Length"] == response.headers["Content-Length"]


# Last: 304 came with conditional reads, written beside this.


async def test_304_is_never_compressed_and_keeps_the_etag(client: Client, owner: TestUser) -> None:
    project = await create_project(client, owner)
    task = await create_task(client, project, owner, description="A long description. " * 100)
    path, headers = f"/tasks/{task['id']}", {**owner.headers, **GZIP}
    plain = await client.get(path, headers=owner.headers)
    compressed = await client.get(path, headers=headers)
    assert is_gzip(compressed) and not is_gzip(plain)
    assert compressed.headers["ETag"] == plain.headers["ETag"]
    assert compressed.headers["ETag"].startswith('"')  # strong, as the identity form's

    response = await client.get(path, headers={**headers, "If-None-Match": plain.headers["ETag"]})
    assert response.status_code == 304
    assert not is_gzip(response) and await response.get_data() == b""
    assert response.headers["ETag"] == plain.headers["ETag"]
    assert varies_on_accept_encoding(response)
