"""The processes a run starts: servers and load generators, each stopped on the
way out, whatever happens."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import time
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


# How each ASGI server is started: TaskFlow runs on hypercorn as the Procfile
# has it; the reference runs on these, with each one's fastest event loop and
# HTTP parser, so that its ceiling is the fastest server's.
ASGI_SERVERS = ("hypercorn", "uvicorn", "granian")


def server_command(asgi_server: str, app: str, port: int, workers: int) -> list[str]:
    """The command line serving *app* on 127.0.0.1:*port* with *workers* processes."""
    if asgi_server == "hypercorn":
        return [sys.executable, "-m", "hypercorn", "--config", "file:taskflow/hypercorn_config.py",
                app, "--bind", f"127.0.0.1:{port}", "--workers", str(workers)]  # fmt: skip
    if asgi_server == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--loop", "uvloop", "--http", "httptools",
                "--no-access-log", "--log-level", "warning"]  # fmt: skip
    if asgi_server == "granian":
        return [sys.executable, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1",
                "--port", str(port), "--workers", str(workers), "--loop", "uvloop",
                "--http", "1", "--no-ws", "--log-level", "warning", app]  # fmt: skip
    raise ValueError(f"bench: no ASGI server {asgi_server!r}")


@asynccontextmanager
async def serve(
    app: str, env: dict[str, str], workers: int, asgi_server: str = "hypercorn"
) -> AsyncIterator[str]:
    """*app* served as the Procfile does (hypercorn) or by another ASGI
    server; yields its base URL once it answers."""
    async with server(app, env, workers, asgi_server) as (url, _pid):
        yield url


@asynccontextmanager
async def server(
    app: str, env: dict[str, str], workers: int, asgi_server: str = "hypercorn"
) -> AsyncIterator[tuple[str, int]]:
    """As ``serve``, and the pid of the server's master (its workers are its children)."""
    port = free_port()
    async with process(
        *server_command(asgi_server, app, port, workers), env={**os.environ, **env},
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    ) as master:  # fmt: skip
        url = f"http://127.0.0.1:{port}"
        # Servers start side by side on a machine that may be busy: a minute.
        deadline = time.monotonic() + 60
        async with httpx.AsyncClient() as http:
            while True:
                if master.returncode is not None:
                    raise RuntimeError(f"bench: {asgi_server} serving {app} exited at start")
                try:
                    await http.get(f"{url}/healthz")
                    break
                except httpx.TransportError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"bench: {asgi_server} serving {app} did not answer in a minute"
                        ) from None
                    await asyncio.sleep(0.05)
        yield url, master.pid
