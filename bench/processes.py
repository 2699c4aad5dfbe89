"""The processes a run starts: servers and load generators, each stopped on the
way out, whatever happens."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds_of(command: str) -> float:
    """CPU time spent so far by this machine's processes named *command*
    (PostgreSQL's backends, when it runs on this machine; 0 when it does not)."""
    ticks = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as stat:
                name, _, fields = stat.read().partition(" (")[2].rpartition(") ")
        except OSError:
            continue  # gone meanwhile
        if name == command:
            values = fields.split()
            ticks += int(values[11]) + int(values[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_seconds_of_tree(pid: int) -> float:
    """CPU time spent so far by process *pid* and its live children (a
    server's master and its workers)."""
    ticks = 0
    for child in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{child}/stat") as stat:
                values = stat.read().rpartition(") ")[2].split()
        except OSError:
            continue  # gone meanwhile
        if int(child) == pid or int(values[1]) == pid:  # itself, or its parent is
            ticks += int(values[11]) + int(values[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@asynccontextmanager
async def process(*argv: str, **options: Any) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process, terminated if it is still running when the block ends."""
    child = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, **options)
    try:
        yield child
    finally:
        if child.returncode is None:
            child.terminate()
            await child.wait()


async def output_of(*argv: str) -> str:
    """Run a command to its end and return its standard output; its standard
    error goes to ours, so warnings show as they happen."""
    async with process(*argv, stdout=asyncio.subprocess.PIPE) as child:
        out, _ = await child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} exited {child.returncode} (its error is above)")
    return out.decode()


async def python_module(module: str, *args: str) -> str:
    """`python -m module args…` in its own process: a load generator must not
    share an event loop with anything else."""
    return await output_of(sys.executable, "-m", module, *args)


@asynccontextmanager
async def serve(app: str, env: dict[str, str], workers: int) -> AsyncIterator[str]:
    """Hypercorn serving *app* as the Procfile does; yields its base URL once it answers."""
    async with server(app, env, workers) as (url, _pid):
        yield url


@asynccontextmanager
async def server(app: str, env: dict[str, str], workers: int) -> AsyncIterator[tuple[str, int]]:
    """As ``serve``, and the pid of hypercorn's master (its workers are its children)."""
    port = free_port()
    async with process(
        sys.executable, "-m", "hypercorn", "--config", "file:taskflow/hypercorn_config.py", app,
        "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
        env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    ) as master:  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:
            for _ in range(400):
                try:
                    await http.get(f"{url}/healthz")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        yield url, master.pid
