"""A corpus of hand-written bad requests against a live server.

Each gets one of the contract's 4xx as problem+json, none a 5xx, and a
refused write leaves every table exactly as it was.
"""

import json
from dataclasses import dataclass, field
from typing import Any

import httpx
from quart import Quart

from taskflow.config import Config

from .support import PASSWORD, live_server, register_user, snapshot

JSON = {"Content-Type": "application/json"}


@dataclass
class Case:
    name: str
    method: str
    path: str
    expected: set[int]
    content: bytes | None = None
    headers: list[tuple[str, str]] = field(default_factory=list)
    authenticated: bool = True


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def raw_bodies() -> list[tuple[str, bytes, set[int]]]:
    """Bodies that are not acceptable JSON, for any route that takes one."""
    deep = b"[" * 10_000 + b"]" * 10_000
    return [
        ("not JSON", b"{not json", {400}),
        ("empty body", b"", {400}),
        ("invalid UTF-8", b'{"name": "\xff\xfe"}', {400}),
        ("lone surrogate", b'{"name": "\\ud800"}', {400}),
        ("number beyond a double", b'{"name": 1e400}', {400}),
        ("NaN", b'{"name": NaN}', {400}),
        ("Infinity", b'{"name": Infinity}', {400}),
        ("nested 10,000 deep", deep, {400}),
        ("trailing garbage", b'{"name": "x"} x', {400}),
        ("single quotes", b"{'name': 'x'}", {400}),
        ("a duplicate name", b'{"name": "x", "name": "y"}', {400}),
        ("a duplicate name, escaped", b'{"name": "x", "n\\u0061me": "y"}', {400}),
        ("a duplicate name, nested", b'{"name": [{"a": {"b": 1, "b": 2}}]}', {400}),
        ("a JSON array", b"[1, 2, 3]", {422}),
        ("a JSON string", b'"name"', {422}),
        ("JSON null", b"null", {422}),
        ("a number", b"42", {422}),
        ("over 1 MiB", b'{"name": "' + b"x" * (1024 * 1024) + b'"}', {413}),
    ]


def cases(ids: dict[str, str]) -> list[Case]:
    project, task = f"/projects/{ids['project']}", f"/tasks/{ids['task']}"
    writes = {
        "register": ("POST", "/auth/register", False),
        "login": ("POST", "/auth/login", False),
        "refresh": ("POST", "/auth/refresh", False),
        "create project": ("POST", "/projects", True),
        "replace project": ("PUT", project, True),
        "patch project": ("PATCH", project, True),
        "add member": ("POST", f"{project}/members", True),
        "create task": ("POST", f"{project}/tasks", True),
        "replace task": ("PUT", task, True),
        "patch task": ("PATCH", task, True),
    }
    result: list[Case] = []
    for route, (method, path, authenticated) in writes.items():
        for name, content, expected in raw_bodies():
            result.append(
                Case(f"{route}: {name}", method, path, expected, content, [*JSON.items()],
                     authenticated)
            )  # fmt: skip
        for name, content_type in (
            ("text/plain", "text/plain"),
            ("form", "application/x-www-form-urlencoded"),
            ("multipart", "multipart/form-data; boundary=x"),
            ("XML", "application/xml"),
        ):
            result.append(
                Case(f"{route}: {name}", method, path, {415}, b'{"name": "x"}',
                     [("Content-Type", content_type)], authenticated)
            )  # fmt: skip
        result.append(
            Case(f"{route}: no content type", method, path, {415}, b'{"name": "x"}', [],
                 authenticated)
        )  # fmt: skip
        result.append(
            Case(f"{route}: two content types", method, path, {415}, b'{"name": "x"}',
                 [("Content-Type", "text/plain"), ("Content-Type", "application/json")],
                 authenticated)
        )  # fmt: skip

    def write(name: str, method: str, path: str, value: Any, expected: set[int]) -> None:
        result.append(Case(name, method, path, expected, body(value), [*JSON.items()]))

    def anonymous(name: str, path: str, value: Any, expected: set[int]) -> None:
        result.append(
            Case(name, "POST", path, expected, body(value), [*JSON.items()], authenticated=False)
        )

    # Registration and login.
    for password, why in (
        ("x" * 73, "73 bytes"),
        ("é" * 37, "74 bytes in 37 characters"),
        ("x" * 1_000_000, "a megabyte"),
        ("short", "too short"),
        ("", "empty"),
    ):
        anonymous(f"register: password {why}", "/auth/register",
                  {"email": "new@example.com", "password": password}, {422})  # fmt: skip
        anonymous(f"login: password {why}", "/auth/login",
                  {"email": "owner@example.com", "password": password}, {401})  # fmt: skip
    bad_emails = [
        "plain", "@example.com", "a@", "a@b", "a b@example.com", "a@example..com",
        "x" * 250 + "@example.com", "a\u0000@example.com", "", 17, None, ["a@b.c"],
    ]  # fmt: skip
    for email in bad_emails:
        anonymous(f"register: email {email!r:.30}", "/auth/register",
                  {"email": email, "password": PASSWORD}, {422})  # fmt: skip
    for extra in ("id", "created_at", "role", "is_admin"):
        value = {"email": "new@example.com", "password": PASSWORD, extra: "x"}
        anonymous(f"register: read-only {extra}", "/auth/register", value, {422})
    for token in ("", "x", "a.b.c", ids["access"], "e" * 5000):
        anonymous(f"refresh: token {token[:12]!r}", "/auth/refresh", {"refresh_token": token},
                  {401, 422})  # fmt: skip

    # Projects and members.
    for value, why in (
        ({"name": ""}, "empty name"),
        ({"name": "   "}, "blank name"),
        ({"name": "x" * 201}, "name too long"),
        ({"name": "a\u0000b"}, "NUL in name"),
        ({"name": 5}, "number as name"),
        ({"name": None}, "null name"),
        ({"name": "ok", "description": "d" * 10_001}, "description too long"),
        ({"name": "ok", "owner_id": ids["stranger"]}, "owner_id"),
        ({"name": "ok", "id": ids["project"]}, "id"),
        ({"name": "ok", "role": "owner"}, "role"),
        ({"name": "ok", "created_at": "2026-01-01T00:00:00Z"}, "created_at"),
    ):
        write(f"create project: {why}", "POST", "/projects", value, {422})
        write(f"replace project: {why}", "PUT", project, value, {422})
    for email in ("not-an-email", "", 5, None, "a\u0000@example.com"):
        write(f"add member: email {email!r}", "POST", f"{project}/members", {"email": email},
              {404, 422})  # fmt: skip
    write("add member: unknown field", "POST", f"{project}/members",
          {"email": "member@example.com", "role": "owner"}, {422})  # fmt: skip

    # Tasks.
    for value, why in (
        ({"title": ""}, "empty title"),
        ({"title": "x" * 501}, "title too long"),
        ({"title": "t", "status": "done"}, "unknown status"),
        ({"title": "t", "status": None}, "null status"),
        ({"title": "t", "due_date": "0000-01-01T00:00:00Z"}, "year 0"),
        ({"title": "t", "due_date": "10000-01-01T00:00:00Z"}, "year 10000"),
        ({"title": "t", "due_date": "2026-12-24T18:00:00"}, "no offset"),
        ({"title": "t", "due_date": "2026-12-24"}, "a date only"),
        ({"title": "t", "due_date": "2026-13-01T00:00:00Z"}, "month 13"),
        ({"title": "t", "due_date": "2026-02-30T00:00:00Z"}, "February 30"),
        ({"title": "t", "due_date": "2026-12-24T25:00:00Z"}, "hour 25"),
        ({"title": "t", "due_date": "2026-12-24T18:00:00+25:00"}, "offset +25:00"),
        ({"title": "t", "due_date": 1767225600}, "a Unix time"),
        ({"title": "t", "due_date": "0001-01-01T00:30:00+01:00"}, "before year 1 in UTC"),
        ({"title": "t", "assignee_id": "not-a-uuid"}, "malformed assignee"),
        ({"title": "t", "assignee_id": ids["stranger"]}, "assignee not a member"),
        ({"title": "t", "project_id": ids["project"]}, "project_id"),
        ({"title": "t", "id": ids["task"]}, "id"),
        ({"title": "t", "updated_at": "2026-01-01T00:00:00Z"}, "updated_at"),
        ({"title": "t", "version": 7}, "version"),
    ):
        write(f"create task: {why}", "POST", f"{project}/tasks", value, {422})
        write(f"replace task: {why}", "PUT", task, value, {422})
        write(f"patch task: {why}", "PATCH", task, value, {422})

    # Query strings.
    lists = {
        "tasks": f"{project}/tasks",
        "projects": "/projects",
        "events": f"{project}/events",
    }
    for query in ("limit=-1", "limit=0", "limit=1000000000", "limit=abc", "limit=1.5",
                  "limit=", "limit=1&limit=2", "unknown=1"):  # fmt: skip
        for name, path in lists.items():
            result.append(Case(f"{name}: ?{query}", "GET", f"{path}?{query}", {422}))
    for cursor in ("x", "x.y", "....", "A" * 2049, "eyJhIjoxfQ.AAAA", "%00", "null"):
        for name in ("tasks", "projects"):
            result.append(Case(f"{name}: cursor {cursor[:10]!r}", "GET",
                               f"{lists[name]}?cursor={cursor}", {422}))  # fmt: skip
    for query in ("status=done", "status=,", "sort=priority", "sort=-", "assignee_id=12",
                  "due_before=2026-01-01", "due_after=0", "due_before=2026-01-01T00:00:00",
                  "q=", "q=%00", "q=" + "w" * 201, "since=-1"):  # fmt: skip
        result.append(Case(f"tasks: ?{query}", "GET", f"{lists['tasks']}?{query}", {422}))
    for query in ("since=-1", "since=x", "since=99999999999999999999999"):
        result.append(Case(f"events: ?{query}", "GET", f"{lists['events']}?{query}", {422}))

    # Malformed ids in paths.
    for bad in ("not-a-uuid", "123", ids["task"][:-1], ids["task"] + "0", "%00",
                ids["task"].replace("-", ""), "%2e%2e", "null"):  # fmt: skip
        for path in (f"/projects/{bad}", f"/tasks/{bad}", f"/projects/{bad}/tasks",
                     f"/projects/{ids['project']}/members/{bad}"):  # fmt: skip
            method = "DELETE" if path.endswith(bad) and "/members/" in path else "GET"
            result.append(Case(f"{method} {path[:40]}", method, path, {404}))

    # Headers.
    result.append(Case("two Authorization headers", "GET", "/auth/me", {401},
                       headers=[("Authorization", "Bearer x"), ("Authorization", "Bearer y")],
                       authenticated=False))  # fmt: skip
    no_scheme = [("Authorization", ids["access"])]
    result.append(
        Case("no scheme", "GET", "/auth/me", {401}, headers=no_scheme, authenticated=False)
    )
    return result


async def test_bad_input_corpus(app: Quart, config: Config, environ: dict[str, str]) -> None:
    async with live_server(environ) as url, httpx.AsyncClient(base_url=url, timeout=30) as http:
        ids = await seed(http)
        corpus = cases(ids)
        assert len(corpus) >= 200
        failures = []
        for case in corpus:
            headers = list(case.headers)
            if case.authenticated:
                headers.append(("Authorization", f"Bearer {ids['access']}"))
            before = await snapshot(app) if case.method != "GET" else None
            response = await http.request(
                case.method, case.path, content=case.content, headers=headers
            )
            problem = response.headers.get("Content-Type") == "application/problem+json"
            if response.status_code not in case.expected or not problem:
                failures.append(f"{case.name}: {response.status_code} {response.text[:120]}")
                continue
            assert response.json()["status"] == response.status_code
            if before is not None and await snapshot(app) != before:
                failures.append(f"{case.name}: changed the database")
        assert not failures, "\n".join(failures)


async def seed(http: httpx.AsyncClient) -> dict[str, str]:
    roles = ("owner", "member", "stranger")
    users = {who: await register_user(http, f"{who}@example.com") for who in roles}
    ids = {who: user.id for who, user in users.items()}
    ids["access"] = users["owner"].access_token
    auth = users["owner"].headers
    project = (await http.post("/projects", json={"name": "P"}, headers=auth)).json()
    await http.post(
        f"/projects/{project['id']}/members", json={"email": "member@example.com"}, headers=auth
    )
    task = (
        await http.post(f"/projects/{project['id']}/tasks", json={"title": "T"}, headers=auth)
    ).json()
    return {**ids, "project": project["id"], "task": task["id"]}
