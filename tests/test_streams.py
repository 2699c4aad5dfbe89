"""The WebSocket fan-out without a server: streams, subscriptions and the hub,
fed by an in-memory event log and the in-process broker."""

import asyncio
import logging
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from taskflow import streams
from taskflow.broker import InProcessBroker
from taskflow.data.events import Envelope, EventKind, Published, envelope
from taskflow.streams import ByteBudget, Hub, Stream, Subscription, frame_of

WAIT_SECONDS = 2.0


def new_hub(broker: InProcessBroker, log: "FakeLog") -> Hub:
    return Hub(broker, log, ByteBudget(1 << 20))


async def eventually(condition: Callable[[], bool], timeout: float = WAIT_SECONDS) -> None:
    """Wait, in short polls, until *condition* holds; fail after *timeout* seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            pytest.fail("timed out waiting for a condition")
        await asyncio.sleep(0.005)


def event(
    event_id: int,
    project_id: uuid.UUID,
    kind: EventKind = EventKind.TASK_CREATED,
    data: dict[str, Any] | None = None,
) -> Envelope:
    return envelope(event_id, kind, project_id, uuid.uuid4(), datetime.now(UTC), data or {}, None)


class FakeLog:
    """The event log in memory: ids shared by every project, as in the database.

    It can be made to fail its next reads, to fail ``latest_id``, and to pause
    in ``latest_id`` (having read the latest id before or after the pause).
    """

    def __init__(self) -> None:
        self.events: dict[uuid.UUID, list[Envelope]] = defaultdict(list)
        self.next_id = 1
        self.reads: list[tuple[uuid.UUID, int]] = []
        self.failures = 0
        self.latest_error: Exception | None = None
        self.pause: asyncio.Event | None = None
        self.paused = asyncio.Event()
        self.read_latest_before_pause = True

    def append(self, project_id: uuid.UUID, kind: EventKind = EventKind.TASK_CREATED) -> Published:
        """Commit an event; return the message the broker would carry."""
        prev_id = self._latest(project_id)
        committed = event(self.next_id, project_id, kind)
        self.next_id += 1
        self.events[project_id].append(committed)
        return {"project_id": str(project_id), "prev_id": prev_id, "envelope": committed}

    def _latest(self, project_id: uuid.UUID) -> int:
        events = self.events[project_id]
        return events[-1]["id"] if events else 0

    async def after(self, project_id: uuid.UUID, since: int) -> AsyncIterator[Envelope]:
        self.reads.append((project_id, since))
        if self.failures:
            self.failures -= 1
            raise ConnectionError("the database is away")
        for logged in list(self.events[project_id]):
            if logged["id"] > since:
                await asyncio.sleep(0)
                yield logged

    async def latest_ids(self, project_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, int]:
        return {project_id: self._latest(project_id) for project_id in project_ids}

    async def latest_id(self, project_id: uuid.UUID) -> int:
        if self.latest_error is not None:
            raise self.latest_error
        latest = self._latest(project_id)
        if self.pause is not None:
            self.paused.set()
            await self.pause.wait()
            if not self.read_latest_before_pause:
                latest = self._latest(project_id)
        return latest


class Recorder(Subscription):
    """A subscription that records every event its stream offers it, as offered."""

    def __init__(self, project_id: uuid.UUID) -> None:
        super().__init__(FakeSubscriber(new_hub(InProcessBroker(), FakeLog())), project_id)
        self.offered: list[tuple[Envelope, str]] = []

    def offer(self, event: Envelope, frame: str) -> None:
        self.offered.append((event, frame))

    @property
    def ids(self) -> list[int]:
        return [event["id"] for event, _frame in self.offered]


class FakeSubscriber:
    """A socket: records its frames and its ends, and leaves the hub on an end,
    as ``ws.Connection`` does."""

    def __init__(self, hub: Hub, user_id: uuid.UUID | None = None) -> None:
        self.hub = hub
        self.user_id = user_id or uuid.uuid4()
        self.calls: list[tuple[str, Any]] = []

    def enqueue(self, frame: str) -> None:
        self.calls.append(("frame", frame))

    def end_subscription(self, subscription: Subscription, reason: str) -> None:
        self.hub.leave(subscription)
        self.calls.append(("end", reason))

    @property
    def story(self) -> list[tuple[str, Any]]:
        """Its frames (by event id) and ends, in order."""
        return [
            (call, orjson.loads(value)["id"] if call == "frame" else value)
            for call, value in self.calls
        ]

    @property
    def ids(self) -> list[int]:
        return [value for call, value in self.story if call == "frame"]


@asynccontextmanager
async def started(stream: Stream, last_id: int) -> AsyncIterator[Stream]:
    stream.start(last_id)
    try:
        yield stream
    finally:
        task = stream.stop()
        if task is not None:
            await asyncio.wait_for(asyncio.gather(task, return_exceptions=True), WAIT_SECONDS)


@pytest.fixture
def log() -> FakeLog:
    return FakeLog()


@pytest.fixture
def project_id() -> uuid.UUID:
    return uuid.uuid4()


def stream_with_recorder(
    log: FakeLog, project_id: uuid.UUID, earlier_events: int
) -> tuple[Stream, Recorder]:
    """A stream of a project whose log already holds *earlier_events* events."""
    for _ in range(earlier_events):
        log.append(project_id)
    stream = Stream(project_id, log)
    recorder = Recorder(project_id)
    stream.subscriptions.add(recorder)
    return stream, recorder


# Stream


async def test_the_next_message_in_line_is_delivered_without_reading_the_log(
    log: FakeLog, project_id: uuid.UUID
) -> None:
    stream, recorder = stream_with_recorder(log, project_id, 2)
    async with started(stream, 2):
        message = log.append(project_id)
        stream.receive(message)
        await eventually(lambda: recorder.ids == [3])
    assert recorder.offered == [(message["envelope"], frame_of(message["envelope"]))]
    assert log.reads == []


async def test_a_gap_is_read_from_the_log_then_the_message_is_delivered_in_order(
    log: FakeLog, project_id: uuid.UUID
) -> None:
    stream, recorder = stream_with_recorder(log, project_id, 2)
    async with started(stream, 2):
        m3, m4, m5, m6 = (log.append(project_id) for _ in range(4))
        # 5 arrives first; the log already holds 6 as well.
        stream.receive(m5)
        await eventually(lambda: recorder.ids == [3, 4, 5])
        assert log.reads == [(project_id, 2)]
        for late in (m3, m4, m6):
            stream.receive(late)
        await eventually(lambda: recorder.ids == [3, 4, 5, 6])
    assert [frame for _event, frame in recorder.offered] == [
        frame_of(m["envelope"]) for m in (m3, m4, m5, m6)
    ]


async def test_a_message_at_or_below_the_last_id_is_dropped(
    log: FakeLog, project_id: uuid.UUID
) -> None:
    stream, recorder = stream_with_recorder(log, project_id, 0)
    m1, m2 = log.append(project_id), log.append(project_id)
    async with started(stream, 2):
        stream.receive(m1)
        stream.receive(m2)
        m3 = log.append(project_id)
        stream.receive(m3)
        await eventually(lambda: recorder.ids == [3])
        stream.receive(m3)
        stream.receive(log.append(project_id))
        await eventually(lambda: recorder.ids == [3, 4])
    assert log.reads == []


async def test_catch_up_reads_what_the_broker_did_not_bring(
    log: FakeLog, project_id: uuid.UUID
) -> None:
    stream, recorder = stream_with_recorder(log, project_id, 1)
    async with started(stream, 1):
        log.append(project_id)
        log.append(project_id)
        stream.catch_up()
        await eventually(lambda: recorder.ids == [2, 3])
        stream.catch_up()
        await eventually(lambda: len(log.reads) == 2)
        stream.receive(log.append(project_id))
        await eventually(lambda: recorder.ids == [2, 3, 4])
    assert log.reads == [(project_id, 1), (project_id, 3)]


@pytest.mark.parametrize("failures", [1, 3])
async def test_a_failing_log_is_logged_and_read_again_shortly(
    log: FakeLog,
    project_id: uuid.UUID,
    failures: int,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setattr(streams, "POLL_SECONDS", 0.01)
    stream, recorder = stream_with_recorder(log, project_id, 2)
    log.failures = failures
    with caplog.at_level(logging.ERROR, logger="taskflow.streams"):
        async with started(stream, 2):
            log.append(project_id)
            stream.receive(log.append(project_id))  # 4, after a gap
            await eventually(lambda: recorder.ids == [3, 4])
            assert len(log.reads) == failures + 1
            stream.receive(log.append(project_id))
            await eventually(lambda: recorder.ids == [3, 4, 5])
    failed = [r for r in caplog.records if "could not read the event log" in r.getMessage()]
    assert len(failed) == failures
    assert all(record.exc_info for record in failed)


# Subscription


def subscribed(user_id: uuid.UUID | None = None) -> tuple[Subscription, FakeSubscriber]:
    subscriber = FakeSubscriber(new_hub(InProcessBroker(), FakeLog()), user_id)
    return Subscription(subscriber, uuid.uuid4()), subscriber


def offer(subscription: Subscription, *events: Envelope) -> None:
    for offered in events:
        subscription.offer(offered, frame_of(offered))


def catch_up(subscription: Subscription, *events: Envelope) -> None:
    """Send *events* as the socket sends the log before going live."""
    for logged in events:
        if subscription.admit(logged):
            subscription.subscriber.enqueue(frame_of(logged))
            subscription.sent(logged)


def member_removed(event_id: int, project_id: uuid.UUID, user_id: uuid.UUID) -> Envelope:
    return event(event_id, project_id, EventKind.MEMBER_REMOVED, {"user_id": str(user_id)})


def test_until_live_the_streams_events_are_left_to_the_catch_up() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    offer(subscription, event(1, p), event(2, p))
    assert subscriber.calls == []
    catch_up(subscription, event(1, p), event(2, p))
    subscription.go_live()
    offer(subscription, event(2, p), event(3, p), event(3, p))
    assert subscriber.ids == [1, 2, 3]


def test_each_event_is_admitted_once_in_order() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.last_id = 4  # where the socket's catch-up starts: after `since`
    admitted = [subscription.admit(event(n, p)) for n in (3, 4, 5, 5, 7, 6, 8)]
    assert admitted == [False, False, True, False, True, False, True]
    assert subscription.last_id == 8
    assert subscriber.calls == []


def test_the_frame_passed_on_is_the_one_offered() -> None:
    subscription, subscriber = subscribed()
    subscription.go_live()
    subscription.offer(event(1, subscription.project_id), '{"id": 1, "as": "offered"}')
    assert subscriber.calls == [("frame", '{"id": 1, "as": "offered"}')]


def test_removal_of_the_subscriber_ends_the_subscription_unsent() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.member_at = 1
    subscription.go_live()
    offer(subscription, event(2, p), member_removed(3, p, subscriber.user_id), event(4, p))
    assert subscriber.story == [("frame", 2), ("end", "removed")]
    assert subscription.ended


def test_removal_of_the_subscriber_in_the_catch_up_ends_it_unsent() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.member_at = 1
    catch_up(subscription, event(2, p), member_removed(3, p, subscriber.user_id), event(4, p))
    subscription.go_live()
    offer(subscription, event(5, p))
    assert subscriber.story == [("frame", 2), ("end", "removed")]


def test_a_removal_before_the_membership_was_confirmed_is_passed_on() -> None:
    """The subscriber was removed, then added again: a removal at or before the
    log position at which the membership was confirmed is history."""
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.member_at = 5
    catch_up(subscription, member_removed(2, p, subscriber.user_id), event(3, p))
    subscription.go_live()
    offer(subscription, member_removed(5, p, subscriber.user_id), event(6, p))
    assert subscriber.story == [("frame", 2), ("frame", 3), ("frame", 5), ("frame", 6)]
    assert not subscription.ended


def test_removal_of_another_member_is_passed_on() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.go_live()
    offer(subscription, member_removed(1, p, uuid.uuid4()), event(2, p))
    assert subscriber.story == [("frame", 1), ("frame", 2)]
    assert not subscription.ended


def test_project_deleted_is_sent_then_ends_the_subscription() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    subscription.go_live()
    offer(subscription, event(1, p, EventKind.PROJECT_DELETED), event(2, p))
    assert subscriber.story == [("frame", 1), ("end", "project_deleted")]


def test_project_deleted_during_the_catch_up_is_sent_on_going_live() -> None:
    """The log loses a deleted project's events: the stream's event is kept."""
    subscription, subscriber = subscribed()
    p = subscription.project_id
    offer(subscription, event(3, p), event(4, p, EventKind.PROJECT_DELETED))
    catch_up(subscription, event(2, p))  # the log ends there
    assert subscriber.story == [("frame", 2)]
    subscription.go_live()
    offer(subscription, event(5, p))
    assert subscriber.story == [("frame", 2), ("frame", 4), ("end", "project_deleted")]


def test_project_deleted_sent_by_the_catch_up_is_not_sent_again() -> None:
    subscription, subscriber = subscribed()
    p = subscription.project_id
    deleted = event(2, p, EventKind.PROJECT_DELETED)
    offer(subscription, deleted)
    catch_up(subscription, event(1, p), deleted)
    subscription.go_live()
    assert subscriber.story == [("frame", 1), ("frame", 2), ("end", "project_deleted")]


# Hub


@pytest.fixture
async def hub(log: FakeLog) -> AsyncIterator[Hub]:
    hub = new_hub(InProcessBroker(), log)
    await hub.start()
    try:
        yield hub
    finally:
        await asyncio.wait_for(hub.close(), WAIT_SECONDS)


async def live_subscription(
    hub: Hub, log: FakeLog, project_id: uuid.UUID
) -> tuple[Subscription, FakeSubscriber]:
    """A subscription as a socket makes one without ``since``: joined, then live
    from where the log stands."""
    subscriber = FakeSubscriber(hub)
    subscription = Subscription(subscriber, project_id)
    await hub.join(subscription)
    subscription.member_at = subscription.last_id = await log.latest_id(project_id)
    subscription.go_live()
    return subscription, subscriber


async def test_a_published_message_reaches_only_its_projects_subscriptions(
    hub: Hub, log: FakeLog
) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    log.append(a)
    log.append(b)
    _sa, a_subscriber = await live_subscription(hub, log, a)
    _sb, b_subscriber = await live_subscription(hub, log, b)
    await hub.broker.publish(log.append(a))  # 3
    await hub.broker.publish(log.append(uuid.uuid4()))  # 4: nobody here follows it
    await eventually(lambda: a_subscriber.ids == [3])
    await hub.broker.publish(log.append(b))  # 5
    await eventually(lambda: b_subscriber.ids == [5])
    assert a_subscriber.ids == [3]
    assert set(hub.streams) == {a, b}


def stream_tasks(project_id: uuid.UUID) -> list[asyncio.Task[Any]]:
    """The project's stream tasks still running."""
    return [task for task in asyncio.all_tasks() if task.get_name() == f"stream-{project_id}"]


async def test_the_last_leave_drops_the_stream(hub: Hub, log: FakeLog) -> None:
    p = uuid.uuid4()
    first, first_subscriber = await live_subscription(hub, log, p)
    second, second_subscriber = await live_subscription(hub, log, p)
    stream = hub.streams[p]
    assert len(stream_tasks(p)) == 1
    hub.leave(first)
    assert hub.streams[p] is stream
    await hub.broker.publish(log.append(p))
    await eventually(lambda: second_subscriber.ids == [1])
    hub.leave(second)
    assert p not in hub.streams
    await eventually(lambda: stream_tasks(p) == [])
    await hub.broker.publish(log.append(p))
    assert first_subscriber.ids == []
    assert second_subscriber.ids == [1]
    _third, third_subscriber = await live_subscription(hub, log, p)
    assert hub.streams[p] is not stream
    await hub.broker.publish(log.append(p))
    await eventually(lambda: third_subscriber.ids == [3])


@pytest.mark.parametrize("read_latest_before_pause", [True, False])
async def test_a_message_published_while_the_stream_is_made_is_neither_lost_nor_doubled(
    hub: Hub, log: FakeLog, read_latest_before_pause: bool
) -> None:
    p = uuid.uuid4()
    log.append(p)
    log.append(p)
    log.pause = asyncio.Event()
    log.read_latest_before_pause = read_latest_before_pause
    recorder = Recorder(p)
    joining = asyncio.create_task(hub.join(recorder))
    await eventually(log.paused.is_set)
    await hub.broker.publish(log.append(p))  # 3, while the log's latest id is being read
    log.pause.set()
    await asyncio.wait_for(joining, WAIT_SECONDS)
    if read_latest_before_pause:  # the stream starts at 2: 3 comes from the broker
        await eventually(lambda: recorder.ids == [3])
    await hub.broker.publish(log.append(p))
    # Had 3 been lost, 4 would show the gap and 3 would come from the log.
    await eventually(lambda: 4 in recorder.ids)
    assert recorder.ids == ([3, 4] if read_latest_before_pause else [4])
    assert log.reads == []


@pytest.mark.parametrize("read_latest_before_pause", [True, False])
async def test_a_socket_subscribing_during_publishes_gets_every_event_once(
    hub: Hub, log: FakeLog, read_latest_before_pause: bool
) -> None:
    """The socket's whole subscribe (``ws``): join, read where the log stands,
    catch up from ``since`` to the stream's position, go live."""
    p = uuid.uuid4()
    log.append(p)
    log.append(p)
    log.pause = asyncio.Event()
    log.read_latest_before_pause = read_latest_before_pause
    subscriber = FakeSubscriber(hub)
    subscription = Subscription(subscriber, p)
    joining = asyncio.create_task(hub.join(subscription))
    await eventually(log.paused.is_set)
    await hub.broker.publish(log.append(p))  # 3, while the stream is made
    log.pause.set()
    await asyncio.wait_for(joining, WAIT_SECONDS)
    log.pause = None
    position = await log.latest_id(p)
    subscription.member_at = position
    subscription.last_id = min(1, position)  # the client's `since`
    await hub.broker.publish(log.append(p))  # 4, before the catch-up
    published_during_catch_up = False
    for _ in range(10):  # pages, as the socket reads them
        if subscription.last_id >= hub.position(p):
            break
        async for logged in log.after(p, subscription.last_id):
            if subscription.admit(logged):
                subscriber.enqueue(frame_of(logged))
                subscription.sent(logged)
            if not published_during_catch_up:
                published_during_catch_up = True
                await hub.broker.publish(log.append(p))  # 5
            await asyncio.sleep(0.005)  # the client reads
    else:
        pytest.fail("the catch-up never reached the stream")
    subscription.go_live()
    await hub.broker.publish(log.append(p))  # 6, live
    await eventually(lambda: 6 in subscriber.ids)
    assert subscriber.ids == [2, 3, 4, 5, 6]


async def test_the_hubs_position_is_where_its_stream_of_the_project_is(
    hub: Hub, log: FakeLog
) -> None:
    p = uuid.uuid4()
    log.append(p)
    assert hub.position(p) == 0
    await live_subscription(hub, log, p)
    assert hub.position(p) == 1
    log.append(uuid.uuid4())  # another project's event: ids are shared
    await hub.broker.publish(log.append(p))
    await eventually(lambda: hub.position(p) == 3)
    assert hub.position(uuid.uuid4()) == 0


async def test_a_join_whose_log_read_fails_leaves_no_stream(hub: Hub, log: FakeLog) -> None:
    p = uuid.uuid4()
    log.latest_error = ConnectionError("the database is away")
    with pytest.raises(ConnectionError):
        await hub.join(Subscription(FakeSubscriber(hub), p))
    assert p not in hub.streams
    log.latest_error = None
    _subscription, subscriber = await live_subscription(hub, log, p)
    await hub.broker.publish(log.append(p))
    await eventually(lambda: subscriber.ids == [1])


class FlakyBroker(InProcessBroker):
    def __init__(self) -> None:
        super().__init__()
        self.up = True

    @property
    def connected(self) -> bool:
        return self.up


async def test_streams_read_the_log_while_the_broker_is_away_and_once_when_back(
    log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "POLL_SECONDS", 0.01)
    broker = FlakyBroker()
    hub = new_hub(broker, log)
    await hub.start()
    try:
        p = uuid.uuid4()
        recorder = Recorder(p)
        await hub.join(recorder)
        broker.up = False
        log.append(p)  # never published
        await eventually(lambda: recorder.ids == [1])
        broker.up = True
        log.append(p)  # committed as the broker came back, never published
        await eventually(lambda: recorder.ids == [1, 2])
        await asyncio.sleep(0.05)  # let any catch-up still queued run
        reads = len(log.reads)
        await asyncio.sleep(0.1)  # ten polls: with the broker up, none reads the log
        assert len(log.reads) == reads
        await broker.publish(log.append(p))
        await eventually(lambda: recorder.ids == [1, 2, 3])
    finally:
        await asyncio.wait_for(hub.close(), WAIT_SECONDS)


class RedisLikeBroker(FlakyBroker):
    """Connected, but carrying messages between processes: one can be lost."""

    @property
    def crosses_processes(self) -> bool:
        return True


async def test_an_event_whose_publisher_could_not_reach_redis_arrives_from_the_log(
    log: FakeLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(streams, "POLL_SECONDS", 0.01)
    monkeypatch.setattr(streams, "LOG_LOOK_SECONDS", 0.05)
    broker = RedisLikeBroker()
    hub = new_hub(broker, log)
    await hub.start()
    try:
        p = uuid.uuid4()
        recorder = Recorder(p)
        await hub.join(recorder)
        await broker.publish(log.append(p))
        await eventually(lambda: recorder.ids == [1])
        log.append(p)  # committed by an instance cut off from Redis: never published
        await eventually(lambda: recorder.ids == [1, 2])
        await asyncio.sleep(0.1)  # let any catch-up still queued run
        reads = len(log.reads)
        await asyncio.sleep(0.3)  # six looks, with nothing lost: none reads the log
        assert len(log.reads) == reads
    finally:
        await asyncio.wait_for(hub.close(), WAIT_SECONDS)


class FakeSocket:
    def __init__(self) -> None:
        self.closed: list[tuple[int, str]] = []

    def close(self, code: int, reason: str) -> None:
        self.closed.append((code, reason))


async def test_restart_closes_every_socket(hub: Hub) -> None:
    sockets = [FakeSocket(), FakeSocket()]
    hub.sockets.update(sockets)
    hub.restart(1012, "server restarting")
    assert [socket.closed for socket in sockets] == [[(1012, "server restarting")]] * 2
