"""Webhook deliveries from real server processes to local receivers
(``TASKFLOW_WEBHOOK_ALLOW_PRIVATE`` on, so that 127.0.0.1 may receive):
signatures checked with the tests' own few lines, order held through
failures, retries on the schedule, 410, replay, rotation, two instances at
once, a process killed mid-delivery, and the SSRF rule at delivery time.

Later steps of the retry schedule are reached by moving a webhook's
`next_attempt_at` (and its count of attempts) in the database, as the clock
would; a lease runs out the same way."""

from __future__ import annotations

import asyncio
import os
import signal
import ssl
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from taskflow.config import Config
from taskflow.data.webhooks import Claim
from taskflow.db import create_engine
from taskflow.delivery import LEASE, RETRY_SCHEDULE, judge, parse_retry_after, retry_delay
from taskflow.models import Webhook

from .receivers import Received, Receiver, Reply, verify
from .support import TestUser, hypercorn, postgres_only, register_user


@pytest.fixture
def environ(environ: dict[str, str]) -> dict[str, str]:
    return {**environ, "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "true"}


# The API, through a live server.


class Api:
    """A user with a project on a live server, and what the tests do there."""

    def __init__(self, http: httpx.AsyncClient, user: TestUser, project_id: str) -> None:
        self.http = http
        self.user = user
        self.project_id = project_id

    @classmethod
    async def open(cls, http: httpx.AsyncClient) -> Api:
        user = await register_user(http)
        response = await http.post("/projects", json={"name": "Hooked"}, headers=user.headers)
        assert response.status_code == 201, response.text
        return cls(http, user, response.json()["id"])

    def on(self, http: httpx.AsyncClient) -> Api:
        """The same user and project, through another instance."""
        return Api(http, self.user, self.project_id)

    @property
    def hooks(self) -> str:
        return f"/projects/{self.project_id}/webhooks"

    async def register(self, url: str, **fields: Any) -> dict[str, Any]:
        response = await self.http.post(
            self.hooks, json={"url": url, **fields}, headers=self.user.headers
        )
        assert response.status_code == 201, response.text
        webhook: dict[str, Any] = response.json()
        return webhook

    async def task(self, title: str = "A task") -> int:
        """Create a task; the id of its event."""
        response = await self.http.post(
            f"/projects/{self.project_id}/tasks", json={"title": title}, headers=self.user.headers
        )
        assert response.status_code == 201, response.text
        return (await self.events())[-1]["id"]

    async def events(self) -> list[dict[str, Any]]:
        response = await self.http.get(
            f"/projects/{self.project_id}/events",
            params={"limit": "1000"},
            headers=self.user.headers,
        )
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def deliveries(self, webhook: dict[str, Any]) -> list[dict[str, Any]]:
        response = await self.http.get(
            f"{self.hooks}/{webhook['id']}/deliveries", headers=self.user.headers
        )
        assert response.status_code == 200, response.text
        items: list[dict[str, Any]] = response.json()["items"]
        return items

    async def webhook(self, webhook: dict[str, Any]) -> dict[str, Any]:
        items = (await self.http.get(self.hooks, headers=self.user.headers)).json()["items"]
        return next(item for item in items if item["id"] == webhook["id"])

    async def post(self, path: str, body: Any = None) -> httpx.Response:
        return await self.http.post(f"{self.hooks}/{path}", json=body, headers=self.user.headers)

    async def patch(self, webhook: dict[str, Any], body: Any) -> httpx.Response:
        return await self.http.patch(
            f"{self.hooks}/{webhook['id']}", json=body, headers=self.user.headers
        )


@asynccontextmanager
async def served(environ: dict[str, str], **options: Any) -> AsyncIterator[Api]:
    """A live instance, a user and a project on it."""
    async with hypercorn(environ, **options) as (url, _process):
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            yield await Api.open(http)


# The database, as the clock would move it.


@asynccontextmanager
async def database(environ: dict[str, str]) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(Config.from_env(environ))
    try:
        yield engine
    finally:
        await engine.dispose()


async def row_of(environ: dict[str, str], webhook: dict[str, Any]) -> Any:
    async with database(environ) as engine, engine.connect() as connection:
        query = select(Webhook).where(Webhook.id == uuid.UUID(webhook["id"]))
        return (await connection.execute(query)).one()


async def move(environ: dict[str, str], webhook: dict[str, Any], **values: Any) -> None:
    async with database(environ) as engine, engine.begin() as connection:
        await connection.execute(
            update(Webhook).where(Webhook.id == uuid.UUID(webhook["id"])).values(**values)
        )


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10) -> None:
    """Wait until *check* (a look at another process's work) holds."""
    async with asyncio.timeout(timeout):
        while not await check():  # noqa: ASYNC110  # another process: no event to wait on
            await asyncio.sleep(0.1)


def ids(requests: list[Received]) -> list[int]:
    return [request.event_id for request in requests]


def answers(*statuses: int, then: int = 200) -> Callable[[Received], Reply]:
    """Answer the first requests with *statuses*, every later one with *then*."""
    given = iter(statuses)
    return lambda _request: Reply(next(given, then))


# Signatures and the envelope.


async def test_deliveries_are_signed_and_carry_the_feeds_envelope(
    environ: dict[str, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log_path = tmp_path / "server.log"
    monkeypatch.setenv("TASKFLOW_TEST_SERVER_LOG", str(log_path))
    async with Receiver() as receiver, served(environ) as api:
        before = await api.task("Before the webhook")
        webhook = await api.register(receiver.url())
        created = await api.task()
        task_id = (await api.events())[-1]["data"]["id"]
        await api.http.patch(
            f"/tasks/{task_id}", json={"status": "completed"}, headers=api.user.headers
        )
        await receiver.wait_for(lambda requests: len(requests) >= 2)
        feed = {event["id"]: event for event in await api.events()}
        await asyncio.sleep(0.3)  # nothing more comes

    assert ids(receiver.requests) == [created, created + 1]
    assert before not in ids(receiver.requests)  # events before registration are not sent
    for request in receiver.requests:
        assert request.path == "/hook"
        assert request.headers["content-type"] == "application/json"
        assert request.headers["webhook-id"] == f"evt_{request.event_id}"
        assert verify(webhook["secret"], request) == 1
        # The same envelope as the feed and the WebSocket.
        assert request.event == feed[request.event_id]
        assert "host" in request.headers and "127.0.0.1" in request.headers["host"]
    assert receiver.requests[1].event["changes"] == {"status": ["pending", "completed"]}
    assert receiver.most_held["/hook"] == 1

    # The logs: a line per attempt, a line of metrics per webhook (at the
    # latest when the process stops), and never the secret or the URL.
    text = log_path.read_text()
    lines = [orjson.loads(line) for line in text.splitlines() if line.startswith("{")]
    attempts = [line for line in lines if line["message"] == "webhook delivery"]
    assert [(a["event_id"], a["attempt"], a["outcome"]) for a in attempts] == [
        (created, 1, "delivered"),
        (created + 1, 1, "delivered"),
    ]
    assert all(a["webhook_id"] == webhook["id"] and a["lag_ms"] >= 0 for a in attempts)
    (metrics,) = [line for line in lines if line["message"] == "webhook delivery metrics"]
    assert (metrics["attempts"], metrics["failures"]) == (2, 0)
    assert metrics["lag_ms_max"] >= 0
    assert webhook["secret"] not in text and webhook["secret"][6:] not in text
    assert f":{receiver.port}" not in text


async def test_events_filtered_out_are_passed_without_a_request(environ: dict[str, str]) -> None:
    async with Receiver() as receiver, served(environ) as api:
        await api.register(receiver.url(), events=["project.updated"])
        await api.task()
        await api.task()
        await api.http.patch(
            f"/projects/{api.project_id}", json={"name": "Renamed"}, headers=api.user.headers
        )
        await receiver.wait_for(lambda requests: len(requests) >= 1)
        await asyncio.sleep(0.3)
    assert [request.event["event"] for request in receiver.requests] == ["project.updated"]


# Order, retries and giving up.


async def test_order_holds_while_a_receiver_fails_and_recovers(environ: dict[str, str]) -> None:
    """The first attempt fails; the retry comes 5 s later (with jitter), and
    the events written meanwhile wait for it, then follow in order."""
    async with Receiver() as receiver, served(environ) as api:
        receiver.answer = answers(500)
        webhook = await api.register(receiver.url())
        first = await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 1)
        later = [await api.task() for _ in range(4)]
        failing = await api.webhook(webhook)
        await receiver.wait_for(lambda requests: len(requests) >= 6, timeout=15)
        delivered = await api.webhook(webhook)
        log = await api.deliveries(webhook)

    assert ids(receiver.requests) == [first, first, *later]
    gap = receiver.requests[1].at - receiver.requests[0].at
    step = RETRY_SCHEDULE[0].total_seconds()
    assert step * 0.9 - 0.1 <= gap <= step * 1.1 + 1.0, gap
    assert failing["failing_since"] is not None and failing["active"]
    assert delivered["failing_since"] is None and delivered["last_success_at"] is not None
    assert [(item["event_id"], item["attempt"], item["status_code"]) for item in log] == [
        *((event_id, 1, 200) for event_id in reversed(later)),
        (first, 2, 200),
        (first, 1, 500),
    ]
    assert all(item["duration_ms"] >= 0 and item["error"] is None for item in log)


async def test_a_receiver_down_for_an_hour_gets_everything_at_the_first_retry_back(
    environ: dict[str, str],
) -> None:
    async with Receiver() as receiver, served(environ) as api:
        receiver.answer = lambda _request: Reply(503, {"Retry-After": "120"})
        webhook = await api.register(receiver.url())
        written = [await api.task()]
        await receiver.wait_for(lambda requests: len(requests) >= 1)
        # Retry-After is honoured where it asks for longer than the schedule.
        await eventually(lambda: attempts_are(environ, webhook, 1))
        row = await row_of(environ, webhook)
        wait = row.next_attempt_at - row.failing_since
        assert timedelta(seconds=119) <= wait <= timedelta(seconds=125), wait

        # The retries at 5 s, 5 min and 30 min failed too; the one after 2 h
        # fails, and the next is 5 h later.
        receiver.answer = answers(500, then=500)
        written += [await api.task() for _ in range(3)]
        await move(environ, webhook, attempt=3, next_attempt_at=datetime.now(UTC))
        await eventually(lambda: attempts_are(environ, webhook, 4))
        row = await row_of(environ, webhook)
        wait = row.next_attempt_at - datetime.now(UTC)
        step = RETRY_SCHEDULE[3]
        assert step * 0.89 <= wait <= step * 1.1, wait
        assert len(receiver.requests) == 2

        # An hour on, the receiver is back: the first retry brings everything, in order.
        receiver.answer = answers()
        written += [await api.task() for _ in range(2)]
        await move(
            environ,
            webhook,
            next_attempt_at=datetime.now(UTC),
            failing_since=datetime.now(UTC) - timedelta(hours=1),
        )
        back = time.monotonic()
        await receiver.wait_for(lambda requests: len(requests) >= 2 + len(written))
        caught_up = time.monotonic() - back

    assert ids(receiver.requests) == [written[0], written[0], *written]
    assert caught_up < 3, caught_up
    assert all(
        request.headers["webhook-id"] == f"evt_{written[0]}" for request in receiver.requests[:3]
    )


async def attempts_are(environ: dict[str, str], webhook: dict[str, Any], attempt: int) -> bool:
    return bool((await row_of(environ, webhook)).attempt == attempt)


async def test_after_the_last_retry_the_event_is_given_up(environ: dict[str, str]) -> None:
    async with Receiver() as receiver, served(environ) as api:
        receiver.answer = answers(500)
        webhook = await api.register(receiver.url())
        lost = await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 1)
        await eventually(lambda: attempts_are(environ, webhook, 1))
        # Every retry of the schedule has failed but the last.
        receiver.answer = answers(500)
        await move(environ, webhook, attempt=len(RETRY_SCHEDULE), next_attempt_at=datetime.now(UTC))
        await receiver.wait_for(lambda requests: len(requests) >= 2)
        following = await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 3)
        log = await api.deliveries(webhook)
        still_failing = await api.webhook(webhook)

    assert ids(receiver.requests) == [lost, lost, following]
    given_up = next(item for item in log if item["attempt"] == len(RETRY_SCHEDULE) + 1)
    assert given_up["event_id"] == lost and given_up["status_code"] == 500
    assert given_up["error"] == f"given up after {len(RETRY_SCHEDULE) + 1} attempts"
    assert still_failing["active"]


async def test_410_disables_and_reactivation_resumes_where_it_stopped(
    environ: dict[str, str],
) -> None:
    async with Receiver() as receiver, served(environ) as api:
        receiver.answer = answers(410)
        webhook = await api.register(receiver.url())
        stopped = await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 1)

        async def disabled() -> bool:
            return not (await api.webhook(webhook))["active"]

        await eventually(disabled)
        after = await api.task()
        await asyncio.sleep(1.2)  # a disabled webhook is sent nothing (the poll is 1 s)
        assert ids(receiver.requests) == [stopped]
        listed = await api.webhook(webhook)
        resumed = await api.patch(webhook, {"active": True})
        await receiver.wait_for(lambda requests: len(requests) >= 3)
        log = await api.deliveries(webhook)

    assert (listed["active"], listed["disabled_reason"]) == (
        False,
        "the receiver answered 410 Gone",
    )
    assert resumed.status_code == 200 and resumed.json()["disabled_reason"] is None
    assert ids(receiver.requests) == [stopped, stopped, after]
    assert log[-1]["status_code"] == 410 and "disabled" in log[-1]["error"]


async def test_failing_for_three_days_disables(environ: dict[str, str]) -> None:
    async with Receiver() as receiver, served(environ) as api:
        receiver.answer = answers(500)
        webhook = await api.register(receiver.url())
        await api.task()
        await eventually(lambda: attempts_are(environ, webhook, 1))
        receiver.answer = answers(502)
        three_days = datetime.now(UTC) - timedelta(days=3, minutes=1)
        await move(environ, webhook, failing_since=three_days, next_attempt_at=datetime.now(UTC))

        async def disabled() -> bool:
            return not (await api.webhook(webhook))["active"]

        await eventually(disabled)
        listed = await api.webhook(webhook)
    assert listed["disabled_reason"] == "every delivery failed for 3 days"


def test_the_last_retry_gives_up_the_event_even_after_three_days() -> None:
    """The schedule spans more than 3 days: its last retry gives the event up
    (the webhook goes on with the next), any other failure by then disables."""
    now = datetime.now(UTC)
    claim = Claim(
        webhook_id=uuid.uuid4(),
        project_id=uuid.uuid4(),
        url="https://example.com/",
        kinds=None,
        signing_secrets=("whsec_",),
        position=9,
        attempt=len(RETRY_SCHEDULE),
        failing_since=now - timedelta(days=3, hours=4),
        token=uuid.uuid4(),
    )
    last = judge(claim, 10, 9, len(RETRY_SCHEDULE), 500, None, None, now)
    assert (last.label, last.changes["position"], last.error) == (
        "given_up",
        10,
        f"given up after {len(RETRY_SCHEDULE) + 1} attempts",
    )
    following = judge(claim, 12, 10, 0, None, None, "no answer within 10 s", now)
    assert following.label == "disabled" and following.changes["position"] == 10
    assert following.error == "no answer within 10 s; the webhook is disabled: " + (
        "every delivery failed for 3 days"
    )
    gone = judge(claim, 12, 10, 0, 410, None, None, now)
    assert (gone.label, gone.changes["active"]) == ("disabled", False)
    assert judge(claim, 12, 10, 0, 204, None, None, now).changes["failing_since"] is None
    redirected = judge(claim, 12, 10, 0, 302, None, None, now - timedelta(days=3))
    assert redirected.label == "retry" and "redirect" in (redirected.error or "")


def test_retry_after_is_honoured_when_later_than_the_schedule() -> None:
    now = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("120", now) == timedelta(seconds=120)
    assert parse_retry_after("Tue, 01 Dec 2026 12:10:00 GMT", now) == timedelta(minutes=10)
    assert parse_retry_after("soon", now) is None and parse_retry_after(None, now) is None
    for failures, step in enumerate(RETRY_SCHEDULE, start=1):
        assert step * 0.9 <= retry_delay(failures) <= step * 1.1
    assert retry_delay(1, timedelta(minutes=2)) == timedelta(minutes=2)
    assert retry_delay(1, timedelta(days=30)) == RETRY_SCHEDULE[-1]  # capped


# Replay and rotation.


async def test_replay_delivers_again_from_an_event_id(environ: dict[str, str]) -> None:
    async with Receiver() as receiver, served(environ) as api:
        webhook = await api.register(receiver.url())
        written = [await api.task() for _ in range(3)]
        await receiver.wait_for(lambda requests: len(requests) >= 3)
        replayed = await api.post(f"{webhook['id']}/replay", {"since": written[0]})
        await receiver.wait_for(lambda requests: len(requests) >= 5)
        await asyncio.sleep(0.3)

    assert replayed.status_code == 202
    assert ids(receiver.requests) == [*written, *written[1:]]
    first_time = {r.event_id: r.headers["webhook-id"] for r in receiver.requests[:3]}
    for request in receiver.requests[3:]:
        assert request.headers["webhook-id"] == first_time[request.event_id]
        assert verify(webhook["secret"], request) == 1


async def test_a_rotation_signs_with_both_secrets_for_a_day(environ: dict[str, str]) -> None:
    async with Receiver() as receiver, served(environ) as api:
        webhook = await api.register(receiver.url())
        old = webhook["secret"]
        rotated = await api.post(f"{webhook['id']}/rotate-secret")
        new = rotated.json()["secret"]
        await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 1)
        await move(environ, webhook, previous_secret_until=datetime.now(UTC) - timedelta(seconds=1))
        await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 2)

    during, after = receiver.requests
    assert len(during.headers["webhook-signature"].split(" ")) == 2
    assert (verify(new, during), verify(old, during)) == (1, 1)
    assert len(after.headers["webhook-signature"].split(" ")) == 1
    assert (verify(new, after), verify(old, after)) == (1, 0)


# Bounds, instances, and a process killed mid-delivery.


async def test_slow_receivers_hold_no_more_than_the_bound_and_requests_are_served(
    environ: dict[str, str],
) -> None:
    held = asyncio.Event()
    async with (
        Receiver() as receiver,
        served({**environ, "TASKFLOW_WEBHOOK_CONCURRENCY": "2"}) as api,
    ):
        receiver.answer = lambda _request: Reply(hold=held)
        for n in range(4):
            await api.register(receiver.url(f"/slow-{n}"))
        await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 2)
        await asyncio.sleep(1.2)
        waiting = len(receiver.requests)  # the other two wait for a free slot
        started = time.monotonic()
        for _ in range(10):
            response = await api.http.get(f"/projects/{api.project_id}", headers=api.user.headers)
            assert response.status_code == 200
        served_in = time.monotonic() - started
        held.set()
        await receiver.wait_for(lambda requests: len(requests) >= 4)

    assert waiting == 2
    assert served_in < 1, served_in


WEBHOOKS = 4
EVENTS = 15


@postgres_only
async def test_two_instances_never_send_one_webhook_two_requests_at_once(
    environ: dict[str, str],
) -> None:
    async with (
        Receiver() as receiver,
        hypercorn(environ) as (url_a, _),
        hypercorn(environ) as (url_b, _),
        httpx.AsyncClient(base_url=url_a, timeout=30) as a,
        httpx.AsyncClient(base_url=url_b, timeout=30) as b,
    ):
        receiver.answer = lambda _request: Reply(delay=0.02)
        api = await Api.open(a)
        paths = [f"/hook-{n}" for n in range(WEBHOOKS)]
        for path in paths:
            await api.register(receiver.url(path))
        await asyncio.gather(
            *((api if n % 2 else api.on(b)).task(f"Task {n}") for n in range(EVENTS))
        )
        written = [event["id"] for event in await api.events() if event["event"] == "task.created"]
        await receiver.wait_for(lambda requests: len(requests) >= WEBHOOKS * EVENTS, timeout=30)
        await asyncio.sleep(0.5)

    for path in paths:
        assert ids(receiver.to(path)) == written, path  # each once, in order
        assert receiver.most_held[path] == 1, path


@postgres_only
async def test_an_instance_set_to_deliver_none_leaves_every_event_to_another(
    environ: dict[str, str],
) -> None:
    # TASKFLOW_WEBHOOK_CONCURRENCY=0 keeps deliveries off some processes.
    async with (
        Receiver() as receiver,
        hypercorn({**environ, "TASKFLOW_WEBHOOK_CONCURRENCY": "0"}) as (url, _),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        api = await Api.open(http)
        await api.register(receiver.url())
        written = [await api.task(f"Task {n}") for n in range(3)]
        # A delivering process looks at least once a second.
        await asyncio.sleep(2.5)
        assert receiver.requests == []
        async with hypercorn(environ, empty_database=False):
            await receiver.wait_for(lambda requests: len(requests) >= len(written))

    assert ids(receiver.requests) == written


async def test_a_process_killed_mid_delivery_loses_nothing(environ: dict[str, str]) -> None:
    held = asyncio.Event()
    async with Receiver() as receiver:
        receiver.answer = lambda request: (
            Reply(hold=held) if len(receiver.requests) == 1 else Reply()
        )
        async with hypercorn(environ, empty_database=False) as (url, process):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                api = await Api.open(http)
                webhook = await api.register(receiver.url())
                in_flight = await api.task()
                await receiver.wait_for(lambda requests: len(requests) >= 1)
                row = await row_of(environ, webhook)
                lease_left = row.lease_until - datetime.now(UTC)
                assert LEASE - timedelta(seconds=3) <= lease_left <= LEASE, lease_left
                os.killpg(process.pid, signal.SIGKILL)  # no shutdown of any kind
                await asyncio.wait_for(process.wait(), 10)

        async with hypercorn(environ) as (url, _process):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                api = api.on(http)
                # The lease is the dead process's until it runs out.
                await asyncio.sleep(1.2)
                assert ids(receiver.requests) == [in_flight]
                await move(environ, webhook, lease_until=datetime.now(UTC) - timedelta(seconds=1))
                await receiver.wait_for(lambda requests: len(requests) >= 2)
                following = await api.task()
                await receiver.wait_for(lambda requests: len(requests) >= 3)
        held.set()

    assert ids(receiver.requests) == [in_flight, in_flight, following]


# The SSRF rule at delivery time, and TLS to the address checked.


async def test_the_rule_is_checked_again_at_every_delivery(environ: dict[str, str]) -> None:
    """Registered while private addresses were allowed: a process without the
    setting refuses to deliver there (an http:// URL; a name that resolves to
    loopback addresses), says so in the log and sends nothing."""
    async with Receiver() as receiver:
        async with hypercorn(environ, empty_database=False) as (url, _process):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                api = await Api.open(http)
                plain = await api.register(receiver.url("/plain"))
                private = await api.register(f"https://localhost:{receiver.port}/private")
        strict = {**environ, "TASKFLOW_WEBHOOK_ALLOW_PRIVATE": "false"}
        async with hypercorn(strict) as (url, _process):
            async with httpx.AsyncClient(base_url=url, timeout=30) as http:
                api = api.on(http)
                event_id = await api.task()

                async def logged() -> bool:
                    return all([await api.deliveries(plain), await api.deliveries(private)])

                await eventually(logged)
                (plain_refused,) = await api.deliveries(plain)
                (private_refused,) = await api.deliveries(private)
        assert receiver.requests == []

    for refused in (plain_refused, private_refused):
        assert refused["event_id"] == event_id and refused["status_code"] is None
    assert plain_refused["error"].startswith("refused: the URL must be an https:// URL")
    assert private_refused["error"].startswith(
        "refused: the URL must not lead to a private address"
    )
    assert "loopback" in private_refused["error"]


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def certificate_for_localhost(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A CA, and a certificate it signed for the name `localhost` only."""
    directory = tmp_path_factory.mktemp("webhook-tls")
    ca, ca_key = directory / "ca.pem", directory / "ca.key"
    cert, key, csr = directory / "server.pem", directory / "server.key", directory / "server.csr"
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
            "/CN=Webhook test CA", "-addext", "keyUsage=critical,keyCertSign,cRLSign",
            "-keyout", ca_key, "-out", ca)  # fmt: skip
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", key,
            "-out", csr)  # fmt: skip
    extensions = directory / "san.cnf"
    # What public CAs' certificates carry, and Python 3.13's strict
    # verification (VERIFY_X509_STRICT) requires of the CA (key usage) and of
    # the server's (authority key identifier): without them both are refused.
    extensions.write_text(
        "subjectAltName=DNS:localhost\n"
        "authorityKeyIdentifier=keyid,issuer\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial", "-days",
            "2", "-out", cert, "-extfile", extensions)  # fmt: skip
    return ca, cert, key


async def test_tls_is_checked_against_the_name_while_connecting_to_the_address(
    environ: dict[str, str], certificate_for_localhost: tuple[Path, Path, Path]
) -> None:
    """The request goes to the resolved address, and the certificate is
    checked against the URL's name: a URL naming the address itself fails."""
    ca, cert, key = certificate_for_localhost
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    trusting = {**environ, "SSL_CERT_FILE": str(ca)}
    async with Receiver(context) as receiver, served(trusting) as api:
        by_name = await api.register(receiver.url("/by-name", host="localhost"))
        by_address = await api.register(receiver.url("/by-address", host="127.0.0.1"))
        event_id = await api.task()
        await receiver.wait_for(lambda requests: len(requests) >= 1)

        async def logged() -> bool:
            return all([await api.deliveries(by_address), await api.deliveries(by_name)])

        await eventually(logged)
        (failed,) = await api.deliveries(by_address)
        (delivered,) = await api.deliveries(by_name)

    assert [request.path for request in receiver.requests] == ["/by-name"]
    assert receiver.requests[0].event_id == event_id
    assert receiver.requests[0].headers["host"] == f"localhost:{receiver.port}"
    assert verify(by_name["secret"], receiver.requests[0]) == 1
    assert delivered["status_code"] == 200
    assert failed["status_code"] is None and "certificate" in failed["error"].lower()
