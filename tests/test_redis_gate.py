"""The Redis gate and the broker's subscription, against servers that stop
answering: a socket that accepts and never replies, and a real redis-server
frozen with SIGSTOP."""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from taskflow.broker import SILENT_SECONDS, RedisBroker
from taskflow.config import Config
from taskflow.db import create_redis
from taskflow.redis_gate import RedisGate, RedisUnavailable

from .support import free_port, private_redis

DEADLINE = 0.2
BACKOFF = 0.5


@asynccontextmanager
async def silent_server() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers (a frozen
    host, a partition that drops packets); yields its redis:// URL."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        for writer in held:
            writer.close()
        server.close()


def gate_for(url: str, tmp_path: Path) -> RedisGate:
    config = Config.from_env(
        {
            "TASKFLOW_INSTANCE_DIR": str(tmp_path),
            "REDIS_URL": url,
            "TASKFLOW_REDIS_TIMEOUT_MS": str(int(DEADLINE * 1000)),
            "TASKFLOW_REDIS_BACKOFF_MS": str(int(BACKOFF * 1000)),
        }
    )
    return RedisGate(create_redis(url, config), DEADLINE, BACKOFF)


async def timed_get(gate: RedisGate) -> tuple[float, bool]:
    """How long one call took, and whether Redis answered it."""
    started = time.monotonic()
    try:
        await gate.call(lambda redis: redis.get("taskflow:gate-test"))
    except RedisUnavailable:
        return time.monotonic() - started, False
    return time.monotonic() - started, True


async def test_a_silent_redis_costs_one_deadline_then_callers_skip_it(tmp_path: Path) -> None:
    async with silent_server() as url:
        gate = gate_for(url, tmp_path)
        first = await timed_get(gate)
        others = await asyncio.gather(*(timed_get(gate) for _ in range(20)))
        await gate.close()
    assert first[1] is False
    assert DEADLINE * 0.9 < first[0] < DEADLINE * 2  # one deadline, not redis-py's retries
    assert all(answered is False and took < 0.01 for took, answered in others)
    assert not gate.healthy


async def test_after_the_back_off_one_caller_probes_and_the_others_skip(tmp_path: Path) -> None:
    async with silent_server() as url:
        gate = gate_for(url, tmp_path)
        await timed_get(gate)
        await asyncio.sleep(BACKOFF * 1.1)
        calls = await asyncio.gather(*(timed_get(gate) for _ in range(10)))
        await gate.close()
    durations = sorted(took for took, _ in calls)
    assert not any(answered for _, answered in calls)
    assert durations[-1] > DEADLINE * 0.9  # the probe
    assert durations[-2] < 0.01  # everyone else: the fallback at once


async def test_redis_is_used_again_once_it_answers(tmp_path: Path) -> None:
    port = free_port()
    async with private_redis(port) as server:
        gate = gate_for(f"redis://127.0.0.1:{port}/0", tmp_path)
        await wait_until_answered(gate)
        os.kill(server.pid, signal.SIGSTOP)
        try:
            frozen = await timed_get(gate)
            skipped = await timed_get(gate)
        finally:
            os.kill(server.pid, signal.SIGCONT)
        await asyncio.sleep(BACKOFF * 1.1)
        back = await timed_get(gate)
        await gate.close()
    assert frozen[1] is False and frozen[0] < DEADLINE * 2
    assert skipped[1] is False and skipped[0] < 0.01
    assert back[1] is True
    assert gate.healthy


async def test_a_busy_event_loop_is_not_taken_for_a_silent_redis() -> None:
    gate = RedisGate(object(), DEADLINE, BACKOFF)  # type: ignore[arg-type]

    async def answer_after_a_busy_turn(_redis: object) -> str:
        # The worker's loop is busy (a burst of requests) for longer than the
        # deadline before the command goes out; then Redis answers in a
        # millisecond.
        asyncio.get_running_loop().call_soon(time.sleep, DEADLINE * 2)
        await asyncio.sleep(0)
        await asyncio.sleep(0.001)
        return "answer"

    try:
        assert await gate.call(answer_after_a_busy_turn) == "answer"  # type: ignore[arg-type]
    except RedisUnavailable:
        pytest.fail("an answer that came a millisecond after the command was dropped")
    assert gate.healthy


async def test_the_broker_notices_a_frozen_redis_and_subscribes_again(tmp_path: Path) -> None:
    port = free_port()
    async with private_redis(port) as server:
        gate = gate_for(f"redis://127.0.0.1:{port}/0", tmp_path)
        await wait_until_answered(gate)
        broker = RedisBroker(gate)
        await broker.start()
        try:
            await asyncio.wait_for(broker.subscribed.wait(), 5)
            os.kill(server.pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            try:
                while broker.subscribed.is_set():
                    assert time.monotonic() - frozen_at < SILENT_SECONDS + 2
                    await asyncio.sleep(0.05)
                noticed_after = time.monotonic() - frozen_at
            finally:
                os.kill(server.pid, signal.SIGCONT)
            await asyncio.wait_for(broker.subscribed.wait(), 10)
            assert broker.connected
        finally:
            await broker.close()
            await gate.close()
    assert noticed_after < SILENT_SECONDS + 2


async def wait_until_answered(gate: RedisGate) -> None:
    """Until a freshly started Redis answers."""
    for _ in range(100):
        if await gate.probe():
            return
        await asyncio.sleep(0.05)
    pytest.fail("the private Redis did not start")
