"""Idempotency keys across real processes: one key raced by 20 requests
through two instances, and a server killed between a request and its retry."""

from __future__ import annotations

import asyncio
import os
import signal
from collections import Counter

import httpx

from .support import hypercorn, register_user

RACERS = 20


async def test_one_key_raced_through_two_instances_writes_once(environ: dict[str, str]) -> None:
    async with hypercorn(environ) as (url_a, _), hypercorn(environ) as (url_b, _):
        async with (
            httpx.AsyncClient(base_url=url_a, timeout=30) as a,
            httpx.AsyncClient(base_url=url_b, timeout=30) as b,
        ):
            user = await register_user(a)
            project = (
                await a.post("/projects", json={"name": "Race"}, headers=user.headers)
            ).json()
            tasks = f"/projects/{project['id']}/tasks"
            headers = {**user.headers, "Idempotency-Key": "raced"}
            body = {"title": "Exactly once"}
            # Warm connections, so that the racers leave together.
            await asyncio.gather(*(c.get("/healthz") for c in (a, b) for _ in range(RACERS // 2)))
            answers = await asyncio.gather(
                *(
                    (a if n % 2 else b).post(tasks, json=body, headers=headers)
                    for n in range(RACERS)
                )
            )
            listed = (await a.get(tasks, headers=user.headers)).json()["items"]
            events = (await b.get(f"/projects/{project['id']}/events", headers=user.headers)).json()

    kinds = Counter(
        (answer.status_code, answer.headers.get("Idempotent-Replayed")) for answer in answers
    )
    print(f"\n{RACERS} requests with one key through two instances: {dict(kinds)}")
    assert set(kinds) <= {(201, None), (201, "true"), (409, None)}, kinds
    assert kinds[(201, None)] == 1  # one ran; every other was its replay or a 409
    first = next(
        a for a in answers if a.status_code == 201 and "Idempotent-Replayed" not in a.headers
    )
    for answer in answers:
        if answer.status_code == 201:
            assert answer.content == first.content
            assert answer.headers["Location"] == first.headers["Location"]
        else:
            assert answer.headers["Retry-After"] == "1"
            assert answer.json()["code"] == "conflict"
    assert [task["id"] for task in listed] == [first.json()["id"]]
    assert [e["event"] for e in events["items"]].count("task.created") == 1


async def test_a_retry_after_the_server_was_killed_gets_the_kept_response(
    environ: dict[str, str],
) -> None:
    async with hypercorn(environ, empty_database=False) as (url, process):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            user = await register_user(http)
            project = (
                await http.post("/projects", json={"name": "Crash"}, headers=user.headers)
            ).json()
            tasks = f"/projects/{project['id']}/tasks"
            headers = {**user.headers, "Idempotency-Key": "before-the-crash"}
            first = await http.post(tasks, json={"title": "Once"}, headers=headers)
        assert first.status_code == 201
        os.killpg(process.pid, signal.SIGKILL)  # no shutdown of any kind
        await asyncio.wait_for(process.wait(), 10)

    async with hypercorn(environ) as (url, _):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            retried = await http.post(tasks, json={"title": "Once"}, headers=headers)
            listed = (await http.get(tasks, headers=user.headers)).json()["items"]

    assert retried.status_code == 201
    assert retried.headers["Idempotent-Replayed"] == "true"
    assert retried.content == first.content
    assert (retried.headers["Location"], retried.headers["ETag"]) == (
        first.headers["Location"],
        first.headers["ETag"],
    )
    assert [task["id"] for task in listed] == [first.json()["id"]]
