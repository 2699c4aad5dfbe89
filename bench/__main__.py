"""Benchmark TaskFlow against a framework-free reference doing the same work.

    python -m bench                  # every part: 1,000 users, 2,000 projects, 200,000 tasks,
                                     # then the 10,000 / 1,000,000-task list latency ratio
    python -m bench --only fanout    # one part (http, compression, fanout or scale); repeatable
    python -m bench --smoke          # every part tiny, 1 s a load run: CI's check

It creates a fresh database, seeds it with COPY, starts TaskFlow the way the
Procfile does (hypercorn, uvloop, one worker per core) and the reference
beside it on hypercorn, uvicorn and granian, and drives them from separate
processes: wrk, an open-loop client (bench/arrival.py) and WebSocket
subscribers (bench/fanout.py); what gzip costs a task page is also timed in
this process (bench/gzip_cost.py). It prints Markdown tables: the
measurements, gzip's cost per level, then the targets with whether each is
met. It exits non-zero if any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

import httpx

from taskflow.compression import GZIP_LEVEL
from taskflow.config import normalize_database_url
from taskflow.tokens import ISSUER, LEEWAY_SECONDS, REQUIRED_CLAIMS, TokenType

from .gzip_cost import GzipCost, gzip_costs
from .processes import ASGI_SERVERS, cpu_seconds_of_tree, python_module, serve, server
from .seed import PASSWORD, Seeded, fresh_database, seed
from .wrk import Result, wrk

PARTS = ("http", "compression", "fanout", "scale")
UNLIMITED = "1000000000"
CORES = os.cpu_count() or 1
LOGIN_CONNECTIONS = 2 * CORES  # enough to keep every core's bcrypt busy
LOGIN_SECONDS = 3  # at least: a login takes most of a second on a busy core
FLOOD_CONNECTIONS = 8 * CORES  # logins arrive faster than bcrypt can serve them
ARRIVAL_SHARE = 0.7  # of TaskFlow's own maximum list throughput
FANOUT_WRITES_PER_SECOND = 5
RATIO_CONNECTIONS = 4
RATIO_LIST_SHARE = 0.01  # of the tasks, in the listed project, so both sizes fill a page
GZIP_CPU_GROWTH = 1.05  # at most, TaskFlow's CPU for a list request with gzip over without


@dataclass
class Scale:
    users: int
    projects: int
    tasks: int
    seconds: int
    connections: int
    subscribers: int
    ratio_tasks: tuple[int, int]
    gzip_iterations: int
    rounds: int  # of the http part's interleaved runs, the best kept


@dataclass
class Target:
    name: str
    measured: str
    met: bool


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    cache_gains: list[str] = field(default_factory=list)
    ceilings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    gzip_costs: list[GzipCost] = field(default_factory=list)
    gzip_note: str = ""


def taskflow_env(dsn: str) -> dict[str, str]:
    return {
        "DATABASE_URL": dsn,
        "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        "TASKFLOW_SECRET_KEY": "bench-" + "s" * 40,
        "TASKFLOW_RATE_LIMIT_PER_MINUTE": UNLIMITED,
        "TASKFLOW_AUTH_RATE_LIMIT_PER_MINUTE": UNLIMITED,
        "TASKFLOW_WS_CONNECTIONS_PER_MINUTE": UNLIMITED,
        "TASKFLOW_WS_SOCKETS_PER_USER": UNLIMITED,
        "TASKFLOW_LOG_LEVEL": "WARNING",
        "BENCH_DSN": dsn,
        # For bench/reference.py, which checks a token as TaskFlow does.
        "BENCH_ACCESS_TOKEN_RULES": json.dumps(
            {
                "issuer": ISSUER,
                "audience": TokenType.ACCESS.audience,
                "type": TokenType.ACCESS,
                "leeway": LEEWAY_SECONDS,
                "required_claims": REQUIRED_CLAIMS,
            }
        ),
    }


async def seeded_database(
    admin: str, scale: Scale, tasks: int, list_share: float | None = None
) -> Seeded:
    name = os.environ.get("BENCH_DATABASE_NAME", "taskflow_bench")
    dsn = await fresh_database(admin, name)
    started = time.monotonic()
    seeded = await seed(dsn, scale.users, scale.projects, tasks, list_share)
    print(f"bench: seeded {tasks:,} tasks in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return seeded


async def log_in(url: str, email: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        response = await http.post("/auth/login", json={"email": email, "password": PASSWORD})
        response.raise_for_status()
        token: str = response.json()["access_token"]
        return token


async def new_api_token(url: str, login_token: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=60) as http:
        response = await http.post(
            "/auth/tokens",
            json={"name": "bench", "scope": "read"},
            headers={"Authorization": f"Bearer {login_token}"},
        )
        response.raise_for_status()
        token: str = response.json()["token"]
        return token


def list_page(url: str, project: object) -> str:
    return f"{url}/projects/{project}/tasks?status=pending,in_progress&limit=50"


async def http_part(seeded: Seeded, scale: Scale, report: Report) -> None:
    """List and get, each with and without the cache and beside the reference
    on every ASGI server; list at a fixed arrival rate; create; login; list
    under a login flood."""
    env = taskflow_env(seeded.dsn)
    closed_loop = (scale.seconds, scale.connections)
    async with AsyncExitStack() as stack:
        served = await serving(
            stack,
            ("wsgi:app", env, "hypercorn"),
            ("wsgi:app", {**env, "TASKFLOW_CACHE_ENABLED": "false"}, "hypercorn"),
            *(("bench.reference:app", env, asgi_server) for asgi_server in ASGI_SERVERS),
        )
        pids = dict(served)  # each server's master, by its base URL
        taskflow, uncached, *references = [url for url, _pid in served]
        token = await log_in(taskflow, seeded.email)
        api_token = await new_api_token(taskflow, token)
        page = list_page(taskflow, seeded.list_project)
        async with httpx.AsyncClient(timeout=60) as http:
            first = await http.get(page, headers={"Authorization": f"Bearer {token}"})
            task_id = first.json()["items"][0]["id"]
        lists = {
            "list tasks (TaskFlow)": page,
            "list tasks, API token (TaskFlow)": page,
            "list tasks, no cache (TaskFlow)": list_page(uncached, seeded.list_project),
        }
        gets = {
            "get task (TaskFlow)": f"{taskflow}/tasks/{task_id}",
            "get task, no cache (TaskFlow)": f"{uncached}/tasks/{task_id}",
        }
        for asgi_server, reference in zip(ASGI_SERVERS, references, strict=True):
            lists[f"list tasks (reference, {asgi_server})"] = list_page(
                reference, seeded.list_project
            )
            gets[f"get task (reference, {asgi_server})"] = f"{reference}/tasks/{task_id}"
        runs = []
        for _ in range(scale.rounds):  # interleaved, so all see the same machine; the best kept
            for name, url in {**lists, **gets}.items():
                bearer = api_token if "API token" in name else token
                pid = next(pid for base, pid in pids.items() if url.startswith(base))
                runs.append(await wrk(name, url, *closed_loop, token=bearer, server_pid=pid))
        best = fastest(runs)
        report.results += best.values()
        alone = best["list tasks (TaskFlow)"]
        for route in ("list tasks", "get task"):
            against_ceiling(route, best, report)
        by_api_token = best["list tasks, API token (TaskFlow)"].requests_per_second
        token_ratio = by_api_token / alone.requests_per_second
        report.targets.append(
            Target(
                "list tasks req/s, API token / login token ≥ 0.95 (no slower)",
                f"{token_ratio:.2f}",
                token_ratio >= 0.95,
            )
        )
        for route in ("list tasks", "get task"):
            with_cache = best[f"{route} (TaskFlow)"].requests_per_second
            gain = with_cache / best[f"{route}, no cache (TaskFlow)"].requests_per_second
            report.cache_gains.append(f"{route}: {gain:.2f}x the req/s without the cache")
        await list_at_fixed_arrival_rate(page, token, scale, alone, pids[taskflow], report)
        # Logins last: the server goes on hashing the passwords of requests
        # still in flight when wrk stops.
        report.results += [
            await wrk("create task (TaskFlow)", f"{taskflow}/projects/{seeded.write_project}/tasks",
                      *closed_loop, token=token, script="create_task.lua"),
            await wrk(f"login, {LOGIN_CONNECTIONS} connections (TaskFlow)",
                      f"{taskflow}/auth/login", max(scale.seconds, LOGIN_SECONDS),
                      LOGIN_CONNECTIONS, script="login.lua", script_args=(seeded.email, PASSWORD)),
        ]  # fmt: skip
        await list_under_login_flood(taskflow, seeded, token, scale, alone, report)


async def serving(
    stack: AsyncExitStack, *servers: tuple[str, dict[str, str], str]
) -> list[tuple[str, int]]:
    """Each (app, environment, ASGI server) served with one worker per core,
    started side by side (each takes seconds to import its app), stopped when
    *stack* closes; their base URLs and masters' pids in the same order."""
    async with asyncio.TaskGroup() as group:
        started = [
            group.create_task(stack.enter_async_context(server(app, env, CORES, asgi_server)))
            for app, env, asgi_server in servers
        ]
    return [task.result() for task in started]


def against_ceiling(route: str, best: dict[str, Result], report: Report) -> None:
    """TaskFlow's req/s on *route* over each reference server's; the target is
    against the fastest of them."""
    taskflow = best[f"{route} (TaskFlow)"].requests_per_second
    ceilings = {
        asgi_server: best[f"{route} (reference, {asgi_server})"].requests_per_second
        for asgi_server in ASGI_SERVERS
    }
    report.ceilings.append(
        f"{route}: "
        + ", ".join(f"{taskflow / rps:.2f}x on {server}" for server, rps in ceilings.items())
    )
    fastest_server = max(ceilings, key=ceilings.__getitem__)
    ratio = taskflow / ceilings[fastest_server]
    report.targets.append(
        Target(f"{route} req/s, TaskFlow / the fastest reference ({fastest_server}) ≥ 0.5",
               f"{ratio:.2f}", ratio >= 0.5)
    )  # fmt: skip


def fastest(runs: list[Result]) -> dict[str, Result]:
    """Each measurement's best run."""
    best: dict[str, Result] = {}
    for run in runs:
        if run.name not in best or run.requests_per_second > best[run.name].requests_per_second:
            best[run.name] = run
    return best


async def list_under_login_flood(
    taskflow: str, seeded: Seeded, token: str, scale: Scale, alone: Result, report: Report
) -> None:
    async def list_once_flooded() -> Result:
        await asyncio.sleep(1)  # let the flood build up first
        return await wrk("list tasks, under a login flood (TaskFlow)",
                         list_page(taskflow, seeded.list_project), scale.seconds,
                         scale.connections, token=token)  # fmt: skip

    async with asyncio.TaskGroup() as group:
        flood = group.create_task(
            wrk(f"login flood, {FLOOD_CONNECTIONS} connections (TaskFlow)",
                f"{taskflow}/auth/login", scale.seconds + 2, FLOOD_CONNECTIONS,
                script="login.lua", script_args=(seeded.email, PASSWORD))
        )  # fmt: skip
        flooded = group.create_task(list_once_flooded())
    report.results += [flooded.result(), flood.result()]
    growth = flooded.result().p99_ms / alone.p99_ms
    report.targets.append(
        Target("list p99 under a login flood ≤ 2x alone",
               f"{growth:.2f}x ({alone.p99_ms:.1f} → {flooded.result().p99_ms:.1f} ms)",
               growth <= 2)
    )  # fmt: skip


async def list_at_fixed_arrival_rate(
    page: str, token: str, scale: Scale, alone: Result, pid: int, report: Report
) -> None:
    """The list at 70 % of its best req/s, open loop; and TaskFlow's CPU a
    request there beside the closed-loop run's."""
    rate = ARRIVAL_SHARE * alone.requests_per_second
    cpu_before = cpu_seconds_of_tree(pid)
    arrival = json.loads(
        await python_module("bench.arrival", page, "--token", token, "--rate", f"{rate:.1f}",
                            "--seconds", str(scale.seconds))
    )  # fmt: skip
    cpu_us = (cpu_seconds_of_tree(pid) - cpu_before) / max(arrival["sent"], 1) * 1e6
    report.results.append(
        Result(f"list tasks, fixed arrival rate {rate:,.0f}/s (TaskFlow)",
               arrival["sent"] / scale.seconds, arrival["p50_ms"], arrival["p99_ms"],
               arrival["errors"], requests=arrival["sent"], server_us=cpu_us)
    )  # fmt: skip
    report.notes.append(
        f"TaskFlow's CPU a list request: {alone.server_us:,.0f} µs closed loop, {cpu_us:,.0f} µs "
        f"at the fixed arrival rate ({cpu_us / alone.server_us:.2f}x)"
    )
    report.targets.append(
        Target(
            f"list p99 at a fixed arrival rate ({ARRIVAL_SHARE:.0%} of max) ≤ 50 ms, no errors",
            f"{arrival['p99_ms']:.1f} ms, {arrival['errors']} errors",
            arrival["p99_ms"] <= 50 and arrival["errors"] == 0,
        )
    )


async def compression_part(seeded: Seeded, scale: Scale, report: Report) -> None:
    """What gzip costs a task page: in this process, at each level, on the
    list's real body; then the list's req/s asking for gzip beside not, and
    the CPU its workers spent a request (steadier than req/s when other work
    shares the machine)."""
    async with server("wsgi:app", taskflow_env(seeded.dsn), CORES) as (taskflow, pid):
        token = await log_in(taskflow, seeded.email)
        page = list_page(taskflow, seeded.list_project)
        bodies = {}
        async with httpx.AsyncClient(timeout=60) as http:
            for coding in ("identity", "gzip"):
                headers = {"Authorization": f"Bearer {token}", "Accept-Encoding": coding}
                answer = await http.get(page, headers=headers)
                if answer.headers.get("Content-Encoding", "identity") != coding:
                    raise RuntimeError(f"bench: the list page did not come {coding}")
                bodies[coding] = answer.content
        # Before any load, while the machine is otherwise idle.
        report.gzip_costs = gzip_costs(bodies["identity"], scale.gzip_iterations)
        runs = []
        cpu_seconds = {"identity": 0.0, "gzip": 0.0}  # TaskFlow's, both rounds
        requests = {"identity": 0, "gzip": 0}
        for _ in range(2):  # interleaved, the best kept, as in the http part
            for coding in ("identity", "gzip"):
                before = cpu_seconds_of_tree(pid)
                run = await wrk(f"list tasks, {coding} (TaskFlow)", page, scale.seconds,
                                scale.connections, token=token,
                                headers=(f"Accept-Encoding: {coding}",))  # fmt: skip
                cpu_seconds[coding] += cpu_seconds_of_tree(pid) - before
                requests[coding] += run.requests
                runs.append(run)
    cpu_us = {coding: cpu_seconds[coding] / requests[coding] * 1e6 for coding in requests}
    best = fastest(runs)
    identity = best["list tasks, identity (TaskFlow)"]
    compressed = best["list tasks, gzip (TaskFlow)"]
    report.results += [identity, compressed]
    ratio = compressed.requests_per_second / identity.requests_per_second
    tasks = len(json.loads(bodies["identity"])["items"])
    report.gzip_note = (
        f"The page: {tasks} tasks, {len(bodies['identity']):,} bytes of JSON. "
        f"gzip level {GZIP_LEVEL} on the list: {ratio:.2f}x the req/s of identity, "
        f"{cpu_us['gzip']:,.0f} µs of TaskFlow's CPU a request against "
        f"{cpu_us['identity']:,.0f}; "
        f"~{compressed.bytes_per_response:,.0f} bytes a response on the wire against "
        f"~{identity.bytes_per_response:,.0f} (headers included)"
    )
    growth = cpu_us["gzip"] / cpu_us["identity"]
    report.targets.append(
        Target(f"TaskFlow's CPU a list request, gzip (level {GZIP_LEVEL}) / identity"
               f" ≤ {GZIP_CPU_GROWTH}", f"{growth:.2f}", growth <= GZIP_CPU_GROWTH)
    )  # fmt: skip


async def fanout_part(seeded: Seeded, scale: Scale, report: Report) -> None:
    """Task writes through REST, each delivered to every subscriber on one worker."""
    async with serve("wsgi:app", taskflow_env(seeded.dsn), workers=1) as taskflow:
        token = await log_in(taskflow, seeded.email)
        fanout = json.loads(
            await python_module("bench.fanout", taskflow, "--token", token,
                                "--project", str(seeded.write_project),
                                "--subscribers", str(scale.subscribers),
                                "--writes", str(FANOUT_WRITES_PER_SECOND * scale.seconds),
                                "--rate", str(FANOUT_WRITES_PER_SECOND))
        )  # fmt: skip
    report.results += [
        Result(f"WebSocket fan-out to {scale.subscribers:,} subscribers, 1 worker (deliveries)",
               fanout["per_second"], fanout["p50_ms"], fanout["p99_ms"], fanout["missing"]),
        Result(f"create task, {FANOUT_WRITES_PER_SECOND}/s, during the fan-out (TaskFlow)",
               FANOUT_WRITES_PER_SECOND, fanout["write_p50_ms"], fanout["write_p99_ms"],
               fanout["write_errors"]),
    ]  # fmt: skip
    report.targets.append(
        Target(
            f"WebSocket fan-out p99, {scale.subscribers:,} subscribers on one worker ≤ 50 ms",
            f"{fanout['p99_ms']:.1f} ms, {fanout['missing']} missing"
            f" ({fanout['failed_subscribers']} subscribers failed)",
            fanout["p99_ms"] <= 50 and fanout["missing"] == 0,
        )
    )


async def scale_part(admin: str, scale: Scale, report: Report) -> None:
    """List latency on a small and a large dataset, a fresh database each."""
    runs = []
    for tasks in scale.ratio_tasks:
        seeded = await seeded_database(admin, scale, tasks, RATIO_LIST_SHARE)
        async with serve("wsgi:app", taskflow_env(seeded.dsn), CORES) as taskflow:
            token = await log_in(taskflow, seeded.email)
            page = list_page(taskflow, seeded.list_project)
            await wrk("warm-up", page, 1, RATIO_CONNECTIONS, token=token)
            name = f"list tasks, {tasks:,} tasks, {RATIO_CONNECTIONS} connections (TaskFlow)"
            runs.append(await wrk(name, page, scale.seconds, RATIO_CONNECTIONS, token=token))
    report.results += runs
    small, large = runs
    small_tasks, large_tasks = scale.ratio_tasks
    for name, ratio in (("p50", large.p50_ms / small.p50_ms), ("p99", large.p99_ms / small.p99_ms)):
        report.targets.append(
            Target(f"list {name}, {large_tasks:,} / {small_tasks:,} tasks ≤ 1.3", f"{ratio:.2f}",
                   ratio <= 1.3)
        )  # fmt: skip


def print_tables(report: Report) -> None:
    print(
        "| measurement | req/s | p50 ms | p99 ms | errors | shed (503) "
        "| server µs/req | PostgreSQL µs/req | Redis µs/req |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for result in report.results:
        print(f"| {result.name} | {result.requests_per_second:,.0f} | {result.p50_ms:.1f} "
              f"| {result.p99_ms:.1f} | {result.errors} | {result.shed} "
              f"| {result.server_us:,.0f} | {result.postgres_us:,.0f} "
              f"| {result.redis_us:,.0f} |")  # fmt: skip
    if report.ceilings:
        print("\nTaskFlow against the reference: " + "; ".join(report.ceilings) + ".")
    for note in report.notes:
        print(f"\n{note}.")
    if report.cache_gains:
        print("\nThe cache: " + "; ".join(report.cache_gains) + ".")
    if report.gzip_costs:
        print("\n| gzip level | µs per page | bytes | of identity |")
        print("| --- | ---: | ---: | ---: |")
        for cost in report.gzip_costs:
            chosen = " (TaskFlow's)" if cost.level == GZIP_LEVEL else ""
            print(f"| {cost.level}{chosen} | {cost.microseconds:,.0f} | {cost.size:,} "
                  f"| {cost.size / cost.identity_size:.1%} |")  # fmt: skip
        print(f"\n{report.gzip_note}.")
    print("\n| target | measured | met |")
    print("| --- | --- | --- |")
    for target in report.targets:
        print(f"| {target.name} | {target.measured} | {'yes' if target.met else '**no**'} |")


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    parser.add_argument("--tasks", type=int, default=200_000)
    parser.add_argument("--seconds", type=int, default=10, help="of each load run")
    parser.add_argument("--only", action="append", choices=PARTS, help="run only this part")
    parser.add_argument("--smoke", action="store_true", help="tiny and quick: CI's check")
    args = parser.parse_args()
    scale = (
        Scale(users=10, projects=20, tasks=500, seconds=1, connections=4, subscribers=20,
              ratio_tasks=(1_000, 2_000), gzip_iterations=20, rounds=1)
        if args.smoke
        else Scale(users=1_000, projects=2_000, tasks=args.tasks, seconds=args.seconds,
                   connections=50, subscribers=1_000, ratio_tasks=(10_000, 1_000_000),
                   gzip_iterations=2_000, rounds=2)
    )  # fmt: skip
    parts = args.only or PARTS
    if shutil.which("wrk") is None:
        sys.exit("bench: needs wrk (apt-get install wrk)")

    admin = normalize_database_url(
        os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    ).replace("postgresql+asyncpg://", "postgresql://")
    report = Report()
    if {"http", "compression", "fanout"} & set(parts):
        seeded = await seeded_database(admin, scale, scale.tasks)
        if "http" in parts:
            print("bench: list, get, fixed arrival, create, login, login flood", file=sys.stderr)
            await http_part(seeded, scale, report)
        if "compression" in parts:
            print("bench: gzip in process, list with and without gzip", file=sys.stderr)
            await compression_part(seeded, scale, report)
        if "fanout" in parts:
            print("bench: WebSocket fan-out", file=sys.stderr)
            await fanout_part(seeded, scale, report)
    if "scale" in parts:
        await scale_part(admin, scale, report)
    print_tables(report)
    if any(result.errors for result in report.results):
        sys.exit("bench: some requests failed")


if __name__ == "__main__":
    asyncio.run(main())
