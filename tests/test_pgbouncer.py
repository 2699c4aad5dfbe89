"""TaskFlow through PgBouncer in transaction mode, as Heroku's connection
pooling serves it: a real ``pgbouncer`` of this module's own (one without
prepared-statement support, as Debian's 1.18 is, and refusing every startup
parameter it does not know) in front of a fresh database, and real hypercorn
servers configured through it.

With ``TASKFLOW_DATABASE_PGBOUNCER=true`` (or ``DATABASE_CONNECTION_POOL_URL``)
every path works, however the transactions are handed across the few server
connections; without it, the same server through the same pgbouncer fails.
"""

from __future__ import annotations

import asyncio
import json
import os
import pwd
import re
import shutil
import socket
import subprocess
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy.engine import make_url

from .support import (
    PASSWORD,
    TestUser,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    hypercorn,
    migrate,
    postgres_only,
    problem_of,
    register_user,
)

pytestmark = postgres_only

Json = dict[str, Any]

# Few server connections, so that consecutive transactions of one client
# connection really land on different ones.
SERVER_POOL_SIZE = 3
# The database names pgbouncer serves: one per way of configuring TaskFlow,
# so that its log tells which one a server came through.
SERVED_DATABASE = "taskflow"
POOLED_URL_DATABASE = "taskflow_pool"


@dataclass
class PgBouncer:
    host: str
    port: int
    log: Path

    def url(self, database: str = SERVED_DATABASE) -> str:
        """The URL of *database* through pgbouncer, as a platform hands it out."""
        return f"postgres://postgres@{self.host}:{self.port}/{database}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def pgbouncer_executable() -> str:
    found = shutil.which("pgbouncer") or shutil.which(
        "pgbouncer", path="/usr/sbin:/usr/local/sbin:/usr/local/bin"
    )
    if found is None:
        pytest.fail(
            "pgbouncer is not installed, and the PostgreSQL run tests TaskFlow through it: "
            "install it (apt-get install -y pgbouncer) or put it on PATH.",
            pytrace=False,
        )
    return found


def unprivileged_user() -> str | None:
    """PgBouncer refuses to run as root: the user it is to switch to (``-u``),
    when this runs as root. It reads its ini and auth file before switching;
    it then writes nothing but its stderr, which this process opened."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
        except KeyError:
            continue
        return name
    pytest.fail("running as root and no postgres or nobody user to run pgbouncer as")


@pytest.fixture(scope="module")
def pooled_database() -> Iterator[str]:
    """A fresh, migrated database of this module's own."""
    url = create_postgres_database()
    try:
        migrate(url)
        yield url
    finally:
        drop_postgres_database(url)


@pytest.fixture(scope="module")
def pgbouncer(
    pooled_database: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PgBouncer]:
    """A pgbouncer in transaction mode in front of *pooled_database*, run in
    the foreground and stopped at the end of the module."""
    executable = pgbouncer_executable()
    directory = tmp_path_factory.mktemp("pgbouncer")
    server = make_url(pooled_database)
    password = f" password={server.password}" if server.password else ""
    target = (
        f"host={server.host or '127.0.0.1'} port={server.port or 5432} "
        f"user={server.username or 'postgres'} dbname={server.database}{password}"
    )
    port = free_port()
    (directory / "users.txt").write_text('"postgres" ""\n')
    (directory / "pgbouncer.ini").write_text(
        f"""\
[databases]
{SERVED_DATABASE} = {target}
{POOLED_URL_DATABASE} = {target}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {directory / "users.txt"}
pool_mode = transaction
default_pool_size = {SERVER_POOL_SIZE}
max_client_conn = 200
; Refuse every startup parameter pgbouncer does not track itself (the
; default), as Heroku's does.
ignore_startup_parameters =
server_reset_query =
log_connections = 1
log_disconnections = 0
"""
    )
    log = directory / "pgbouncer.log"
    user = unprivileged_user()
    command = [executable, *(["-u", user] if user else []), str(directory / "pgbouncer.ini")]
    with log.open("ab") as log_file:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file
        )
    bouncer = PgBouncer("127.0.0.1", port, log)
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"pgbouncer exited at start ({process.returncode}):\n{bouncer.log_text()}"
                )
            try:
                socket.create_connection((bouncer.host, port), timeout=0.5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"pgbouncer does not listen:\n{bouncer.log_text()}")
                time.sleep(0.05)
        yield bouncer
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def through(environ: dict[str, str], bouncer: PgBouncer, **settings: str) -> dict[str, str]:
    """*environ* serving through *bouncer* with ``TASKFLOW_DATABASE_PGBOUNCER=true``."""
    return {
        **environ,
        "DATABASE_URL": bouncer.url(),
        "DATABASE_CONNECTION_POOL_URL": "",
        "TASKFLOW_DATABASE_PGBOUNCER": "true",
        **settings,
    }


@asynccontextmanager
async def serving(environ: dict[str, str], workers: int = 1) -> AsyncIterator[httpx.AsyncClient]:
    """A hypercorn of *environ* (not the run's database: nothing to empty),
    and a client of it."""
    async with (
        hypercorn(environ, workers=workers, empty_database=False) as (url, _process),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        yield http


async def call(
    http: httpx.AsyncClient,
    user: TestUser,
    method: str,
    url: str,
    body: Any = None,
    expect: int = 200,
    if_match: str | None = None,
) -> httpx.Response:
    response = await http.request(
        method,
        url,
        json=body,
        headers={**user.headers, **({"If-Match": if_match} if if_match else {})},
    )
    assert response.status_code == expect, f"{method} {url}: {response.text}"
    return response


async def test_a_whole_journey(pgbouncer: PgBouncer, environ: dict[str, str]) -> None:
    async with serving(through(environ, pgbouncer)) as http:
        ada = await register_user(http)
        bob = await register_user(http)
        refreshed = await http.post("/auth/refresh", json={"refresh_token": ada.refresh_token})
        assert refreshed.status_code == 200, refreshed.text
        ada.access_token = refreshed.json()["access_token"]
        me = await call(http, ada, "GET", "/auth/me")
        assert me.json()["id"] == ada.id

        project = (await call(http, ada, "POST", "/projects", {"name": "Pooled"}, 201)).json()
        pid = project["id"]
        await call(http, ada, "POST", f"/projects/{pid}/members", {"email": bob.email}, 201)
        members = (await call(http, bob, "GET", f"/projects/{pid}/members")).json()
        assert {member["user_id"] for member in members["items"]} == {ada.id, bob.id}

        drafted = await call(http, bob, "POST", f"/projects/{pid}/tasks", {"title": "Draft"}, 201)
        draft = drafted.json()
        ship = (
            await call(
                http, ada, "POST", f"/projects/{pid}/tasks",
                {"title": "Ship", "assignee_id": bob.id}, 201,
            )
        ).json()  # fmt: skip
        fetched = await call(http, bob, "GET", f"/tasks/{ship['id']}")
        patched = await call(
            http, bob, "PATCH", f"/tasks/{ship['id']}", {"status": "in_progress"},
            if_match=fetched.headers["ETag"],
        )  # fmt: skip
        assert patched.json()["status"] == "in_progress"
        # A stale ETag is refused, and its transaction rolled back.
        stale = await call(
            http, ada, "PATCH", f"/tasks/{ship['id']}", {"title": "Stale"}, 412,
            if_match=fetched.headers["ETag"],
        )  # fmt: skip
        problem_of(stale, stale.json(), 412, "precondition_failed")
        mine = (await call(http, bob, "GET", f"/projects/{pid}/tasks?assignee_id=me")).json()
        assert [(task["id"], task["title"]) for task in mine["items"]] == [(ship["id"], "Ship")]
        listed = (await call(http, ada, "GET", f"/projects/{pid}/tasks?sort=title")).json()
        assert [task["title"] for task in listed["items"]] == ["Draft", "Ship"]
        await call(
            http, bob, "DELETE", f"/tasks/{draft['id']}", expect=204,
            if_match=drafted.headers["ETag"],
        )  # fmt: skip
        await call(http, bob, "GET", f"/tasks/{draft['id']}", expect=404)

        feed = (await call(http, ada, "GET", f"/projects/{pid}/events")).json()
        assert [event["event"] for event in feed["items"]] == [
            "project.created", "member.added", "task.created", "task.created",
            "task.updated", "task.deleted",
        ]  # fmt: skip

        await call(http, ada, "POST", "/auth/logout", expect=204)
        gone = await http.get("/auth/me", headers=ada.headers)
        assert gone.status_code == 401, gone.text


async def test_of_concurrent_refreshes_exactly_one_succeeds(
    pgbouncer: PgBouncer, environ: dict[str, str]
) -> None:
    async with serving(through(environ, pgbouncer)) as http:
        user = await register_user(http)
        body = {"refresh_token": user.refresh_token}
        responses = await asyncio.gather(
            *(http.post("/auth/refresh", json=body) for _ in range(20))
        )
        assert sorted(r.status_code for r in responses) == [200] + [401] * 19, [
            r.text for r in responses if r.status_code not in (200, 401)
        ]
        for loser in (r for r in responses if r.status_code == 401):
            problem_of(loser, loser.json(), 401, "token_expired")
        (winner,) = (r.json() for r in responses if r.status_code == 200)
        me = await http.get(
            "/auth/me", headers={"Authorization": f"Bearer {winner['access_token']}"}
        )
        assert me.status_code == 200, me.text
        following = await http.post(
            "/auth/refresh", json={"refresh_token": winner["refresh_token"]}
        )
        assert following.status_code == 200, following.text


async def test_task_pages_cover_every_task_once(
    pgbouncer: PgBouncer, environ: dict[str, str]
) -> None:
    async with serving(through(environ, pgbouncer)) as http:
        owner = await register_user(http)
        project = (await call(http, owner, "POST", "/projects", {"name": "Paged"}, 201)).json()
        url = f"/projects/{project['id']}/tasks"
        created = await asyncio.gather(
            *(call(http, owner, "POST", url, {"title": f"Task {n:02}"}, 201) for n in range(25))
        )
        for sort in ("-created_at", "title"):
            seen: list[str] = []
            cursor: str | None = None
            pages = 0
            while True:
                params = {"limit": "10", "sort": sort, **({"cursor": cursor} if cursor else {})}
                response = await http.get(url, params=params, headers=owner.headers)
                assert response.status_code == 200, response.text
                page = response.json()
                seen += [task["id"] for task in page["items"]]
                pages += 1
                cursor = page["next_cursor"]
                if cursor is None:
                    break
            assert pages == 3
            assert len(seen) == len(set(seen)) == 25
            assert set(seen) == {response.json()["id"] for response in created}


async def test_websocket_catch_up_replays_every_event_in_order(
    pgbouncer: PgBouncer, environ: dict[str, str]
) -> None:
    async with serving(through(environ, pgbouncer)) as http:
        owner = await register_user(http)
        project = (await call(http, owner, "POST", "/projects", {"name": "Replayed"}, 201)).json()
        # More events than the server reads at once (READ_PAGE_SIZE, 50).
        for n in range(60):
            await call(
                http, owner, "POST", f"/projects/{project['id']}/tasks", {"title": f"{n}"}, 201
            )
        feed = (
            await call(http, owner, "GET", f"/projects/{project['id']}/events?limit=1000")
        ).json()["items"]
        assert [event["event"] for event in feed] == ["project.created"] + ["task.created"] * 60

        ws_url = str(http.base_url).replace("http://", "ws://").rstrip("/") + "/ws"
        async with websockets.connect(ws_url, additional_headers=owner.headers) as ws:
            assert json.loads(await asyncio.wait_for(ws.recv(), 5)) == {
                "type": "ready",
                "user_id": owner.id,
            }
            frame = {"type": "subscribe", "project_id": project["id"], "since": feed[0]["id"]}
            await ws.send(json.dumps(frame))
            replayed: list[Json] = []
            while (message := json.loads(await asyncio.wait_for(ws.recv(), 5)))[
                "type"
            ] != "subscribed":
                replayed.append(message)
        assert replayed == feed[1:]
        assert [event["data"]["title"] for event in replayed] == [f"{n}" for n in range(60)]


async def test_two_workers_under_concurrent_load_answer_no_5xx(
    pgbouncer: PgBouncer, environ: dict[str, str]
) -> None:
    async with serving(through(environ, pgbouncer), workers=2) as http:
        users = await asyncio.gather(*(register_user(http) for _ in range(4)))
        projects = [
            (await call(http, user, "POST", "/projects", {"name": "Load"}, 201)).json()
            for user in users
        ]
        tasks = [
            (
                await call(
                    http, user, "POST", f"/projects/{project['id']}/tasks", {"title": "t"}, 201
                )
            ).json()
            for user, project in zip(users, projects, strict=True)
        ]
        gate = asyncio.Semaphore(40)

        async def one(n: int) -> tuple[str, int, str]:
            """The n-th request of the mix; what it was, its status, and its
            body when the status is not the one expected."""
            user, project, task = users[n % 4], projects[n % 4], tasks[n % 4]
            name, method, url, body, expect = [
                ("list tasks", "GET", f"/projects/{project['id']}/tasks", None, 200),
                ("create task", "POST", f"/projects/{project['id']}/tasks", {"title": "l"}, 201),
                ("get task", "GET", f"/tasks/{task['id']}", None, 200),
                ("patch task", "PATCH", f"/tasks/{task['id']}", {"description": f"v{n}"}, 200),
                ("events", "GET", f"/projects/{project['id']}/events", None, 200),
                ("me", "GET", "/auth/me", None, 200),
                ("list projects", "GET", "/projects", None, 200),
                ("readyz", "GET", "/readyz", None, 200),
            ][n % 8]
            async with gate:
                response = await http.request(method, url, json=body, headers=user.headers)
            wrong = response.status_code != expect
            return f"{method} {name}", response.status_code, response.text if wrong else ""

        answers = await asyncio.gather(*(one(n) for n in range(200)))
        failures = Counter((name, status) for name, status, text in answers if text)
        examples = {(name, status): text for name, status, text in answers if text}
        assert not failures, (dict(failures), list(examples.values())[:2])


async def test_without_the_setting_the_same_server_fails_through_pgbouncer(
    pgbouncer: PgBouncer, environ: dict[str, str]
) -> None:
    async with serving(through(environ, pgbouncer, TASKFLOW_DATABASE_PGBOUNCER="")) as http:
        response = await http.post(
            "/auth/register", json={"email": "control@example.com", "password": PASSWORD}
        )
        assert response.status_code >= 500, response.text
        ready = await http.get("/readyz")
        assert ready.status_code >= 500, ready.text
    # Refused at connect: the statement and lock timeouts as startup parameters.
    assert re.search(
        r"unsupported startup parameter: (statement_timeout|lock_timeout)", pgbouncer.log_text()
    )


async def test_database_connection_pool_url_serves_through_pgbouncer(
    pgbouncer: PgBouncer, pooled_database: str, environ: dict[str, str]
) -> None:
    direct = make_url(pooled_database).set(drivername="postgres")
    pooled = {
        **environ,
        "DATABASE_URL": direct.render_as_string(hide_password=False),
        "DATABASE_CONNECTION_POOL_URL": pgbouncer.url(POOLED_URL_DATABASE),
        "TASKFLOW_DATABASE_PGBOUNCER": "",
    }
    async with serving(pooled, workers=1) as http:
        owner = await register_user(http)
        project = (await call(http, owner, "POST", "/projects", {"name": "Heroku"}, 201)).json()
        url = f"/projects/{project['id']}/tasks"
        await asyncio.gather(
            *(call(http, owner, "POST", url, {"title": f"{n}"}, 201) for n in range(5))
        )
        listed = (await call(http, owner, "GET", url)).json()
        assert len(listed["items"]) == 5
    # The server came through pgbouncer, under the pooled URL's name.
    assert f"login attempt: db={POOLED_URL_DATABASE} " in pgbouncer.log_text()
