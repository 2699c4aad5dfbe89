"""Startup and shutdown of the backends, the one commit policy, and the broker."""

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis
from quart import Blueprint, Quart
from sqlalchemy import func, select

from taskflow import create_app
from taskflow.broker import InProcessBroker, RedisBroker
from taskflow.config import Config
from taskflow.db import after_commit, backends, session
from taskflow.errors import APIError
from taskflow.models import User
from taskflow.redis_gate import RedisGate

from .support import TEST_REDIS_URL, redis_only, running

probe = Blueprint("probe", __name__)
PROJECT = uuid.uuid4()


@probe.post("/probe/users/<outcome>")
async def write_user(outcome: str) -> tuple[dict[str, str], int]:
    """Adds a user and records an event, then succeeds or fails as asked."""
    db_session = session()
    user = User(email=f"{uuid.uuid4().hex}@example.com", password_hash="x")
    db_session.add(user)
    await db_session.flush()
    message = {"project_id": str(PROJECT), "user": str(user.id)}
    after_commit(db_session, backends().broker.publish, message)
    if outcome == "fail":
        raise APIError(409)
    return {"id": str(user.id)}, 201


@pytest.fixture
async def probe_app(config: Config) -> AsyncIterator[Quart]:
    async with running(config, probe) as app:
        yield app


async def count_users(app: Quart) -> int:
    async with app.app_context(), backends().sessionmaker() as db_session:
        return (await db_session.execute(select(func.count()).select_from(User))).scalar_one()


async def test_backends_live_between_startup_and_shutdown(config: Config) -> None:
    app = create_app(config)
    async with app.test_app(), app.app_context():
        started = backends()
        assert started.redis.configured == bool(config.redis_url)
        expected = RedisBroker if config.redis_url else InProcessBroker
        assert isinstance(started.broker, expected)
    assert "taskflow.backends" not in app.extensions
    # The pool was disposed: nothing is checked out or kept.
    assert started.engine.pool.checkedout() == 0  # type: ignore[attr-defined]


async def test_success_commits_and_publishes_after_commit(probe_app: Quart) -> None:
    received: list[dict[str, Any]] = []
    async with probe_app.app_context():
        broker = backends().broker
    broker.subscribe(received.append)
    if isinstance(broker, RedisBroker):
        await asyncio.wait_for(broker.subscribed.wait(), 5)

    response = await probe_app.test_client().post("/probe/users/succeed")
    assert response.status_code == 201
    assert await count_users(probe_app) == 1
    user_id = (await response.get_json())["id"]
    for _ in range(100):
        if received:
            break
        await asyncio.sleep(0.02)
    assert received == [{"project_id": str(PROJECT), "user": user_id}]


async def test_failure_rolls_back_and_publishes_nothing(probe_app: Quart) -> None:
    received: list[dict[str, Any]] = []
    async with probe_app.app_context():
        backends().broker.subscribe(received.append)
    response = await probe_app.test_client().post("/probe/users/fail")
    assert response.status_code == 409
    assert await count_users(probe_app) == 0
    await asyncio.sleep(0.3)
    assert received == []


async def test_in_process_broker_hands_every_message_to_every_sink() -> None:
    broker = InProcessBroker()
    first: list[Any] = []
    second: list[Any] = []
    broker.subscribe(first.append)
    broker.subscribe(second.append)
    await broker.publish({"project_id": "a", "n": 1})  # type: ignore[typeddict-item]
    broker.unsubscribe(first.append)
    await broker.publish({"project_id": "b", "n": 2})  # type: ignore[typeddict-item]
    assert first == [{"project_id": "a", "n": 1}]
    assert second == [{"project_id": "a", "n": 1}, {"project_id": "b", "n": 2}]


@redis_only
async def test_redis_broker_reaches_every_instance() -> None:
    clients = [aioredis.from_url(TEST_REDIS_URL) for _ in range(2)]
    brokers = [RedisBroker(RedisGate(client, 1, 1)) for client in clients]
    received: list[list[dict[str, Any]]] = [[], []]
    for broker, inbox in zip(brokers, received, strict=True):
        broker.subscribe(inbox.append)
        await broker.start()
        await asyncio.wait_for(broker.subscribed.wait(), 5)
    await brokers[0].publish({"project_id": "p", "n": 1})  # type: ignore[typeddict-item]
    await brokers[1].publish({"project_id": "other", "n": 2})  # type: ignore[typeddict-item]
    for _ in range(100):
        if all(len(inbox) == 2 for inbox in received):
            break
        await asyncio.sleep(0.02)
    for broker, client in zip(brokers, clients, strict=True):
        await broker.close()
        await client.aclose()
    both = [{"project_id": "p", "n": 1}, {"project_id": "other", "n": 2}]
    assert received == [both, both]


async def test_redis_broker_publish_survives_redis_being_down() -> None:
    client = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    broker = RedisBroker(RedisGate(client, 1, 1))
    await broker.publish({"project_id": "p"})  # type: ignore[typeddict-item]  # logged, not raised
    await client.aclose()
