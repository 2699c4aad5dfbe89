"""The web process's master (taskflow/supervisor.py), on real processes: a
worker killed by a signal is replaced while the others serve; a crash loop
ends the process with an error a platform sees; SIGTERM ends it cleanly."""

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import websockets

from taskflow.supervisor import MAX_REPLACEMENTS_PER_MINUTE

from .support import hypercorn, register_user


def workers_of(master: int) -> set[int]:
    """The master's worker processes (not multiprocessing's resource tracker)."""
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return {
        int(pid)
        for pid in children
        if "resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    }


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


async def until(condition: Callable[[], bool], seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        await asyncio.sleep(0.1)
    return False


async def test_a_killed_worker_is_replaced_while_the_other_serves(
    environ: dict[str, str],
) -> None:
    async with hypercorn(environ, workers=2) as (url, master):
        before = workers_of(master.pid)
        assert len(before) == 2
        victim = min(before)
        os.kill(victim, signal.SIGKILL)
        answered = 0
        async with httpx.AsyncClient(base_url=url, timeout=5) as http:
            # Served all along by the other worker, and by the new one.
            for _ in range(50):
                # A connection the killed worker had accepted may fail.
                with contextlib.suppress(httpx.TransportError):
                    answered += (await http.get("/healthz")).status_code == 200
                await asyncio.sleep(0.02)
        assert await until(lambda: len(workers_of(master.pid) - {victim}) == 2, 15)
        assert master.returncode is None
    assert answered >= 49


async def test_workers_that_keep_dying_stop_the_process(environ: dict[str, str]) -> None:
    async with hypercorn(environ, workers=1) as (_url, master):
        for _ in range(MAX_REPLACEMENTS_PER_MINUTE + 1):
            assert await until(lambda: len(workers_of(master.pid)) == 1, 15)
            os.kill(workers_of(master.pid).pop(), signal.SIGKILL)
            await asyncio.sleep(0.2)
        status = await asyncio.wait_for(master.wait(), 30)
    assert status != 0  # a crash the platform reports (and restarts)


async def test_sigterm_ends_every_worker_and_the_process_cleanly(
    environ: dict[str, str],
) -> None:
    async with hypercorn(environ, workers=2) as (_url, master):
        workers = workers_of(master.pid)
        os.killpg(master.pid, signal.SIGTERM)
        status = await asyncio.wait_for(master.wait(), 30)
    assert status == 0
    assert not any(alive(pid) for pid in workers)


async def test_sigterm_to_the_master_alone_closes_websockets_with_1012(
    environ: dict[str, str],
) -> None:
    async with hypercorn(environ, workers=2) as (url, master):
        async with httpx.AsyncClient(base_url=url, timeout=10) as http:
            user = await register_user(http)
        async with websockets.connect(
            url.replace("http://", "ws://") + "/ws", additional_headers=user.headers
        ) as ws:
            await ws.recv()  # ready
            master.send_signal(signal.SIGTERM)  # as `docker stop` does: not the group
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await asyncio.wait_for(ws.recv(), 10)
        status = await asyncio.wait_for(master.wait(), 30)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012
    assert status == 0
