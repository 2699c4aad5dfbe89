"""A fresh benchmark database, migrated and seeded with COPY."""

from __future__ import annotations

import asyncio
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import asyncpg
import bcrypt
from alembic import command
from sqlalchemy.engine import make_url

from taskflow.cli import alembic_config
from taskflow.config import normalize_database_url

PASSWORD = "benchmark-password"
STATUSES = ("pending", "in_progress", "completed")


@dataclass
class Seeded:
    dsn: str
    email: str  # the benchmark user's
    list_project: uuid.UUID  # the one the list runs read
    write_project: uuid.UUID  # the one the writes go to, so the list's page stays put


async def fresh_database(admin_dsn: str, name: str) -> str:
    """Drop and create database *name*, migrate it to head; returns its DSN."""
    connection = await asyncpg.connect(admin_dsn)
    try:
        await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await connection.execute(f'CREATE DATABASE "{name}"')
    finally:
        await connection.close()
    dsn = str(make_url(admin_dsn).set(database=name).render_as_string(hide_password=False))
    config = alembic_config()
    config.attributes.update(database_url=normalize_database_url(dsn), configure_logger=False)
    await asyncio.to_thread(command.upgrade, config, "head")
    return dsn


async def seed(
    dsn: str, users: int, projects: int, tasks: int, list_share: float | None = None
) -> Seeded:
    """Users, projects (owner plus two members each) and tasks, round-robin
    over the projects; with *list_share*, that share of the tasks goes to the
    list project instead, so its size grows with the table's."""
    rng = random.Random(7)
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(12)).decode()
    now = datetime.now(UTC)
    user_ids = [uuid.uuid4() for _ in range(users)]
    project_ids = [uuid.uuid4() for _ in range(projects)]
    every = round(1 / list_share) if list_share else 0
    connection = await asyncpg.connect(dsn)
    try:
        await connection.copy_records_to_table(
            "users",
            columns=["id", "email", "password_hash", "created_at"],
            records=[
                (u, f"user{n}@bench.example", password_hash, now) for n, u in enumerate(user_ids)
            ],
        )
        await connection.copy_records_to_table(
            "projects",
            columns=["id", "name", "owner_id", "created_at", "updated_at"],
            records=[(p, f"Project {n}", user_ids[n % users], now, now)
                     for n, p in enumerate(project_ids)],
        )  # fmt: skip
        members = []
        for n, project in enumerate(project_ids):
            owner = user_ids[n % users]
            members.append((project, owner, "owner", now))
            for other in {user_ids[(n + 1) % users], user_ids[(n + 2) % users]} - {owner}:
                members.append((project, other, "member", now))
        await connection.copy_records_to_table(
            "project_members", columns=["project_id", "user_id", "role", "added_at"],
            records=members,
        )  # fmt: skip
        batch = []
        for n in range(tasks):
            project_index = 0 if every and n % every == 0 else n % projects
            created = now - timedelta(seconds=tasks - n)
            due = created + timedelta(days=rng.randint(1, 60)) if n % 3 else None
            batch.append((uuid.uuid4(), project_ids[project_index], f"Task {n} of the benchmark",
                          None, STATUSES[n % 3], user_ids[project_index % users], due, 1,
                          created, created))  # fmt: skip
            if len(batch) == 50_000 or n == tasks - 1:
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
    # user0 owns project 0 and project `users` (projects are dealt round-robin).
    return Seeded(dsn, "user0@bench.example", project_ids[0], project_ids[users])
