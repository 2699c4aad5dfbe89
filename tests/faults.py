"""What the fault tests share: a steady, bounded load and the figures it
yields, a TCP proxy that makes a backend silent or slow, a WebSocket watcher
that times live events, and an audit of what the database holds.

Every fault test reports its figures through ``report_fault``; the terminal
summary (``conftest.py``) prints them all as one table at the end of the run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg
import httpx
import websockets
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine
from websockets.asyncio.client import ClientConnection

from taskflow.models import Event, Task

from .support import ON_POSTGRES, TestUser

BACKEND = "postgresql" if ON_POSTGRES else "sqlite"

# A request that has not answered by then has hung: it counts as a transport
# error (and its time, at least this, fails any latency bound).
REQUEST_TIMEOUT_SECONDS = 10.0


# The load.


@dataclass(frozen=True)
class Route:
    """One kind of request of a load: ``send(n)`` sends the n-th. A 201 of a
    route that ``creates`` names, in its body's ``id``, a task written."""

    name: str
    send: Callable[[int], Awaitable[httpx.Response]]
    creates: bool = False


@dataclass(frozen=True)
class Sample:
    """One request of a load: when it started, how long it took, and its
    status (None: no HTTP answer, a transport error)."""

    route: str
    started: float
    seconds: float
    status: int | None
    retry_after: str | None = None
    error: str = ""
    created: str | None = None  # the task a 201 of a route that creates names

    @property
    def ended(self) -> float:
        return self.started + self.seconds

    @property
    def ok(self) -> bool:
        return self.status is not None and self.status < 400


class Load:
    """A steady load, bounded in time and in count: *clients* concurrent
    clients, each sending the routes in turn with *pause* seconds between its
    requests, until stopped, *seconds* have passed or *limit* requests have
    been sent. Use as ``async with Load(...) as load:``; every request's
    ``Sample`` is in ``load.samples``, and the tasks its 201s name in
    ``load.created``. ``send`` adds a request of the test's own."""

    def __init__(
        self,
        routes: Sequence[Route],
        *,
        clients: int = 4,
        pause: float = 0.02,
        seconds: float = 20.0,
        limit: int = 5000,
    ) -> None:
        self.routes = list(routes)
        self.clients, self.pause, self.seconds, self.limit = clients, pause, seconds, limit
        self.samples: list[Sample] = []
        self._sent = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Load:
        deadline = time.monotonic() + self.seconds
        self._tasks = [
            asyncio.create_task(self._client(number, deadline)) for number in range(self.clients)
        ]
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        self._stopping = True
        await asyncio.gather(*self._tasks)

    async def stop(self) -> None:
        await self.__aexit__(None, None, None)

    async def _client(self, number: int, deadline: float) -> None:
        turn = number
        while not self._stopping and self._sent < self.limit and time.monotonic() < deadline:
            self._sent += 1
            route = self.routes[turn % len(self.routes)]
            turn += 1
            await self.send(route, self._sent)
            await asyncio.sleep(self.pause)

    async def send(self, route: Route, n: int = 0) -> Sample:
        """Send one request of *route*, timed, and record it."""
        started = time.monotonic()
        try:
            response = await route.send(n)
        except httpx.TransportError as error:
            sample = Sample(
                route.name, started, time.monotonic() - started, None, error=repr(error)
            )
        else:
            sample = Sample(
                route.name,
                started,
                time.monotonic() - started,
                response.status_code,
                response.headers.get("Retry-After"),
                created=response.json()["id"]
                if route.creates and response.status_code == 201
                else None,
            )
        self.samples.append(sample)
        return sample

    @property
    def created(self) -> list[str]:
        """The tasks the load's 201s named."""
        return [sample.created for sample in self.samples if sample.created]

    def during(self, start: float, end: float, *routes: str) -> list[Sample]:
        """The samples of *routes* (all without) that were in flight at some
        moment between *start* and *end*."""
        return [
            sample
            for sample in self.samples
            if sample.started < end
            and sample.ended > start
            and (not routes or sample.route in routes)
        ]

    def after(self, moment: float, *routes: str) -> list[Sample]:
        """The samples of *routes* (all without) sent after *moment*."""
        return [
            sample
            for sample in self.samples
            if sample.started >= moment and (not routes or sample.route in routes)
        ]


def client(url: str, **options: Any) -> httpx.AsyncClient:
    """An HTTP client of a live server, as the fault tests' loads use it."""
    return httpx.AsyncClient(
        base_url=url,
        **{
            "timeout": REQUEST_TIMEOUT_SECONDS,
            "limits": httpx.Limits(max_connections=100, max_keepalive_connections=100),
            **options,
        },
    )


def task_routes(http: httpx.AsyncClient, user: TestUser, project_id: str, tag: str) -> list[Route]:
    """A write and two reads of the tasks table, as *user* on *http*'s server:
    a task created, the last one read (the cache may answer), a page listed."""
    seen: list[str] = []

    async def create(n: int) -> httpx.Response:
        response = await http.post(
            f"/projects/{project_id}/tasks", json={"title": f"{tag} {n}"}, headers=user.headers
        )
        if response.status_code == 201:
            seen.append(response.json()["id"])
        return response

    async def read(_n: int) -> httpx.Response:
        if not seen:
            return await http.get(f"/projects/{project_id}", headers=user.headers)
        return await http.get(f"/tasks/{seen[-1]}", headers=user.headers)

    async def page(_n: int) -> httpx.Response:
        return await http.get(f"/projects/{project_id}/tasks?limit=5", headers=user.headers)

    return [
        Route(f"POST /tasks ({tag})", create, creates=True),
        Route(f"GET /tasks/{{id}} ({tag})", read),
        Route(f"GET /tasks ({tag})", page),
    ]


def get_route(http: httpx.AsyncClient, path: str, user: TestUser | None = None) -> Route:
    headers = user.headers if user else {}

    async def send(_n: int) -> httpx.Response:
        return await http.get(path, headers=headers)

    return Route(f"GET {path.split('?')[0]}", send)


# Figures.


@dataclass(frozen=True)
class Figures:
    """What one fault test saw: requests served (2xx-3xx), errors by status,
    transport errors, latencies in seconds, writes lost or half-written, and
    the seconds from the end of the fault until everything worked again."""

    name: str
    backend: str
    served: int
    errors_by_status: dict[int, int]
    transport_errors: int
    p50: float
    p99: float
    max: float
    lost: int
    recovered_after: float | None
    note: str = ""

    def line(self) -> str:
        errors = ",".join(f"{s}:{n}" for s, n in sorted(self.errors_by_status.items())) or "-"
        recovered = "-" if self.recovered_after is None else f"{self.recovered_after:.2f}s"
        return (
            f"{self.name:<34} {self.backend:<10} {self.served:>6} {errors:<14} "
            f"{self.transport_errors:>5} {self.p50 * 1000:>7.0f} {self.p99 * 1000:>7.0f} "
            f"{self.max * 1000:>7.0f} {self.lost:>4} {recovered:>9}  {self.note}"
        )


FIGURES_HEADER = (
    f"{'fault':<34} {'backend':<10} {'served':>6} {'errors':<14} {'trans':>5} "
    f"{'p50 ms':>7} {'p99 ms':>7} {'max ms':>7} {'lost':>4} {'recovered':>9}  note"
)

# Every figure reported in this run, for the terminal summary.
FAULT_FIGURES: list[Figures] = []


def percentile(values: Sequence[float], fraction: float) -> float:
    """The nearest-rank percentile of *values* (0.0 when there are none)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def report_fault(
    name: str,
    samples: Sequence[Sample],
    *,
    lost: int,
    recovered_after: float | None,
    note: str = "",
) -> Figures:
    """Record and print the figures of a fault test's *samples* (the requests
    in flight during the fault); return them for the test's assertions."""
    seconds = [sample.seconds for sample in samples]
    figures = Figures(
        name=name,
        backend=BACKEND,
        served=sum(sample.ok for sample in samples),
        errors_by_status=dict(
            Counter(s.status for s in samples if s.status is not None and s.status >= 400)
        ),
        transport_errors=sum(sample.status is None for sample in samples),
        p50=percentile(seconds, 0.50),
        p99=percentile(seconds, 0.99),
        max=max(seconds, default=0.0),
        lost=lost,
        recovered_after=recovered_after,
        note=note,
    )
    FAULT_FIGURES.append(figures)
    print(f"\nfault figures: {FIGURES_HEADER}\nfault figures: {figures.line()}")
    if os.environ.get("TASKFLOW_TEST_FAULT_SAMPLES"):
        for sample in samples:
            print(f"fault sample: {sample}")
    return figures


def figures_table() -> list[str]:
    """The run's fault figures as lines of a table (none if no fault test ran)."""
    if not FAULT_FIGURES:
        return []
    legend = (
        "served: 2xx-3xx answers in flight during the fault; errors: 4xx-5xx by status; "
        "trans: no HTTP answer; latencies of those requests; lost: 201s without their row "
        "and event, or rows half-written; recovered: seconds from the fault's end until "
        "all was well again"
    )
    return [FIGURES_HEADER, *(figures.line() for figures in FAULT_FIGURES), legend]


def unexpected(samples: Sequence[Sample]) -> list[Sample]:
    """The samples that break the contract under any fault: a 5xx other than
    503, or a 503 without a positive ``Retry-After``."""
    return [
        sample
        for sample in samples
        if sample.status is not None
        and sample.status >= 500
        and not (
            sample.status == 503
            and sample.retry_after is not None
            and sample.retry_after.isdigit()
            and int(sample.retry_after) > 0
        )
    ]


async def recovery(
    check: Callable[[], Awaitable[bool]], since: float, within: float, every: float = 0.1
) -> float | None:
    """Seconds from *since* (the fault's end) until *check* first passes;
    None if it has not within *within* seconds of now."""
    deadline = time.monotonic() + within
    while True:
        if await check():
            return time.monotonic() - since
        if time.monotonic() > deadline:
            return None
        await asyncio.sleep(every)


# What the database holds.


@dataclass(frozen=True)
class Audit:
    """The writes of a test against what its 201s acknowledged."""

    lost: int  # acknowledged without its row and exactly one event; or half-written
    unacknowledged: int  # complete rows no 201 named (a response lost in transit)

    def note(self) -> str:
        return f"{self.unacknowledged} unacknowledged" if self.unacknowledged else ""


async def audit(
    database_url: str, project_ids: Collection[str], acknowledged: Collection[str]
) -> Audit:
    """Compare the tasks of *project_ids* and their ``task.created`` events in
    the database with the tasks whose creation was *acknowledged* (201)."""
    projects = [uuid.UUID(project_id) for project_id in project_ids]
    engine = create_async_engine(database_url)
    try:
        async with engine.connect() as connection:
            tasks = {
                str(task_id)
                for task_id in await connection.scalars(
                    select(Task.id).where(Task.project_id.in_(projects))
                )
            }
            events = Counter(
                str(data["id"])
                for data in await connection.scalars(
                    select(Event.data).where(
                        Event.project_id.in_(projects), Event.kind == "task.created"
                    )
                )
            )
    finally:
        await engine.dispose()
    acknowledged = set(acknowledged)
    half_written = {task for task in tasks | set(events) if task not in tasks or events[task] != 1}
    missing = acknowledged - tasks
    return Audit(
        lost=len(missing | half_written),
        unacknowledged=len(tasks - acknowledged - half_written),
    )


@contextlib.asynccontextmanager
async def table_locked(database_url: str, table: str) -> AsyncIterator[None]:
    """*table* held in ACCESS EXCLUSIVE mode by an admin session of its own
    (as a migration or someone at a psql prompt would) until the block ends."""
    url = make_url(database_url)
    connection = await asyncpg.connect(
        host=url.host,
        port=url.port or 5432,
        user=url.username,
        password=url.password,
        database=url.database,
    )
    try:
        transaction = connection.transaction()
        await transaction.start()
        await connection.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
        try:
            yield
        finally:
            await transaction.rollback()
    finally:
        await connection.close()


# Live events.


class Watcher:
    """A WebSocket subscriber to one project on one server, noting when the
    ``task.created`` event of each task arrives (``arrivals``: task id to
    monotonic time), and the close code if the server closed the socket. Use
    as ``async with Watcher(url, user, project_id):``."""

    def __init__(self, url: str, user: TestUser, project_id: str) -> None:
        self.url = url.replace("http://", "ws://") + "/ws"
        self.user, self.project_id = user, project_id
        self.arrivals: dict[str, float] = {}
        self.close_code: int | None = None
        self._socket: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._arrived = asyncio.Event()

    async def __aenter__(self) -> Watcher:
        self._socket = await websockets.connect(self.url, additional_headers=self.user.headers)
        assert json.loads(await asyncio.wait_for(self._socket.recv(), 5))["type"] == "ready"
        await self._socket.send(json.dumps({"type": "subscribe", "project_id": self.project_id}))
        while json.loads(await asyncio.wait_for(self._socket.recv(), 5))["type"] != "subscribed":
            pass
        self._reader = asyncio.create_task(self._read(self._socket))
        return self

    async def __aexit__(
        self,
        _type: type[BaseException] | None,
        _error: BaseException | None,
        _traceback: TracebackType | None,
    ) -> None:
        assert self._socket is not None and self._reader is not None
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)
        await self._socket.close()

    async def _read(self, socket: ClientConnection) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for frame in socket:
                message = json.loads(frame)
                if message.get("type") == "event" and message.get("event") == "task.created":
                    self.arrivals.setdefault(message["data"]["id"], time.monotonic())
                    self._arrived.set()
        self.close_code = socket.close_code

    async def wait_for(self, task_ids: Collection[str], timeout: float) -> set[str]:
        """Wait up to *timeout* seconds for the events of *task_ids*; return
        those still missing."""
        deadline = time.monotonic() + timeout
        while missing := set(task_ids) - self.arrivals.keys():
            left = deadline - time.monotonic()
            if left <= 0 or self.close_code is not None:
                return missing
            self._arrived.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._arrived.wait(), left)
        return set()


# A misbehaving backend, behind a proxy.


class Proxy:
    """A TCP proxy on loopback, in a thread with an event loop of its own (so
    that nothing the test does delays it), in front of ``127.0.0.1:target``.

    It forwards bytes both ways; ``silence()`` holds them instead (connections
    are still accepted, nothing is answered: a partition or a frozen host, and
    as after one the held bytes flow again on ``forward()``); ``delay(s)``
    forwards each chunk *s* seconds late (a slow link or an overloaded host).
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self._delay = 0.0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._flowing = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._listen(), self._loop).result(5)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shut(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()

    def forward(self) -> None:
        self._loop.call_soon_threadsafe(self._set, True, 0.0)

    def silence(self) -> None:
        self._loop.call_soon_threadsafe(self._set, False, 0.0)

    def delay(self, seconds: float) -> None:
        self._loop.call_soon_threadsafe(self._set, True, seconds)

    def _set(self, flowing: bool, delay: float) -> None:
        self._delay = delay
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _listen(self) -> None:
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _shut(self) -> None:
        assert self._server is not None
        self._server.close()
        for connection in self._connections:
            connection.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = asyncio.current_task()
        assert connection is not None
        self._connections.add(connection)
        try:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection(
                    "127.0.0.1", self.target
                )
            except OSError:
                return
            pipes = {
                asyncio.create_task(self._pipe(reader, upstream_writer)),
                asyncio.create_task(self._pipe(upstream_reader, writer)),
            }
            try:
                await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for pipe in pipes:
                    pipe.cancel()
                await asyncio.gather(*pipes, return_exceptions=True)
                upstream_writer.close()
        finally:
            writer.close()
            self._connections.discard(connection)

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy *reader* to *writer* in order, each chunk held while the proxy
        is silent and sent no earlier than the delay after it was read."""
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def send() -> None:
            while True:
                due, chunk = await chunks.get()
                if not chunk:
                    return
                await self._flowing.wait()
                await asyncio.sleep(due - time.monotonic())
                await self._flowing.wait()
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.create_task(send())
        try:
            while chunk := await reader.read(65536):
                chunks.put_nowait((time.monotonic() + self._delay, chunk))
            chunks.put_nowait((0.0, b""))
            await sender
        finally:
            sender.cancel()
            await asyncio.gather(sender, return_exceptions=True)


@contextlib.asynccontextmanager
async def proxy_to(target: int) -> AsyncIterator[Proxy]:
    proxy = Proxy(target)
    proxy.start()
    try:
        yield proxy
    finally:
        proxy.close()


# Processes.


def children_of(pid: int) -> list[int]:
    """The pids of the processes *pid* started (from /proc)."""
    return [
        int(child)
        for thread in Path(f"/proc/{pid}/task").iterdir()
        for child in (thread / "children").read_text().split()
    ]


def hypercorn_workers(master: int) -> list[int]:
    """The worker processes of the hypercorn master *master* (spawned by
    multiprocessing; its resource tracker is a child too, and is not one)."""
    return [
        pid
        for pid in children_of(master)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def connections_served(pid: int, port: int) -> int:
    """How many established TCP connections to local *port* the process
    *pid* holds (from /proc: its socket inodes against /proc/net/tcp)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    count = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "01" and int(local.rsplit(":", 1)[1], 16) == port and inode in inodes:
                count += 1
    return count
