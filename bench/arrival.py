"""Open-loop load: GET one URL at a fixed arrival rate.

    python -m bench.arrival URL --token TOKEN --rate 300 --seconds 10

Request n is due at start + n / rate whether or not earlier ones have
answered, and its latency runs from that due time, so a server that stalls
is charged for every request it held up (no coordinated omission). Requests
go over raw keep-alive HTTP/1.1 connections, a new one whenever none is
idle (at most 64), so the client spends little CPU; idle ones are reused
oldest first, which spreads the load over all of them (and so over the
server's workers) and never leaves one idle past the server's keep-alive
timeout. Prints JSON: sent,
p50_ms, p99_ms, errors (non-2xx answers and failed requests), connections
(how many it opened).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import time
from collections import deque
from urllib.parse import urlsplit

import uvloop

from .stats import percentile

MAX_CONNECTIONS = 64  # beyond that, requests wait their turn (and that wait counts)
TIMEOUT_SECONDS = 10
CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)", re.IGNORECASE)

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class Client:
    def __init__(self, url: str, token: str) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        self.request = (
            f"GET {target} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
        self.idle: deque[Connection] = deque()
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.latencies: list[float] = []
        self.errors = 0
        self.connections = 0

    async def send(self, due: float) -> None:
        async with self.slots:
            connection = self.idle.popleft() if self.idle else None
            try:
                async with asyncio.timeout(TIMEOUT_SECONDS):
                    if connection is None:
                        connection = await asyncio.open_connection(self.host, self.port)
                        self.connections += 1
                    status = await self._exchange(connection)
            except (OSError, TimeoutError, asyncio.IncompleteReadError, ValueError):
                if connection is not None:
                    connection[1].close()
                self.errors += 1
                return
            self.idle.append(connection)
        if 200 <= status < 300:
            self.latencies.append(time.perf_counter() - due)
        else:
            self.errors += 1

    async def _exchange(self, connection: Connection) -> int:
        reader, writer = connection
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        length = CONTENT_LENGTH.search(head)
        if length is None:
            raise ValueError("a response without Content-Length")
        await reader.readexactly(int(length[1]))
        return int(head.split(b" ", 2)[1])

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def run(url: str, token: str, rate: float, seconds: float) -> dict[str, float]:
    client = Client(url, token)
    start = time.perf_counter()  # not loop.time(): uvloop's is in whole milliseconds
    sends = []
    for n in range(round(rate * seconds)):
        due = start + n / rate
        await asyncio.sleep(max(0.0, due - time.perf_counter()))
        sends.append(asyncio.create_task(client.send(due)))
    await asyncio.gather(*sends)
    client.close()
    return {
        "sent": len(sends),
        "p50_ms": percentile(client.latencies, 0.50) * 1000,
        "p99_ms": percentile(client.latencies, 0.99) * 1000,
        "errors": client.errors,
        "connections": client.connections,
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.arrival", description=__doc__)
    parser.add_argument("url")
    parser.add_argument("--token", required=True)
    parser.add_argument("--rate", type=float, required=True, help="requests per second")
    parser.add_argument("--seconds", type=float, required=True)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args.url, args.token, args.rate, args.seconds))))


if __name__ == "__main__":
    main()
