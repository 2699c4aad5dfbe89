"""Benchmark TaskFlow against a framework-free reference doing the same work.

    python -m bench                 # 1,000 users, 2,000 projects, 200,000 tasks
    python -m bench --tasks 1000000
    python -m bench --smoke         # a few seconds, to keep the benchmark working

It creates a fresh database, seeds it with COPY, starts TaskFlow the way the
Procfile does (hypercorn, uvloop, one worker per core) and the reference
server beside it, and drives both with wrk from a separate process,
interleaving their runs. It prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import bcrypt
import httpx
from alembic import command
from sqlalchemy.engine import make_url

from taskflow.cli import alembic_config
from taskflow.config import normalize_database_url

ROOT = Path(__file__).resolve().parent.parent
PASSWORD = "benchmark-password"
STATUSES = ("pending", "in_progress", "completed")


@dataclass
class Scale:
    users: int
    projects: int
    tasks: int
    seconds: int
    connections: int


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def create_database(admin_dsn: str, name: str) -> str:
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    return str(make_url(admin_dsn).set(database=name).render_as_string(hide_password=False))


async def seed(dsn: str, scale: Scale) -> tuple[str, uuid.UUID]:
    """Users, projects (owner plus two members each) and tasks; returns the
    benchmark user's email and a project of theirs."""
    rng = random.Random(7)
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    now = datetime.now(UTC)
    users = [uuid.uuid4() for _ in range(scale.users)]
    projects = [uuid.uuid4() for _ in range(scale.projects)]
    connection = await asyncpg.connect(dsn)
    try:
        await connection.copy_records_to_table(
            "users",
            columns=["id", "email", "password_hash", "created_at"],
            records=[
                (u, f"user{n}@bench.example", password_hash, now) for n, u in enumerate(users)
            ],
        )
        await connection.copy_records_to_table(
            "projects",
            columns=["id", "name", "owner_id", "created_at", "updated_at"],
            records=[(p, f"Project {n}", users[n % len(users)], now, now)
                     for n, p in enumerate(projects)],
        )  # fmt: skip
        members = []
        for n, project in enumerate(projects):
            owner = users[n % len(users)]
            members.append((project, owner, "owner", now))
            for other in {users[(n + 1) % len(users)], users[(n + 2) % len(users)]} - {owner}:
                members.append((project, other, "member", now))
        await connection.copy_records_to_table(
            "project_members", columns=["project_id", "user_id", "role", "added_at"],
            records=members,
        )  # fmt: skip
        batch = []
        for n in range(scale.tasks):
            project_index = n % len(projects)
            created = now - timedelta(seconds=scale.tasks - n)
            due = created + timedelta(days=rng.randint(1, 60)) if n % 3 else None
            batch.append((uuid.uuid4(), projects[project_index], f"Task {n} of the benchmark",
                          None, STATUSES[n % 3], users[project_index % len(users)], due, 1,
                          created, created))  # fmt: skip
            if len(batch) == 50_000 or n == scale.tasks - 1:
                await connection.copy_records_to_table(
                    "tasks",
                    columns=["id", "project_id", "title", "description", "status",
                             "assignee_id", "due_date", "version", "created_at", "updated_at"],
                    records=batch,
                )  # fmt: skip
                batch = []
        await connection.execute("ANALYZE")
    finally:
        await connection.close()
    return "user0@bench.example", projects[0]


@asynccontextmanager
async def serve(app: str, env: dict[str, str], workers: int) -> AsyncIterator[str]:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hypercorn", app, "--bind", f"127.0.0.1:{port}",
        "--worker-class", "uvloop", "--workers", str(workers),
        env={**os.environ, **env}, cwd=ROOT,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as http:
            for _ in range(400):
                try:
                    await http.get(f"{url}/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield url
    finally:
        process.terminate()
        await process.wait()


@dataclass
class Result:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int


def wrk(name: str, url: str, scale: Scale, token: str) -> Result:
    command_line = ["wrk", "-t2", f"-c{scale.connections}", f"-d{scale.seconds}s", "--latency",
                    "-H", f"Authorization: Bearer {token}"]  # fmt: skip
    output = subprocess.run([*command_line, url], capture_output=True, text=True, check=True).stdout

    def millis(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", output)
        if match is None:
            return float("nan")
        value, unit = float(match[1]), match[2]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    return Result(name, rps, millis("50%"), millis("99%"), int(errors[1]) if errors else 0)


async def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: CI's check")
    args = parser.parse_args()
    scale = (
        Scale(users=10, projects=20, tasks=500, seconds=1, connections=4)
        if args.smoke
        else Scale(users=1_000, projects=2_000, tasks=args.tasks, seconds=args.seconds,
                   connections=50)
    )  # fmt: skip
    if shutil.which("wrk") is None:
        sys.exit("bench: needs wrk (apt-get install wrk)")

    admin = normalize_database_url(
        os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    )
    plain = admin.replace("postgresql+asyncpg://", "postgresql://")
    dsn = await create_database(plain, "taskflow_bench")
    config = alembic_config()
    config.attributes.update(database_url=normalize_database_url(dsn), configure_logger=False)
    await asyncio.to_thread(command.upgrade, config, "head")
    started = time.monotonic()
    email, project_id = await seed(dsn, scale)
    print(f"seeded {scale.tasks:,} tasks in {time.monotonic() - started:.1f} s", file=sys.stderr)

    workers = os.cpu_count() or 1
    env = {
        "DATABASE_URL": dsn,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "TASKFLOW_SECRET_KEY": "bench-" + "s" * 40,
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": "1000000000",
        "TASKFLOW_LOG_LEVEL": "WARNING",
        "BENCH_DSN": dsn,
    }
    async with (
        serve("wsgi:app", env, workers) as taskflow,
        serve("bench.reference:app", env, workers) as reference,
    ):
        async with httpx.AsyncClient(base_url=taskflow, timeout=60) as http:
            login = await http.post("/auth/login", json={"email": email, "password": PASSWORD})
            token = login.json()["access_token"]
            auth = {"Authorization": f"Bearer {token}"}
            first = await http.get(f"/projects/{project_id}/tasks?limit=1", headers=auth)
            task = first.json()
        page = f"/projects/{project_id}/tasks?status=pending,in_progress&limit=50"
        results = []
        for _ in range(2):  # interleaved, so both see the same machine
            results.append(wrk("list tasks (TaskFlow)", taskflow + page, scale, token))
            results.append(wrk("list tasks (reference)", reference + page, scale, token))
        results.append(
            wrk("get task (TaskFlow)", f"{taskflow}/tasks/{task['items'][0]['id']}", scale, token)
        )
    best = {
        name: max((r for r in results if r.name == name), key=lambda r: r.requests_per_second)
        for name in dict.fromkeys(r.name for r in results)
    }
    print("| route | req/s | p50 ms | p99 ms | non-2xx |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for result in best.values():
        print(f"| {result.name} | {result.requests_per_second:,.0f} | {result.p50_ms:.1f} "
              f"| {result.p99_ms:.1f} | {result.errors} |")  # fmt: skip
    ratio = (best["list tasks (TaskFlow)"].requests_per_second
             / best["list tasks (reference)"].requests_per_second)  # fmt: skip
    print(f"\nlist tasks, TaskFlow / ceiling: {ratio:.2f}")
    if any(result.errors for result in best.values()):
        sys.exit("bench: some requests failed")


if __name__ == "__main__":
    asyncio.run(main())
