"""Deploying as a Heroku-style platform builds and runs TaskFlow: the build
files its Python buildpack reads, app.json, the Procfile's `release:` and
`web:` lines run as written (with `DATABASE_URL` in the `postgres://` form),
and hypercorn's timeouts for slow and idle clients."""

import asyncio
import json
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from sqlalchemy.engine import make_url

from taskflow.config import Config

from .support import (
    PROJECT_ROOT,
    TEST_REDIS_URL,
    TEST_SECRET,
    create_postgres_database,
    drop_postgres_database,
    free_port,
    hypercorn,
    postgres_only,
    register_user,
)

# The files by which Heroku's Python buildpack picks a package manager: it
# needs exactly one of them.
PACKAGE_MANAGER_FILES = ("requirements.txt", "uv.lock", "poetry.lock", "Pipfile.lock", "Pipfile")


def procfile() -> dict[str, str]:
    lines = (PROJECT_ROOT / "Procfile").read_text().splitlines()
    return dict(line.split(": ", 1) for line in lines if line.strip())


def app_json() -> dict[str, Any]:
    manifest: dict[str, Any] = json.loads((PROJECT_ROOT / "app.json").read_text())
    return manifest


def readme_settings() -> set[str]:
    """The variables the README's configuration table lists."""
    readme = (PROJECT_ROOT / "README.md").read_text()
    return set(re.findall(r"^\| `([A-Z0-9_]+)` \|", readme, re.MULTILINE))


def test_the_buildpack_finds_one_package_manager_and_a_tested_python() -> None:
    present = [name for name in PACKAGE_MANAGER_FILES if (PROJECT_ROOT / name).exists()]
    assert present == ["requirements.txt"]
    version = (PROJECT_ROOT / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.(1[1-9])", version), version
    # CI runs the suite with it (and with a newer one): see .ci/run.
    assert ".python-version" in (PROJECT_ROOT / ".ci" / "run").read_text()


def test_the_lock_pins_every_dependency_with_hashes() -> None:
    requirements = (PROJECT_ROOT / "requirements.txt").read_text()
    entries = re.findall(r"^([A-Za-z0-9_.-]+)(\S*)", requirements, re.MULTILINE)
    assert entries
    assert all(pin.startswith("==") for _, pin in entries), entries
    assert requirements.count("--hash=sha256:") >= len(entries)


def test_app_json_matches_the_procfile_and_the_configuration() -> None:
    manifest = app_json()
    processes = procfile()
    assert set(processes) == {"release", "web"}
    assert set(manifest["formation"]) <= set(processes)
    assert {addon["plan"].split(":")[0] for addon in manifest["addons"]} == {
        "heroku-postgresql",
        "heroku-redis",
    }
    assert manifest["env"]["TASKFLOW_SECRET_KEY"]["generator"] == "secret"
    assert manifest["env"]["TASKFLOW_TRUSTED_PROXY_HOPS"]["value"] == "1"
    # Every variable it sets is one TaskFlow reads and the README documents.
    assert set(manifest["env"]) <= readme_settings()
    # The settings it gives are valid values (a secret of 64 hex characters,
    # as the "secret" generator makes).
    values = {name: spec.get("value", "") for name, spec in manifest["env"].items()}
    values["TASKFLOW_SECRET_KEY"] = "0" * 64
    Config.from_env({**values, "DATABASE_URL": "postgres://u:p@db.example.com:5432/app"})


def test_the_readme_documents_every_setting() -> None:
    from dataclasses import fields

    settings = {field.metadata["env"] for field in fields(Config) if "env" in field.metadata}
    assert settings <= readme_settings()


def heroku_database_url(url: str) -> str:
    """The run's database URL as Heroku hands it out."""
    return make_url(url).set(drivername="postgres").render_as_string(hide_password=False)


@postgres_only
async def test_the_procfile_runs_as_written(tmp_path: Path) -> None:
    """`release:` then `web:`, each as a platform runs it: by bash, from the
    app's directory, with the virtualenv's commands on PATH and the platform's
    variables set, on a database that has never been migrated."""
    database_url = await asyncio.to_thread(create_postgres_database)
    port = free_port()
    environ = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "DATABASE_URL": heroku_database_url(database_url),
        "TASKFLOW_SECRET_KEY": TEST_SECRET,
        "TASKFLOW_TRUSTED_PROXY_HOPS": "1",
        "PORT": str(port),
        "WEB_CONCURRENCY": "2",
        "TASKFLOW_BCRYPT_ROUNDS": "4",
    }
    if TEST_REDIS_URL:
        environ["REDIS_URL"] = TEST_REDIS_URL
    processes = procfile()
    try:
        release = await asyncio.create_subprocess_exec(
            "bash", "-c", processes["release"], cwd=PROJECT_ROOT, env=environ,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output, _ = await asyncio.wait_for(release.communicate(), 60)
        assert release.returncode == 0, output.decode()

        web = await asyncio.create_subprocess_exec(
            "bash", "-c", processes["web"], cwd=PROJECT_ROOT, env=environ, start_new_session=True,
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=10) as http:
                await wait_for_health(http)
                ready = await http.get("/readyz")
                assert ready.status_code == 200, ready.text
                user = await register_user(http)
                project = await http.post("/projects", json={"name": "P"}, headers=user.headers)
                assert project.status_code == 201
                tasks = f"/projects/{project.json()['id']}/tasks"
                created = await http.post(tasks, json={"title": "t"}, headers=user.headers)
                assert created.status_code == 201
                listed = await http.get(tasks, headers=user.headers)
                assert [task["title"] for task in listed.json()["items"]] == ["t"]
        finally:
            os.killpg(web.pid, signal.SIGTERM)
            exit_code = await asyncio.wait_for(web.wait(), 30)
        assert exit_code == 0
    finally:
        await asyncio.to_thread(drop_postgres_database, database_url)


async def wait_for_health(http: httpx.AsyncClient) -> None:
    for _ in range(200):
        try:
            if (await http.get("/healthz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail("the web process did not start")


READ_TIMEOUT_SECONDS = 2


async def test_a_client_that_stops_sending_is_disconnected(environ: dict[str, str]) -> None:
    environ = {**environ, "TASKFLOW_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT_SECONDS)}
    async with hypercorn(environ) as (url, _process):
        port = int(url.rsplit(":", 1)[1])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # and never the end of it
        await writer.drain()
        started = time.monotonic()
        closed = await asyncio.wait_for(reader.read(), READ_TIMEOUT_SECONDS * 5)
        held = time.monotonic() - started
        writer.close()
    assert closed == b""  # closed by the server, without an answer
    assert READ_TIMEOUT_SECONDS * 0.8 < held < READ_TIMEOUT_SECONDS * 3


async def test_a_websocket_that_only_listens_stays_open(environ: dict[str, str]) -> None:
    environ = {**environ, "TASKFLOW_READ_TIMEOUT_SECONDS": str(READ_TIMEOUT_SECONDS)}
    async with hypercorn(environ) as (url, _process):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            user = await register_user(http)
            project = (
                await http.post("/projects", json={"name": "P"}, headers=user.headers)
            ).json()
            # No pings of its own: only the client library's answers to the
            # server's pings cross the socket.
            async with websockets.connect(
                url.replace("http://", "ws://") + "/ws",
                additional_headers=user.headers,
                ping_interval=None,
            ) as ws:
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(json.dumps({"type": "subscribe", "project_id": project["id"]}))
                assert json.loads(await ws.recv())["type"] == "subscribed"
                await asyncio.sleep(READ_TIMEOUT_SECONDS * 3)
                tasks = f"/projects/{project['id']}/tasks"
                await http.post(tasks, json={"title": "late"}, headers=user.headers)
                event = json.loads(await asyncio.wait_for(ws.recv(), 5))
    assert event["event"] == "task.created"
