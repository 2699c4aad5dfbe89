"""What gzip costs a response, measured in this process: the µs to compress
one real body at a level and the bytes it comes to, as TaskFlow compresses
it (taskflow/compression.py)."""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from taskflow.compression import GZIP_WBITS

LEVELS = (1, 6, 9)
ROUNDS = 5


@dataclass
class GzipCost:
    level: int
    microseconds: float  # per body: the best round's mean, as timeit reports
    size: int  # bytes, gzip header and trailer included
    identity_size: int


def gzip_costs(body: bytes, iterations: int) -> list[GzipCost]:
    """Each level's cost on *body*: the best of five rounds of *iterations*
    compressions (the lowest is the one least disturbed by other processes)."""
    costs = []
    for level in LEVELS:
        best = float("inf")
        for _ in range(ROUNDS):
            started = time.perf_counter()
            for _ in range(iterations):
                zlib.compress(body, level, wbits=GZIP_WBITS)
            best = min(best, (time.perf_counter() - started) / iterations)
        size = len(zlib.compress(body, level, wbits=GZIP_WBITS))
        costs.append(GzipCost(level, best * 1e6, size, len(body)))
    return costs
