"""WebSocket fan-out: many subscribers of one project, each write timed to every socket.

    python -m bench.fanout URL --token TOKEN --project ID --subscribers 1000 --writes 50 --rate 5

Opens the sockets (all with the one token), subscribes each to the project,
then creates --writes tasks through REST at --rate a second, one after the
other. A delivery's latency runs from the moment the write was sent to the
moment its task.created event reached that socket: it includes the write
itself (events mostly beat the write's own response, so that is no point to
start from), which is reported beside it. Prints JSON: deliveries, missing,
failed_subscribers, per_second (deliveries a second while writing), p50_ms,
p99_ms, and the writes' own write_p50_ms, write_p99_ms, write_errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from typing import Any, cast
from urllib.parse import urlsplit

import httpx
import orjson
import uvloop
from websockets.client import ClientProtocol
from websockets.extensions.permessage_deflate import enable_client_permessage_deflate
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.uri import parse_uri

from .stats import percentile

CONNECTING_AT_ONCE = 50
SUBSCRIBE_TIMEOUT_SECONDS = 30
DRAIN_SECONDS = 5.0
TITLE_PREFIX = "fanout "


class Deliveries:
    def __init__(self, expected: int) -> None:
        self.arrivals: list[tuple[int, float]] = []  # (write number, arrival time)
        self.expected = expected
        self.complete = asyncio.Event()

    def record(self, event: dict[str, Any], arrived: float) -> None:
        title = event["data"]["title"] if event["event"] == "task.created" else ""
        if title.startswith(TITLE_PREFIX):
            self.arrivals.append((int(title.removeprefix(TITLE_PREFIX)), arrived))
            if len(self.arrivals) >= self.expected:
                self.complete.set()


class Subscriber(asyncio.Protocol):
    """One socket on websockets' sans-I/O protocol, offering compression as a
    browser does. A frame is timed the moment its bytes arrive: with a
    thousand sockets, a full client's per-message machinery would add more
    to the tail than the server under test."""

    def __init__(self, url: str, token: str, project: str, deliveries: Deliveries) -> None:
        self.websocket = ClientProtocol(
            parse_uri(url.replace("http", "ws", 1) + "/ws"),
            extensions=enable_client_permessage_deflate(None),
        )
        self.token, self.project, self.deliveries = token, project, deliveries
        self.subscribed: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass
        request = self.websocket.connect()
        request.headers["Authorization"] = f"Bearer {self.token}"
        self.websocket.send_request(request)
        self.flush()

    def data_received(self, data: bytes) -> None:
        arrived = time.perf_counter()
        self.websocket.receive_data(data)
        for event in self.websocket.events_received():
            if isinstance(event, Frame) and event.opcode is Opcode.TEXT:
                self.on_message(orjson.loads(event.data), arrived)
        if self.websocket.handshake_exc is not None:
            self.fail(self.websocket.handshake_exc)
        self.flush()

    def on_message(self, message: dict[str, Any], arrived: float) -> None:
        if message["type"] == "ready":
            subscribe = {"type": "subscribe", "project_id": self.project}
            self.websocket.send_text(orjson.dumps(subscribe))
        elif message["type"] == "subscribed":
            self.subscribed.set_result(None)
        elif message["type"] == "event":
            self.deliveries.record(message, arrived)
        else:
            self.fail(RuntimeError(f"unexpected {message}"))

    def connection_lost(self, exc: Exception | None) -> None:
        closed = f"closed: {self.websocket.close_code} {self.websocket.close_reason}"
        self.fail(exc or ConnectionError(closed))

    def fail(self, error: BaseException) -> None:
        if not self.subscribed.done():
            self.subscribed.set_exception(error)

    def flush(self) -> None:
        assert self.transport is not None
        for data in self.websocket.data_to_send():
            if data:
                self.transport.write(data)
            else:  # the protocol's end of stream
                self.transport.close()

    def close(self) -> None:
        if self.websocket.state is State.OPEN:
            self.websocket.send_close()
            self.flush()
        if self.transport is not None:
            self.transport.close()


async def run(
    url: str, token: str, project: str, subscribers: int, writes: int, rate: float
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deliveries = Deliveries(subscribers * writes)
    connecting = asyncio.Semaphore(CONNECTING_AT_ONCE)
    sockets: list[Subscriber] = []

    async def subscribe() -> None:
        async with connecting:
            _, socket = await loop.create_connection(
                lambda: Subscriber(url, token, project, deliveries),
                urlsplit(url).hostname,
                urlsplit(url).port,
            )
            sockets.append(socket)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT_SECONDS):
                await socket.subscribed

    # A subscriber that fails is reported (it misses every event), not fatal.
    failures = [
        failure
        for failure in await asyncio.gather(
            *(subscribe() for _ in range(subscribers)), return_exceptions=True
        )
        if failure is not None
    ]
    if failures:
        print(f"{len(failures)} subscribers failed, the first: {failures[0]!r}", file=sys.stderr)
    sent: list[float] = []
    write_latencies: list[float] = []
    write_errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30) as http:
        start = time.perf_counter()  # not loop.time(): uvloop's is in whole milliseconds
        for n in range(writes):
            await asyncio.sleep(max(0.0, start + n / rate - time.perf_counter()))
            sent.append(time.perf_counter())
            response = await http.post(
                f"/projects/{project}/tasks", json={"title": f"{TITLE_PREFIX}{n}"}
            )
            write_latencies.append(time.perf_counter() - sent[n])
            write_errors += response.status_code != 201
    with contextlib.suppress(TimeoutError):  # whatever has not arrived by then is missing
        await asyncio.wait_for(deliveries.complete.wait(), DRAIN_SECONDS)
    for socket in sockets:
        socket.close()
    latencies = [arrived - sent[n] for n, arrived in deliveries.arrivals]
    last = max((arrived for _, arrived in deliveries.arrivals), default=start)
    return {
        "deliveries": len(latencies),
        "missing": subscribers * writes - len(latencies),
        "failed_subscribers": len(failures),
        "per_second": len(latencies) / max(last - start, 1e-9),
        "p50_ms": percentile(latencies, 0.50) * 1000,
        "p99_ms": percentile(latencies, 0.99) * 1000,
        "write_p50_ms": percentile(write_latencies, 0.50) * 1000,
        "write_p99_ms": percentile(write_latencies, 0.99) * 1000,
        "write_errors": write_errors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.fanout", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--project", required=True)
    parser.add_argument("--subscribers", type=int, required=True)
    parser.add_argument("--writes", type=int, required=True)
    parser.add_argument("--rate", type=float, required=True, help="writes per second")
    args = parser.parse_args()
    result = uvloop.run(
        run(args.url, args.token, args.project, args.subscribers, args.writes, args.rate)
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
