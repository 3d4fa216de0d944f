"""The behavioural contract of ``IEventBus``, run against every bus backend.

Only the interface is used (see conftest.py for the registry).  Waiting is
done in real reactor time, polling briefly, so the same tests hold for a bus
with a broker in between.  "Nothing else arrived" is checked after a marker
event dispatched later has been delivered, plus a short grace period.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import fail
from twisted.internet.task import deferLater
from zope.interface.verify import verifyObject

from twisted_mail_cluster.events.interfaces import IEventBus, IRegistration
from twisted_mail_cluster.events.model import (
    Added,
    Expunged,
    FlagsUpdated,
    MailboxAdded,
    MailboxDeleted,
    MailboxRenamed,
)

ensure = pytest_twisted.ensureDeferred
OWNER = "alice@example.com"
MARKER_OWNER = "marker@example.invalid"
TIMEOUT = 3.0
GRACE = 0.03


def sleep(seconds: float):
    return deferLater(reactor, seconds, lambda: None)


async def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = reactor.seconds() + timeout
    while not predicate():
        if reactor.seconds() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await sleep(0.002)


class Recorder:
    """A listener that records the events it gets (markers aside)."""

    def __init__(self, fail_times: int = 0, fail_with_deferred: bool = False) -> None:
        self.events: list = []
        self.calls: list[tuple[float, object]] = []  # (reactor time, event), failures included
        self.fail_times = fail_times
        self.fail_with_deferred = fail_with_deferred

    def __call__(self, event):
        if event.owner == MARKER_OWNER:
            return None
        self.calls.append((reactor.seconds(), event))
        if self.fail_times:
            self.fail_times -= 1
            if self.fail_with_deferred:
                return fail(RuntimeError("listener failed (Deferred)"))
            raise RuntimeError("listener failed")
        self.events.append(event)
        return None


async def settle(bus) -> None:
    """Let everything dispatched before now reach its key listeners."""
    key = uuid.uuid4()
    seen: list = []
    registration = await bus.register(seen.append, str(key))
    try:
        await bus.dispatch(MailboxAdded(key, MARKER_OWNER, name="marker"))
        await wait_until(lambda: seen, "the marker event")
    finally:
        await registration.unregister()
    await sleep(GRACE)


def added(box: uuid.UUID, uid: int) -> Added:
    return Added(box, OWNER, uids=(uid,), message_ids=(uuid.uuid1(),), modseq=uid + 1)


@ensure
async def test_provides_the_interface(bus) -> None:
    assert verifyObject(IEventBus, bus)
    registration = await bus.register(lambda event: None, str(uuid.uuid4()))
    assert verifyObject(IRegistration, registration)
    assert verifyObject(IRegistration, await bus.register_group(lambda event: None, "g"))


@ensure
async def test_key_listener_gets_its_key_only_and_never_inside_dispatch(bus) -> None:
    a, b = uuid.uuid4(), uuid.uuid4()
    got_a, got_b = Recorder(), Recorder()
    await bus.register(got_a, str(a))
    await bus.register(got_b, str(b))
    events = [added(a, 1), added(b, 1), added(a, 2), added(uuid.uuid4(), 1)]

    dispatched = [bus.dispatch(e) for e in events]
    assert got_a.calls == [] and got_b.calls == []  # not synchronously, inside dispatch
    for d in dispatched:
        assert await d is None

    await wait_until(lambda: len(got_a.events) == 2 and len(got_b.events) == 1, "the events")
    await settle(bus)
    assert got_a.events == [events[0], events[2]]
    assert got_b.events == [events[1]]


@ensure
async def test_events_of_one_key_arrive_in_dispatch_order(bus) -> None:
    box = uuid.uuid4()
    got = Recorder()
    await bus.register(got, str(box))
    events = [added(box, uid) for uid in range(1, 41)]
    for event in events:
        bus.dispatch(event)
    await wait_until(lambda: len(got.events) == len(events), "every event")
    assert got.events == events


@ensure
async def test_every_event_type_arrives_equal(bus) -> None:
    box = uuid.uuid4()
    got = Recorder()
    await bus.register(got, str(box))
    events = [
        Added(box, OWNER, uids=(1, 2), message_ids=(uuid.uuid1(), uuid.uuid1()), modseq=7),
        Expunged(box, OWNER, uids=(2,), message_ids=(uuid.uuid1(),), modseq=8),
        FlagsUpdated(box, OWNER, updates=((1, ("$Work", "\\Seen"), 9), (3, (), 9))),
        MailboxAdded(box, OWNER, name="Archiv/\u00c4rger"),
        MailboxRenamed(box, OWNER, old_name="Archiv/\u00c4rger", new_name="Old"),
        MailboxDeleted(box, OWNER, name="Old"),
    ]
    for event in events:
        await bus.dispatch(event)
    await wait_until(lambda: len(got.events) == len(events), "every event")
    assert sorted(got.events, key=lambda e: e.event_id) == sorted(events, key=lambda e: e.event_id)
    assert [type(e) for e in got.events] == [type(e) for e in events]


@ensure
async def test_several_listeners_on_one_key_all_get_each_event_once(bus) -> None:
    box = uuid.uuid4()
    listeners = [Recorder(), Recorder(), Recorder()]
    for listener in listeners:
        await bus.register(listener, str(box))
    events = [added(box, 1), added(box, 2)]
    for event in events:
        await bus.dispatch(event)
    await wait_until(lambda: all(len(r.events) == 2 for r in listeners), "every listener")
    await settle(bus)
    for listener in listeners:
        assert listener.events == events


@ensure
async def test_unregister_stops_delivery_and_is_idempotent(bus) -> None:
    box = uuid.uuid4()
    gone, stays = Recorder(), Recorder()
    registration = await bus.register(gone, str(box))
    await bus.register(stays, str(box))
    first = added(box, 1)
    await bus.dispatch(first)
    await wait_until(lambda: gone.events and stays.events, "the first event")

    assert await registration.unregister() is None
    assert await registration.unregister() is None  # idempotent
    second = added(box, 2)
    await bus.dispatch(second)
    await wait_until(lambda: len(stays.events) == 2, "the second event")
    await settle(bus)
    assert gone.events == [first]
    assert stays.events == [first, second]


@ensure
async def test_no_delivery_after_unregister_fires(bus) -> None:
    """An event already dispatched is not delivered once unregister has fired."""
    box = uuid.uuid4()
    gone = Recorder()
    registration = await bus.register(gone, str(box))
    bus.dispatch(added(box, 1))
    await registration.unregister()
    await settle(bus)
    assert gone.calls == []


@ensure
async def test_a_group_gets_each_event_once_however_many_members(bus) -> None:
    members = [Recorder(), Recorder()]
    other_group = Recorder()
    for member in members:
        await bus.register_group(member, "indexer")
    await bus.register_group(other_group, "quota")
    key_listener = Recorder()
    box = uuid.uuid4()
    await bus.register(key_listener, str(box))
    events = [added(box, uid) for uid in range(1, 7)]

    for event in events:
        await bus.dispatch(event)

    def group_total() -> int:
        return sum(len(m.events) for m in members)

    await wait_until(lambda: group_total() == 6 and len(other_group.events) == 6, "the groups")
    await settle(bus)
    await sleep(GRACE)
    handled = [e for m in members for e in m.events]
    assert sorted(e.event_id for e in handled) == sorted(e.event_id for e in events)
    assert sorted(e.event_id for e in other_group.events) == sorted(e.event_id for e in events)
    assert key_listener.events == events  # keys and groups both get it


@ensure
async def test_unregistered_group_member_gets_nothing_more(bus) -> None:
    leaving, staying = Recorder(), Recorder()
    registration = await bus.register_group(leaving, "g")
    await bus.register_group(staying, "g")
    await registration.unregister()
    await registration.unregister()  # idempotent
    events = [added(uuid.uuid4(), uid) for uid in range(1, 5)]
    for event in events:
        await bus.dispatch(event)
    await wait_until(lambda: len(staying.events) == 4, "the remaining member")
    await settle(bus)
    assert leaving.calls == []
    assert sorted(e.event_id for e in staying.events) == sorted(e.event_id for e in events)


@pytest.mark.parametrize("fail_with_deferred", [False, True], ids=["raises", "deferred"])
@ensure
async def test_a_failing_group_listener_is_retried_with_backoff(bus, bus_settings, fail_with_deferred) -> None:
    listener = Recorder(fail_times=2, fail_with_deferred=fail_with_deferred)
    await bus.register_group(listener, "g")
    event = added(uuid.uuid4(), 1)
    await bus.dispatch(event)

    await wait_until(lambda: listener.events, "the successful retry")
    await sleep(bus_settings.max_backoff * 2)
    assert listener.events == [event]
    assert [e for _, e in listener.calls] == [event, event, event]
    times = [t for t, _ in listener.calls]
    for attempt, (earlier, later) in enumerate(zip(times, times[1:])):
        assert later - earlier >= bus_settings.backoff(attempt) - 0.001, attempt
    assert await bus.dead_letters("g") == []


@ensure
async def test_a_listener_that_always_fails_ends_in_dead_letters(bus, bus_settings) -> None:
    listener = Recorder(fail_times=10**6)
    await bus.register_group(listener, "g")
    healthy = Recorder()
    await bus.register_group(healthy, "h")
    event = added(uuid.uuid4(), 1)
    await bus.dispatch(event)

    dead: list = []

    async def poll() -> None:
        dead[:] = await bus.dead_letters("g")

    deadline = reactor.seconds() + TIMEOUT
    while not dead:
        assert reactor.seconds() < deadline, "timed out waiting for the dead letter"
        await sleep(0.005)
        await poll()
    assert dead == [event]
    await sleep(bus_settings.max_backoff * 2)  # no retry after the last one
    assert [e for _, e in listener.calls] == [event] * (bus_settings.retries + 1)
    times = [t for t, _ in listener.calls]
    for attempt, (earlier, later) in enumerate(zip(times, times[1:])):
        assert later - earlier >= bus_settings.backoff(attempt) - 0.001, attempt
    assert healthy.events == [event]
    assert await bus.dead_letters("h") == []
    assert await bus.dead_letters("never-registered") == []

    listener.fail_times = 0  # the listener is fixed; the admin replays
    assert await bus.replay_dead_letters("g") == 1
    await wait_until(lambda: listener.events, "the replayed event")
    assert listener.events == [event]
    assert await bus.dead_letters("g") == []
    assert await bus.replay_dead_letters("g") == 0
    await settle(bus)
    assert healthy.events == [event]  # replay is for that group only


@ensure
async def test_a_failing_key_listener_does_not_stop_the_others(bus) -> None:
    box = uuid.uuid4()
    raising = Recorder(fail_times=10**6)
    deferred_failure = Recorder(fail_times=10**6, fail_with_deferred=True)
    good = Recorder()
    group = Recorder()
    await bus.register(raising, str(box))
    await bus.register(deferred_failure, str(box))
    await bus.register(good, str(box))
    await bus.register_group(group, "g")
    events = [added(box, 1), added(box, 2)]
    for event in events:
        await bus.dispatch(event)
    await wait_until(lambda: len(good.events) == 2 and len(group.events) == 2, "the events")
    await settle(bus)
    assert good.events == events
    assert sorted(e.event_id for e in group.events) == sorted(e.event_id for e in events)
    # The failing listeners stay registered and are called for each event.
    assert [e for _, e in raising.calls] == events
    assert [e for _, e in deferred_failure.calls] == events


@ensure
async def test_stop_cancels_pending_retries(bus, bus_settings) -> None:
    """A stopped node runs no listener any more, not even a retry scheduled before."""
    listener = Recorder(fail_times=10**6)
    await bus.register_group(listener, "g")
    await bus.dispatch(added(uuid.uuid4(), 1))
    await wait_until(lambda: listener.calls, "the first attempt")
    await bus.stop()
    attempts = len(listener.calls)
    await sleep(bus_settings.max_backoff * 2)
    assert len(listener.calls) == attempts
