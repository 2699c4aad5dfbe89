"""wrk, closed loop, from its own process; its report parsed into a Result."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .processes import cpu_seconds_of, cpu_seconds_of_tree, output_of

HERE = Path(__file__).resolve().parent


@dataclass
class Result:
    name: str
    requests_per_second: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx responses, connections that failed or timed out
    shed: int = 0  # 503s a script counted apart: load refused on purpose
    postgres_us: float = float("nan")  # PostgreSQL's CPU per request, if it runs here
    redis_us: float = float("nan")  # Redis's, likewise
    bytes_per_response: float = float("nan")  # on the wire, headers included
    requests: int = 0
    server_us: float = float("nan")  # the serving processes' CPU per request, when given


async def wrk(
    name: str,
    url: str,
    seconds: int,
    connections: int,
    *,
    token: str | None = None,
    script: str | None = None,
    script_args: tuple[str, ...] = (),
    headers: tuple[str, ...] = (),
    server_pid: int | None = None,
) -> Result:
    """*script* names a Lua file in bench/ (wrk's -s); *script_args* go to its
    init(); *headers* (``"Name: value"``) go with every request; the CPU of
    the server whose master is *server_pid* is measured too."""
    command_line = ["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s",
                    "--latency"]  # fmt: skip
    if token is not None:
        command_line += ["-H", f"Authorization: Bearer {token}"]
    for header in headers:
        command_line += ["-H", header]
    if script is not None:
        command_line += ["-s", str(HERE / script)]
    command_line += [url, "--", *script_args]
    postgres_before, redis_before = cpu_seconds_of("postgres"), cpu_seconds_of("redis-server")
    server_before = cpu_seconds_of_tree(server_pid) if server_pid else float("nan")
    output = await output_of(*command_line)
    postgres_seconds = cpu_seconds_of("postgres") - postgres_before
    redis_seconds = cpu_seconds_of("redis-server") - redis_before
    server_seconds = cpu_seconds_of_tree(server_pid) - server_before if server_pid else -1

    def millis(label: str) -> float:
        match = re.search(rf"{label}\s+([\d.]+)(us|ms|s)", output)
        if match is None:
            return float("nan")
        value, unit = float(match[1]), match[2]
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", output)[1])  # type: ignore[index]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    # A script that sorts the statuses itself (login.lua) says which are errors.
    unexpected = re.search(r"Unexpected responses: (\d+)", output)
    shed = re.search(r"Shed responses: (\d+)", output)
    errors = (int(unexpected[1]) if unexpected else int(non_2xx[1]) if non_2xx else 0) + (
        sum(int(count) for count in socket_errors.groups()) if socket_errors else 0
    )
    if re.search(r"\n\s*0 requests in", output):
        errors += 1  # nothing answered in the whole run: that is a failure too
    requests = int(re.search(r"(\d+) requests in", output)[1])  # type: ignore[index]
    transfer = re.search(r"Transfer/sec:\s+([\d.]+)([KMG]?B)", output)
    transfer_per_second = (
        float(transfer[1]) * 1024 ** ("B", "KB", "MB", "GB").index(transfer[2])
        if transfer
        else float("nan")
    )

    def per_request_us(seconds: float) -> float:
        # A process that exits meanwhile takes its CPU time along: no figure then.
        return seconds / requests * 1e6 if requests and seconds >= 0 else float("nan")

    return Result(
        name, rps, millis("50%"), millis("99%"), errors, int(shed[1]) if shed else 0,
        per_request_us(postgres_seconds), per_request_us(redis_seconds),
        transfer_per_second / rps if rps else float("nan"), requests,
        per_request_us(server_seconds),
    )  # fmt: skip
