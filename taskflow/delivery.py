"""Webhook delivery: the project's event log, sent to each webhook in order.

Every web process runs one ``Deliverer``, started and stopped with the app.
Woken by the broker when an event commits (on any instance, through Redis),
and otherwise once a second, it claims webhooks that have an event to be sent
(a lease: see ``data.webhooks``), sends each its next event with no database
connection or transaction held, and records the outcome in a short
transaction of its own. A webhook is sent one event at a time, the next only
once the one before has succeeded or been given up; a success is followed by
the next event at once. At most ``TASKFLOW_WEBHOOK_CONCURRENCY`` deliveries
run at once in a process, so that slow receivers hold only that many of its
tasks and never a database connection.

A process that dies mid-delivery leaves its lease to run out (``LEASE``);
then any process sends that event again: at least once, never twice at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import logging
import secrets
import time
import uuid
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
from quart import Quart

from . import outbound
from .config import Config
from .data.events import Published
from .data.webhooks import Attempt, Claim, any_due, claim_due, next_event, record, release
from .db import Backends, backends
from .errors import describe
from .jsonio import dumps

# A claim's lease: well beyond a request's 10 s, so that a live delivery never
# outlasts it, and what a process killed mid-delivery delays its event by.
LEASE = timedelta(seconds=30)
POLL_SECONDS = 1.0
# After the first failure of an event, its retries (each with jitter); after
# the last, it is given up and the webhook goes on with the next event.
_MINUTE, _HOUR = 60, 3600
RETRY_SCHEDULE = tuple(
    timedelta(seconds=seconds)
    for seconds in (5, 5 * _MINUTE, 30 * _MINUTE, *(h * _HOUR for h in (2, 5, 10, 14, 20, 24)))
)
JITTER = 0.1
DISABLE_AFTER = timedelta(days=3)
RETRY_AFTER_STATUSES = (429, 503)
RELEASE_TIMEOUT_SECONDS = 2.0
METRICS_SECONDS = 60.0
GONE = "the receiver answered 410 Gone"
FAILING = "every delivery failed for 3 days"

log = logging.getLogger(__name__)
_random = secrets.SystemRandom()


def retry_delay(failures: int, retry_after: timedelta | None = None) -> timedelta:
    """How long after its *failures*-th failure an event is tried again: the
    schedule's step, with jitter, or the receiver's `Retry-After` when that is
    later (up to the schedule's longest step)."""
    delay = RETRY_SCHEDULE[failures - 1] * _random.uniform(1 - JITTER, 1 + JITTER)
    if retry_after is not None:
        delay = max(delay, min(retry_after, RETRY_SCHEDULE[-1]))
    return delay


def parse_retry_after(value: str | None, now: datetime) -> timedelta | None:
    """`Retry-After` as seconds or as an HTTP date; None if absent or neither."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return timedelta(seconds=int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(when - now, timedelta(0))


@dataclass(frozen=True)
class Outcome:
    """What an attempt leads to: the webhook's new state, and the log's words."""

    changes: dict[str, Any]
    label: str  # delivered, retry, given_up or disabled
    error: str | None


def _joined(*parts: str | None) -> str | None:
    return "; ".join(part for part in parts if part) or None


def judge(
    claim: Claim,
    event_id: int,
    passed: int,
    failures_before: int,
    status: int | None,
    retry_after: str | None,
    error: str | None,
    now: datetime,
) -> Outcome:
    """The outcome of sending event *event_id* (the position before it being
    *passed*), answered *status* or failed with *error*."""
    if status is not None and 200 <= status < 300:
        changes = {
            "position": event_id,
            "attempt": 0,
            "next_attempt_at": now,
            "failing_since": None,
            "last_success_at": now,
        }
        return Outcome(changes, "delivered", None)
    if status is not None and 300 <= status < 400:
        error = f"a redirect ({status}), not followed"
    failing_since = claim.failing_since or now
    if status == 410:
        changes = {
            "position": passed,
            "attempt": 0,
            "active": False,
            "disabled_reason": GONE,
            "failing_since": failing_since,
        }
        return Outcome(changes, "disabled", f"{GONE}: the webhook is disabled")
    failures = failures_before + 1
    # The last retry gives the event up whatever the time (so a webhook failing
    # on one event goes on to the next); any other failure after 3 days of
    # them disables the webhook, its event kept for when it is re-activated.
    if failures > len(RETRY_SCHEDULE):
        changes = {
            "position": event_id,
            "attempt": 0,
            "next_attempt_at": now,
            "failing_since": failing_since,
        }
        return Outcome(changes, "given_up", _joined(error, f"given up after {failures} attempts"))
    if now - failing_since >= DISABLE_AFTER:
        changes = {
            "position": passed,
            "attempt": 0,
            "active": False,
            "disabled_reason": FAILING,
            "failing_since": failing_since,
        }
        return Outcome(changes, "disabled", _joined(error, f"the webhook is disabled: {FAILING}"))
    wait = parse_retry_after(retry_after, now) if status in RETRY_AFTER_STATUSES else None
    changes = {
        "position": passed,
        "attempt": failures,
        "next_attempt_at": now + retry_delay(failures, wait),
        "failing_since": failing_since,
    }
    return Outcome(changes, "retry", error)


def describe_failure(error: Exception) -> str:
    """A failed request, for the delivery log: never the URL (its path or
    query may be a secret of the receiver's)."""
    if isinstance(error, TimeoutError | httpx.TimeoutException):
        return f"no answer within {outbound.REQUEST_TIMEOUT_SECONDS:g} s"
    if isinstance(error, outbound.Refused):
        return f"refused: the URL {error}"
    text = str(error) or type(error).__name__
    return text[:200]


@dataclass
class Tally:
    """A webhook's deliveries since the last metrics line."""

    attempts: int = 0
    failures: int = 0
    lag_ms_max: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)


class Deliverer:
    """This process's deliveries: a loop that claims due webhooks, and one
    task per delivery under way, at most ``webhook_concurrency`` of them."""

    def __init__(self, backends_: Backends, config: Config) -> None:
        self._backends = backends_
        self._allow_private = config.webhook_allow_private
        self._slots = config.webhook_concurrency
        self._wake = asyncio.Event()
        self._running: dict[asyncio.Task[None], Claim] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tallies: dict[uuid.UUID, Tally] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._http: httpx.AsyncClient | None = None

    async def start(self) -> None:
        self._http = outbound.client()
        self._backends.broker.subscribe(self._on_event)
        self._loop_task = asyncio.create_task(self._run(), name="webhook-deliverer")

    async def close(self) -> None:
        """Stop at once: deliveries under way are cancelled and their webhooks
        given back, for any process to send again."""
        self._backends.broker.unsubscribe(self._on_event)
        if self._timer is not None:
            self._timer.cancel()
        claims = list(self._running.values())
        tasks = [*self._running, *([self._loop_task] if self._loop_task else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if claims:
            try:
                async with asyncio.timeout(RELEASE_TIMEOUT_SECONDS):
                    async with self._backends.sessionmaker.begin() as db_session:
                        await release(db_session, claims)
            except Exception as error:  # their leases run out instead
                log.warning("could not give webhooks back on stopping: %s", describe(error))
        self._log_tallies()
        if self._http is not None:
            await self._http.aclose()

    def _on_event(self, _message: Published) -> None:
        self._wake.set()

    def _wake_at(self, delay: float) -> None:
        """Look again after *delay* seconds (a retry due soon), or sooner."""
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        if self._timer is None or self._timer.when() <= loop.time() or self._timer.when() > when:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = loop.call_at(when, self._wake.set)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        next_metrics = loop.time() + METRICS_SECONDS
        while True:
            self._wake.clear()
            free = self._slots - len(self._running)
            if free > 0:
                try:
                    claims = await self._claim(free)
                except Exception as error:  # the database is away: look again later
                    log.warning("could not claim webhooks: %s", describe(error))
                    claims = []
                for claim in claims:
                    task = asyncio.create_task(self._deliver(claim), name="webhook-delivery")
                    self._running[task] = claim
                    task.add_done_callback(self._finished)
            if loop.time() >= next_metrics:
                next_metrics = loop.time() + METRICS_SECONDS
                self._log_tallies()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(POLL_SECONDS):
                    await self._wake.wait()

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._running.pop(task, None)
        self._wake.set()  # a free slot, and maybe the webhook's next event

    async def _claim(self, limit: int) -> list[Claim]:
        now = datetime.now(UTC)
        async with self._backends.read_sessionmaker() as db_session:
            if not await any_due(db_session, now):
                return []
        async with self._backends.sessionmaker.begin() as db_session:
            return await claim_due(db_session, now, limit, LEASE)

    async def _deliver(self, claim: Claim) -> None:
        try:
            await self._deliver_next(claim)
        except Exception as error:  # not recorded: the lease runs out, and it is sent again
            log.warning(
                "a webhook delivery could not be recorded: %s",
                describe(error),
                extra={"fields": {"webhook_id": str(claim.webhook_id)}},
            )

    async def _deliver_next(self, claim: Claim) -> None:
        async with self._backends.read_sessionmaker() as db_session:
            event, passed = await next_event(db_session, claim)
        if event is None:  # only events its filter leaves out: past them, sending nothing
            async with self._backends.sessionmaker.begin() as db_session:
                await record(db_session, claim, {"position": passed}, None)
            return
        # The failures counted were those of an event now passed (the filter changed).
        failures_before = claim.attempt if passed == claim.position else 0
        body = dumps(event)
        status: int | None = None
        retry_after: str | None = None
        error: str | None = None
        attempted_at = datetime.now(UTC)
        started = time.perf_counter()
        try:
            async with asyncio.timeout(outbound.REQUEST_TIMEOUT_SECONDS):
                target = await outbound.destination(claim.url, self._allow_private)
                headers = outbound.signed_headers(
                    claim.signing_secrets, f"evt_{event['id']}", int(time.time()), body
                )
                assert self._http is not None  # nosec B101: started
                answer = await outbound.post(self._http, target, headers, body)
            status, retry_after = answer.status_code, answer.retry_after
        except (TimeoutError, outbound.Refused, httpx.HTTPError, OSError) as failure:
            error = describe_failure(failure)
        duration_ms = round((time.perf_counter() - started) * 1000)
        now = datetime.now(UTC)
        outcome = judge(
            claim, event["id"], passed, failures_before, status, retry_after, error, now
        )
        attempt = Attempt(
            event["id"], failures_before + 1, status, outcome.error, duration_ms, attempted_at
        )
        async with self._backends.sessionmaker.begin() as db_session:
            recorded = await record(db_session, claim, outcome.changes, attempt)
        if outcome.label == "retry":
            self._wake_at((outcome.changes["next_attempt_at"] - now).total_seconds() + 0.05)
        lag_ms = round((now - datetime.fromisoformat(event["occurred_at"])).total_seconds() * 1000)
        self._count(claim, outcome, lag_ms)
        log.log(
            logging.INFO if outcome.label == "delivered" else logging.WARNING,
            "webhook delivery",
            extra={
                "fields": {
                    "webhook_id": str(claim.webhook_id),
                    "project_id": str(claim.project_id),
                    "event_id": event["id"],
                    "attempt": attempt.number,
                    "status_code": status,
                    "error": outcome.error,
                    "duration_ms": duration_ms,
                    "lag_ms": lag_ms,
                    "outcome": outcome.label if recorded else "lease_lost",
                }
            },
        )

    def _count(self, claim: Claim, outcome: Outcome, lag_ms: int) -> None:
        tally = self._tallies.setdefault(claim.webhook_id, Tally())
        tally.attempts += 1
        tally.failures += outcome.label != "delivered"
        tally.lag_ms_max = max(tally.lag_ms_max, lag_ms)
        tally.outcomes[outcome.label] = tally.outcomes.get(outcome.label, 0) + 1

    def _log_tallies(self) -> None:
        """One metrics line per webhook delivered to since the last ones."""
        for webhook_id, tally in self._tallies.items():
            log.info(
                "webhook delivery metrics",
                extra={
                    "fields": {
                        "webhook_id": str(webhook_id),
                        "attempts": tally.attempts,
                        "failures": tally.failures,
                        "lag_ms_max": tally.lag_ms_max,
                        "outcomes": tally.outcomes,
                    }
                },
            )
        self._tallies.clear()


def init_app(app: Quart) -> None:
    """Deliver webhooks while the app serves (after ``db.init_app``: its
    shutdown runs after this one's), unless this process is to deliver none."""
    config: Config = app.config["TASKFLOW"]
    if config.webhook_concurrency == 0:
        return

    @app.while_serving
    async def lifespan() -> AsyncGenerator[None, None]:
        deliverer = Deliverer(backends(), config)
        await deliverer.start()
        yield
        await deliverer.close()
