"""The error contract, through probe routes that take JSON, read the database
and fail, registered on a real app beside its own routes."""

import asyncio
import json
import logging
import socket
import uuid
from collections.abc import AsyncIterator
from datetime import datetime

import httpx
import pytest
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from quart import Blueprint
from quart.typing import TestClientProtocol as Client
from quart_schema import validate_request
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from taskflow import create_app
from taskflow.config import Config
from taskflow.db import session
from taskflow.errors import is_unavailable
from taskflow.jsonio import DuplicateName, loads_strict
from taskflow.logs import JSONFormatter

from .support import live_server, problem_of, running

probe = Blueprint("probe", __name__)


class ProbeBody(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str = Field(min_length=1)
    due: AwareDatetime | None = None


@probe.post("/probe")
@validate_request(ProbeBody)
async def post_probe(data: ProbeBody) -> dict[str, str]:
    return {"title": data.title}


@probe.get("/probe/<uuid:item_id>")
async def get_probe(item_id: uuid.UUID) -> dict[str, str]:
    return {"id": str(item_id)}


@probe.get("/probe/boom")
async def boom() -> None:
    raise RuntimeError("secret internals: password=hunter2")


@probe.get("/probe/database")
async def database() -> dict[str, int]:
    result = await session().execute(text("SELECT 1"))
    return {"value": result.scalar_one()}


@pytest.fixture
async def probe_client(config: Config) -> AsyncIterator[Client]:
    async with running(config, probe) as app:
        yield app.test_client()


async def test_unknown_route_is_404(probe_client: Client) -> None:
    response = await probe_client.get("/no/such/route")
    problem_of(response, await response.get_json(), 404, "not_found")


async def test_malformed_uuid_in_path_is_404(probe_client: Client) -> None:
    for bad in ("not-a-uuid", "1234", str(uuid.uuid4())[:-1], str(uuid.uuid4()) + "0"):
        response = await probe_client.get(f"/probe/{bad}")
        problem_of(response, await response.get_json(), 404, "not_found")
    good = str(uuid.uuid4())
    assert (await (await probe_client.get(f"/probe/{good}")).get_json()) == {"id": good}


async def test_wrong_method_is_405_with_allow(probe_client: Client) -> None:
    response = await probe_client.delete("/probe")
    problem_of(response, await response.get_json(), 405, "method_not_allowed")
    assert response.headers["Allow"] == "POST"
    response = await probe_client.options("/healthz")
    problem_of(response, await response.get_json(), 405, "method_not_allowed")


async def test_body_that_is_not_json_is_400(probe_client: Client) -> None:
    for body in (b"{not json", b'{"title": NaN}', b'{"title": 1e400}', b'"\xff\xfe"', b""):
        response = await probe_client.post(
            "/probe", data=body, headers={"Content-Type": "application/json"}
        )
        problem_of(response, await response.get_json(), 400, "invalid_json")


DUPLICATES = [
    b'{"title": "a", "title": "b"}',
    b'{"title": "a", "t\\u0069tle": "b"}',  # one name, spelt two ways
    b'{"title": "a", "due": {"x": 1, "x": 2}}',
    b'{"title": [[{"x": {"y": null, "y": null}}]]}',
    b'{"title": "a", "due": ' + b"[" * 1000 + b'{"x": 1, "x": 1}' + b"]" * 1000 + b"}",
    b"{" + b", ".join([b'"title": "a"'] * 100) + b"}",
]


@pytest.mark.parametrize("body", DUPLICATES, ids=lambda body: body[:40].decode())
async def test_duplicate_member_names_are_400(probe_client: Client, body: bytes) -> None:
    # Strict JSON is I-JSON (RFC 7493): an object never names a member twice.
    response = await probe_client.post(
        "/probe", data=body, headers={"Content-Type": "application/json"}
    )
    problem_of(response, await response.get_json(), 400, "invalid_json")


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"title": "a", "due": "2026-01-01T10:00:00+02:00"}', 200),
        (b'{"title": "a:\\"title\\": \\\\", "due": null}', 200),
        (b'{"title": "a", "due": {"x": 1, "y": {"x": 1}}}', 422),
        (b'{"title": "a", "due": ' + b"[" * 1000 + b'{"x": 1, "y": 1}' + b"]" * 1000 + b"}", 422),
    ],
)
async def test_the_same_without_duplicates_is_parsed(
    probe_client: Client, body: bytes, status: int
) -> None:
    response = await probe_client.post(
        "/probe", data=body, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == status, await response.get_json()


@pytest.mark.parametrize(
    ("text", "duplicate"),
    [
        ('{"a": 1, "b": 2}', False),
        ('{"a": 1, "a": 2}', True),
        ('{"a:": 1, "a": ":"}', False),
        ('{"a\\"": ":", "a\\"": 1}', True),
        ('{"a\\\\": "\\\\", "a\\\\": 1}', True),
        ('{"a\\\\": "\\"", "b": {"a": 1, "b": 2}}', False),
        ('{"a": "\\u003a", "a": 1}', True),
        ('[{"a": 1}, {"a": 1}, {}]', False),
        ('[{"a": 1, "a": 1}]', True),
        ('{"é": 1, "\\u00e9": 2}', True),
    ],
)
def test_duplicates_are_found_whatever_the_strings_hold(text: str, duplicate: bool) -> None:
    for data in (text, text.encode()):
        if duplicate:
            with pytest.raises(DuplicateName):
                loads_strict(data)
        else:
            assert loads_strict(data) == json.loads(text)


async def test_body_that_is_not_application_json_is_415(probe_client: Client) -> None:
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": content_type} if content_type else {}
        response = await probe_client.post("/probe", data=b'{"title": "x"}', headers=headers)
        problem_of(response, await response.get_json(), 415, "unsupported_media_type")


async def test_body_over_one_mebibyte_is_413_and_ends_the_connection(
    probe_client: Client,
) -> None:
    filler = "x" * (1024 * 1024)
    response = await probe_client.post(
        "/probe", data=json.dumps({"title": filler}), headers={"Content-Type": "application/json"}
    )
    problem_of(response, await response.get_json(), 413, "payload_too_large")
    # The connection cannot carry another request (h11 keeps none whose
    # request was answered before it was read): say so.
    assert response.headers["Connection"] == "close"


async def test_a_body_over_the_limit_gets_its_413_over_a_real_connection(
    environ: dict[str, str],
) -> None:
    """Read to its end before the answer, so that no reset destroys the 413 on
    its way (it did, now and then, under load); a declared length beyond what
    is worth reading is refused at once, before its body is sent."""
    headers = {"Content-Type": "application/json"}
    async with live_server(environ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        for size in (1024 * 1024 + 1, 3 * 1024 * 1024, 7 * 1024 * 1024):
            body = b'{"email": "' + b"x" * size + b'", "password": "p"}'
            for _ in range(5):
                response = await http.post("/auth/login", content=body, headers=headers)
                assert response.status_code == 413, size
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            writer.write(
                b"POST /auth/login HTTP/1.1\r\nHost: taskflow\r\n"
                b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n"
            )
            head = await asyncio.wait_for(reader.read(1024), 10)
        finally:
            writer.close()
        assert head.startswith(b"HTTP/1.1 413"), head


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "title"),
        ({"title": ""}, "title"),
        ({"title": "x", "id": "mine"}, "id"),
        ({"title": "x", "due": "2026-01-01T10:00:00"}, "due"),
        ({"title": "x", "due": "someday"}, "due"),
        ([1, 2], "body"),
    ],
)
async def test_invalid_body_is_422_naming_the_field(
    probe_client: Client, body: object, field: str
) -> None:
    response = await probe_client.post("/probe", json=body)
    payload = await response.get_json()
    problem_of(response, payload, 422, "validation_failed")
    assert field in [error["field"] for error in payload["errors"]], payload
    assert all(error["message"] for error in payload["errors"])


async def test_valid_body_passes(probe_client: Client) -> None:
    response = await probe_client.post(
        "/probe", json={"title": "ok", "due": "2026-01-01T10:00:00+02:00"}
    )
    assert response.status_code == 200
    assert await response.get_json() == {"title": "ok"}


async def test_unexpected_error_is_a_generic_500(
    probe_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR):
        response = await probe_client.get("/probe/boom")
    body = await response.get_json()
    problem_of(response, body, 500, "internal_error")
    assert "hunter2" not in json.dumps(body) and "Traceback" not in json.dumps(body)
    # The details are in the server's log, tied to the request.
    (record,) = [r for r in caplog.records if r.exc_info]
    assert "secret internals" in str(record.exc_info[1])


async def test_database_down_is_503_with_retry_after(environ: dict[str, str]) -> None:
    dead = {
        **environ,
        "DATABASE_URL": "postgres://postgres@127.0.0.1:1/none",
        "TASKFLOW_SECRET_KEY": "k" * 32,
    }
    app = create_app(Config.from_env(dead))
    app.register_blueprint(probe)
    async with app.test_app():
        response = await app.test_client().get("/probe/database")
        problem_of(response, await response.get_json(), 503, "service_unavailable")
        assert int(response.headers["Retry-After"]) > 0


async def test_request_id_is_echoed_when_sane_and_replaced_otherwise(
    probe_client: Client,
) -> None:
    response = await probe_client.get("/healthz", headers={"X-Request-ID": "abc-123.def"})
    assert response.headers["X-Request-ID"] == "abc-123.def"
    for insane in ("a b", "x" * 200, "<script>", ""):
        response = await probe_client.get("/healthz", headers={"X-Request-ID": insane})
        assert response.headers["X-Request-ID"] != insane
        assert len(response.headers["X-Request-ID"]) == 32
    # Errors carry it too, in the header and the body.
    response = await probe_client.get("/nowhere", headers={"X-Request-ID": "trace-7"})
    assert response.headers["X-Request-ID"] == "trace-7"
    assert (await response.get_json())["request_id"] == "trace-7"


async def test_log_lines_are_json_with_the_request_id(
    config: Config, capsys: pytest.CaptureFixture[str]
) -> None:
    # The app is built here so that its log handler writes to this test's capture.
    async with running(config, probe) as app:
        await app.test_client().get("/probe/boom", headers={"X-Request-ID": "log-check-1"})
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line]
    mine = [line for line in lines if line["request_id"] == "log-check-1"]
    assert {line["logger"] for line in mine} >= {"taskflow.errors", "taskflow.access"}
    access = next(line for line in mine if line["logger"] == "taskflow.access")
    assert (access["method"], access["path"], access["status"]) == ("GET", "/probe/boom", 500)
    assert datetime.fromisoformat(access["time"]).tzinfo is not None


@pytest.mark.parametrize(
    ("sqlstate", "unavailable"),
    [("57P01", True), ("57P03", True), ("08006", True), ("53300", True), ("23505", False)],
)
def test_server_side_shutdowns_are_unavailable_not_bugs(sqlstate: str, unavailable: bool) -> None:
    class Orig(Exception):
        pass

    orig = Orig("terminating connection due to administrator command")
    orig.sqlstate = sqlstate  # type: ignore[attr-defined]
    error = DBAPIError("SELECT 1", None, orig)
    assert is_unavailable(error) is unavailable


@probe.post("/probe/leak")
async def leak() -> dict[str, str]:
    """A statement that fails with a secret-looking value among its parameters."""
    await session().execute(
        text("INSERT INTO users (id, email, password_hash) VALUES (:id, :email, NULL)"),
        {"id": uuid.uuid4(), "email": "leaked-address@example.com"},
    )
    return {}


async def test_a_failing_statements_parameters_never_reach_the_log(
    probe_client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    response = await probe_client.post("/probe/leak")
    problem_of(response, await response.get_json(), 500, "internal_error")
    logged = "\n".join(JSONFormatter().format(record) for record in caplog.records)
    assert "INSERT INTO users" in logged  # the failure is logged, with its statement
    assert "leaked-address@example.com" not in logged


async def test_an_object_of_many_members_is_a_small_422(probe_client: Client) -> None:
    members = {f"k{n}": n for n in range(60_000)}  # just under 1 MiB
    response = await probe_client.post("/auth/refresh", json=members)
    body = await response.get_json()
    problem_of(response, body, 422, "validation_failed")
    assert body["errors"] == [{"field": "body", "message": "has more than 64 members"}]
    assert len(await response.get_data()) < 1024


async def test_a_422_lists_at_most_20_errors(probe_client: Client) -> None:
    response = await probe_client.post("/probe", json={f"extra{n}": n for n in range(60)})
    body = await response.get_json()
    problem_of(response, body, 422, "validation_failed")
    assert len(body["errors"]) == 20


async def test_a_doubled_slash_is_not_the_route(probe_client: Client) -> None:
    for path in ("//healthz", "//projects", "//auth/me"):
        response = await probe_client.get(path)
        problem_of(response, await response.get_json(), 404, "not_found")
    assert (await probe_client.get("/healthz")).status_code == 200


async def test_content_length_with_transfer_encoding_is_refused_and_closes(
    environ: dict[str, str],
) -> None:
    async with live_server(environ) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                b"POST /auth/login HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
            )
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk  # ends when the server closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert json.loads(body)["status"] == 400


async def test_responses_do_not_name_the_server(environ: dict[str, str]) -> None:
    async with live_server(environ) as url, httpx.AsyncClient(base_url=url) as http:
        for response in (await http.get("/healthz"), await http.get("/nowhere")):
            assert "server" not in response.headers, response.headers


def raw_exchange(port: int, request: bytes) -> tuple[bytes, dict[str, str], bytes]:
    """Send *request* as is; the status line, headers and body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk  # ends when the server closes the connection
    head, _, body = answer.partition(b"\r\n\r\n")
    status, *lines = head.split(b"\r\n")
    headers = {
        name.decode().lower(): value.decode().strip()
        for name, _, value in (line.partition(b":") for line in lines)
    }
    return status, headers, body


async def test_requests_hypercorn_refuses_get_problems_too(environ: dict[str, str]) -> None:
    """hypercorn answers what it cannot parse itself (taskflow/server_errors.py)."""
    async with live_server(environ) as url:
        port = int(url.rsplit(":", 1)[1])
        malformed = b"GET /healthz HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"
        # Headers past hypercorn's 16 KiB with no end in sight.
        too_large = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 20_000
        # A transfer coding h11 does not know: its 501 is the contract's 400.
        unknown_coding = b"GET /healthz HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: u\r\n\r\n"
        answers = [
            raw_exchange(port, request) for request in (malformed, too_large, unknown_coding)
        ]
    for (status, headers, body), (expected, code) in zip(
        answers,
        [(400, "bad_request"), (431, "request_header_fields_too_large"), (400, "bad_request")],
        strict=True,
    ):
        assert status.startswith(f"HTTP/1.1 {expected}".encode()), status
        assert headers["content-type"] == "application/problem+json"
        problem = json.loads(body)
        assert (problem["status"], problem["type"]) == (expected, "about:blank")
        assert problem["request_id"] == headers["x-request-id"]
        assert problem["code"] == code
