"""LoginGuard's admission: held sources, accounts, the check slots and their queue."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from twisted_mail_cluster import login_guard
from twisted_mail_cluster.login_guard import LoginGuard, LoginThrottled

LOOPBACK = [ipaddress.ip_network("127.0.0.0/8")]


def guard(clock: Clock, **limits: int) -> LoginGuard:
    return LoginGuard(clock, LOOPBACK, failed_login_delay=2.0, max_failed_login_delay=30.0, **limits)


def outcome(d: Deferred[object]) -> object:
    """What a Deferred fired with now: its result, a Failure, or None if it has not fired."""
    box: list[object] = []

    def keep(result: object) -> None:
        box.append(result)  # and end the chain here: a Failure is handled, by this test

    d.addBoth(keep)
    d.addBoth(lambda _: box[0] if box else None)  # looked at again later: the same outcome
    return box[0] if box else None


def test_an_address_is_held_for_the_delay_of_its_last_failure() -> None:
    clock = Clock()
    g = guard(clock)
    assert g.failed("192.0.2.1", "a@x") == 2.0
    held = outcome(g.admit("192.0.2.1", "a@x"))
    assert isinstance(held, Failure) and held.check(LoginThrottled)
    assert not isinstance(outcome(g.admit("192.0.2.2", "b@x")), Failure)  # another address
    clock.advance(2.0)
    assert not isinstance(outcome(g.admit("192.0.2.1", "a@x")), Failure)
    assert g.failed("192.0.2.1", "a@x") == 4.0  # doubling within the window


def test_an_account_is_held_after_a_few_failures_except_for_its_known_addresses() -> None:
    clock = Clock()
    g = guard(clock)
    g.succeeded("198.51.100.7", "alice@x")  # the owner's address
    for n in range(login_guard.ACCOUNT_HOLD_AFTER - 1):
        g.failed(f"192.0.2.{n}", "alice@x")
    assert not isinstance(outcome(g.admit("203.0.113.1", "Alice@X")), Failure)  # a typo or two hold nobody
    g.failed("192.0.2.99", "alice@x")
    held = outcome(g.admit("203.0.113.1", "alice@x"))
    assert isinstance(held, Failure) and held.value.reason == "failed logins to this account"
    assert not isinstance(outcome(g.admit("198.51.100.7", "alice@x")), Failure)


def test_logins_over_the_slots_wait_in_order_and_are_looked_at_again() -> None:
    clock = Clock()
    g = guard(clock, max_checks_per_address=2)
    first, second = outcome(g.admit("192.0.2.1", "a")), outcome(g.admit("192.0.2.1", "b"))
    third, fourth = g.admit("192.0.2.1", "c"), g.admit("192.0.2.1", "d")
    assert outcome(third) is None and outcome(fourth) is None  # waiting, not refused
    assert not isinstance(outcome(g.admit("192.0.2.9", "z")), Failure)  # other addresses have room
    g.failed("192.0.2.1", "a")  # the first check failed: the address is held...
    first.release()  # type: ignore[attr-defined]  # outcome() is typed object
    for waiting in (third, fourth):  # ...so those who waited are refused unchecked
        refused = outcome(waiting)
        assert isinstance(refused, Failure) and refused.check(LoginThrottled)
    second.release()  # type: ignore[attr-defined]
    clock.advance(2)
    assert not isinstance(outcome(g.admit("192.0.2.1", "e")), Failure)


def test_the_queue_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(login_guard, "MAX_WAITING_PER_ADDRESS", 2)
    g = guard(Clock(), max_checks_per_address=1)
    g.admit("192.0.2.1", "a")
    waiting = [g.admit("192.0.2.1", "b"), g.admit("192.0.2.1", "c")]
    assert all(outcome(w) is None for w in waiting)
    refused = outcome(g.admit("192.0.2.1", "d"))
    assert isinstance(refused, Failure) and refused.value.reason == "too many logins at once"


def test_a_woken_login_takes_its_slot_before_anyone_runs() -> None:
    clock = Clock()
    g = guard(clock, max_checks_per_address=1)
    holder = outcome(g.admit("192.0.2.1", "a"))
    waiters = [g.admit("192.0.2.1", str(n)) for n in range(3)]
    holder.release()  # type: ignore[attr-defined]
    assert [outcome(w) is None for w in waiters] == [False, True, True]  # one slot, one woken
