"""The GCRA of the rate limits: in process memory on a fake clock, and its Lua
script in a real Redis (flushed before and after)."""

import asyncio
import math
import os
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from types import SimpleNamespace

import pytest
import redis.asyncio as aioredis
from quart import Response, g
from quart_rate_limiter import RateLimit
from redis.exceptions import RedisError

from taskflow import create_app, limits
from taskflow.config import Config
from taskflow.limits import ADMISSION_SCRIPT, EXTENSION_KEY, Decision, Limiter, MemoryBuckets

from .support import TEST_REDIS_URL

# The run's test database; the embedded run has none configured, and uses 14
# (CI runs both suites at once: each flushes only its own).
REDIS_URL = TEST_REDIS_URL or "redis://127.0.0.1:6379/14"
FIVE_IN_TEN_SECONDS = RateLimit(5, timedelta(seconds=10))  # one every 2 s


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    """The clock of ``taskflow.limits`` only (the event loop keeps the real one)."""
    clock = Clock()
    monkeypatch.setattr(limits, "time", SimpleNamespace(monotonic=clock.monotonic))
    return clock


def burst(buckets: MemoryBuckets, n: int, key: str = "k") -> list[Decision]:
    return [buckets.acquire(key, FIVE_IN_TEN_SECONDS) for _ in range(n)]


def test_a_burst_of_count_is_allowed_then_refused_for_an_interval(clock: Clock) -> None:
    buckets = MemoryBuckets()
    decisions = burst(buckets, 6)
    assert [d.allowed for d in decisions] == [True] * 5 + [False]
    assert decisions[-1].retry_after == pytest.approx(2.0)
    clock.now += 1.5
    refused = buckets.acquire("k", FIVE_IN_TEN_SECONDS)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(0.5)
    clock.now += 0.5
    assert [d.allowed for d in burst(buckets, 2)] == [True, False]


@pytest.mark.parametrize("idle", [10, 600])
def test_a_full_bucket_allows_one_whole_burst_however_long_it_was_idle(
    clock: Clock, idle: float
) -> None:
    buckets = MemoryBuckets()
    burst(buckets, 7)  # refusals do not count against the bucket
    clock.now += idle
    assert [d.allowed for d in burst(buckets, 6)] == [True] * 5 + [False]


def test_one_request_per_interval_is_always_allowed(clock: Clock) -> None:
    buckets = MemoryBuckets()
    burst(buckets, 5)
    for _ in range(20):
        clock.now += 2.0
        assert [d.allowed for d in burst(buckets, 2)] == [True, False]


def test_buckets_are_per_key(clock: Clock) -> None:
    buckets = MemoryBuckets()
    assert all(d.allowed for d in burst(buckets, 5, "alice"))
    assert not burst(buckets, 1, "alice")[0].allowed
    assert [d.allowed for d in burst(buckets, 6, "bob")] == [True] * 5 + [False]


def test_decisions_count_down_what_remains_and_when_the_bucket_is_full(clock: Clock) -> None:
    buckets = MemoryBuckets()
    decisions = burst(buckets, 6)
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0, 0]
    assert [d.reset for d in decisions] == pytest.approx([2, 4, 6, 8, 10, 10])
    assert [d.retry_after for d in decisions[:5]] == [0] * 5
    assert {d.limit for d in decisions} == {5}
    clock.now += 3  # one and a half intervals: one request back
    after = buckets.acquire("k", FIVE_IN_TEN_SECONDS)
    assert (after.allowed, after.remaining) == (True, 0)
    assert after.reset == pytest.approx(9)


def test_a_decision_from_redis_microseconds() -> None:
    limit = RateLimit(10, timedelta(minutes=1))
    assert Decision.of(limit, True, 0, 6_000_000) == Decision(True, 10, 9, 0, 6)
    assert Decision.of(limit, False, 1_500_000, 60_000_000) == Decision(False, 10, 0, 1.5, 60)


async def test_the_response_headers_carry_the_decision() -> None:
    app = create_app(
        Config(database_url="sqlite+aiosqlite:///:memory:", redis_url=None, secret_key="x" * 40)
    )
    limiter: Limiter = app.extensions[EXTENSION_KEY]
    async with app.test_request_context("/"):
        g.rate_limit = Decision(True, 5, 3, 0, 4.2)
        response = await limiter.after_request(Response(""))
    assert response.headers["RateLimit-Limit"] == "5"
    assert response.headers["RateLimit-Remaining"] == "3"
    assert response.headers["RateLimit-Reset"] == "5"


# The Lua script, in Redis


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    client = aioredis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError):
        await client.aclose()
        if os.environ.get("CI"):
            raise  # in CI a missing service is a failure
        pytest.skip(f"no Redis at {REDIS_URL}")
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()


def script_args(limit: RateLimit) -> list[int]:
    """A bucket's arguments as ``Buckets`` passes them: its interval and tolerance."""
    interval = limit.inverse * 1_000_000
    return [int(interval), int(limit.period.total_seconds() * 1_000_000 - interval)]


def gcra(redis: aioredis.Redis) -> Callable[[str, RateLimit], Awaitable[list[int]]]:
    """The admission script spending one request in one bucket, no session
    mark and nothing read: its [allowed, wait µs, full µs]."""
    script = redis.register_script(ADMISSION_SCRIPT)

    async def spend(key: str, limit: RateLimit) -> list[int]:
        out = await script(keys=[key], args=[0, 1, *script_args(limit)])
        return list(out[1:4])

    return spend


async def test_concurrent_requests_never_slip_past_the_limit(redis: aioredis.Redis) -> None:
    limit = RateLimit(10, timedelta(minutes=1))
    spend = gcra(redis)
    key = f"taskflow:limit:test-{uuid.uuid4()}"
    results = await asyncio.gather(*(spend(key, limit) for _ in range(100)))
    decisions = [Decision.of(limit, bool(allowed), wait, full) for allowed, wait, full in results]
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 10
    assert sorted(d.remaining for d in allowed) == list(range(10))
    assert all(0 < d.retry_after <= 6 for d in decisions if not d.allowed)
    ttl = await redis.pttl(key)
    assert 0 < ttl <= 60_000


async def test_a_bucket_expires_once_it_is_full_again(redis: aioredis.Redis) -> None:
    limit = RateLimit(10, timedelta(minutes=1))
    spend = gcra(redis)
    key = f"taskflow:limit:test-{uuid.uuid4()}"
    allowed, wait, full = await spend(key, limit)
    assert (allowed, wait) == (1, 0)
    assert 5_990_000 < full <= 6_000_000
    assert 5_900 < await redis.pttl(key) <= 6_000


@pytest.mark.parametrize("count", [10_000_000, 2_500])  # intervals of 0 and 400 µs
async def test_an_interval_under_a_millisecond_still_expires(
    redis: aioredis.Redis, count: int
) -> None:
    limit = RateLimit(count, timedelta(seconds=1))
    spend = gcra(redis)
    key = f"taskflow:limit:test-{uuid.uuid4()}"
    assert script_args(limit)[0] == math.floor(1_000_000 / count)
    allowed, _wait, _full = await spend(key, limit)
    assert allowed == 1
    ttl = await redis.pttl(key)
    assert ttl != -1  # -1: a key that never expires; -2: already gone
    assert ttl <= 1


async def test_a_bucket_whose_time_has_passed_is_a_full_bucket(redis: aioredis.Redis) -> None:
    """A key left holding a time in the past (its expiry rounds up to the millisecond)."""
    limit = RateLimit(10, timedelta(minutes=1))
    spend = gcra(redis)
    key = f"taskflow:limit:test-{uuid.uuid4()}"
    seconds, microseconds = await redis.time()
    await redis.set(key, (seconds - 3600) * 1_000_000 + microseconds, px=10_000)
    results = await asyncio.gather(*(spend(key, limit) for _ in range(20)))
    assert sum(allowed for allowed, _wait, _full in results) == 10
