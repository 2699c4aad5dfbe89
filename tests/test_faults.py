"""Faults under a steady load: the database restarting, a SIGTERM mid-request."""

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from taskflow.config import Config
from taskflow.models import Event, Task

from .support import ON_POSTGRES, PASSWORD, hypercorn, live_server, register_user, running

CLUSTER = next(iter(os.listdir("/etc/postgresql")), "") if Path("/etc/postgresql").exists() else ""


def postgres(action: str) -> None:
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main", action, "-m", "fast"]
        if action == "stop"
        else ["pg_ctlcluster", "--skip-systemctl-redirect", CLUSTER, "main", action],
        check=True,
        capture_output=True,
    )


@pytest.mark.skipif(not ON_POSTGRES, reason="restarts the PostgreSQL server")
async def test_postgres_restart_is_503_then_recovers_with_no_partial_writes(
    config: Config, environ: dict[str, str]
) -> None:
    async with running(config), live_server(environ) as url:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            auth = (await register_user(http)).headers
            project = (await http.post("/projects", json={"name": "F"}, headers=auth)).json()

            results: list[tuple[float, int, str]] = []
            created: list[str] = []

            async def steady_load(seconds: float) -> None:
                deadline = time.monotonic() + seconds
                n = 0
                while time.monotonic() < deadline:
                    n += 1
                    response = await http.post(
                        f"/projects/{project['id']}/tasks", json={"title": f"t{n}"}, headers=auth
                    )
                    results.append(
                        (
                            time.monotonic(),
                            response.status_code,
                            response.headers.get("Retry-After", ""),
                        )
                    )
                    if response.status_code == 201:
                        created.append(response.json()["id"])
                    await asyncio.sleep(0.05)

            load = asyncio.create_task(steady_load(14))
            await asyncio.sleep(2)
            await asyncio.to_thread(postgres, "stop")
            down_at = time.monotonic()
            await asyncio.sleep(3)
            await asyncio.to_thread(postgres, "start")
            up_at = time.monotonic()
            await load
        tasks, events = await written(config, project["id"])

    statuses = {status for _, status, _ in results}
    assert statuses <= {201, 503}, statuses
    outage = [(t, s, r) for t, s, r in results if s == 503]
    assert outage, "the outage was not seen"
    assert all(int(retry) > 0 for _, _, retry in outage)
    assert all(t >= down_at - 0.5 for t, _, _ in outage)
    assert max(t for t, _, _ in outage) < up_at + 10  # served again within 10 s
    assert results[-1][1] == 201
    # Every 201 is a task with its event; nothing else was written.
    assert tasks == set(created)
    assert events == len(created)


async def written(config: Config, project_id: str) -> tuple[set[str], int]:
    """The project's tasks, and its task.created events, as the database has them."""
    engine = create_async_engine(config.database_url)
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(Task.id).where(Task.project_id == uuid.UUID(project_id))
        )
        tasks = {str(task_id) for task_id in rows.scalars()}
        events = (
            await connection.execute(
                select(func.count())
                .select_from(Event)
                .where(Event.project_id == uuid.UUID(project_id), Event.kind == "task.created")
            )
        ).scalar_one()
    await engine.dispose()
    return tasks, events


async def test_sigterm_lets_in_flight_requests_finish(
    config: Config, environ: dict[str, str]
) -> None:
    slow = {**environ, "TASKFLOW_BCRYPT_ROUNDS": "14"}  # a login takes about a second
    async with running(config), hypercorn(slow, graceful_timeout=20) as (url, process):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            body = {"email": "slow@example.com", "password": PASSWORD}
            assert (await http.post("/auth/register", json=body)).status_code == 201
            in_flight = asyncio.create_task(http.post("/auth/login", json=body))
            await asyncio.sleep(0.3)
            os.killpg(process.pid, signal.SIGTERM)
            response = await in_flight
            exit_code = await asyncio.wait_for(process.wait(), 25)
    assert response.status_code == 200
    assert exit_code == 0
