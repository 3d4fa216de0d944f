"""The event bus of a single node: listeners in this process, nothing else.

Listeners are called in a later reactor turn, never inside ``dispatch``: a
session that triggers an event (say, an IMAP STORE) must finish its own
command before it hears about it, exactly as it would with RabbitMQ in
between.  Events go through ``encode``/``decode`` so that the in-process bus
exercises the same wire format as the cluster bus.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field

import structlog
from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure
from zope.interface import implementer

from .groups import GroupMembers, Listener
from .interfaces import IEventBus, IRegistration
from .model import Event, UnknownEvent, decode, encode

log = structlog.get_logger(__name__)


@implementer(IRegistration)
@dataclass
class _Registration:
    _remove: Callable[[], None]
    _done: bool = False

    def unregister(self) -> Deferred[None]:
        if not self._done:
            self._done = True
            self._remove()
        return succeed(None)


@dataclass
class _Group(GroupMembers):
    #: Events that exhausted their retries, until replayed.
    dead: list[Event] = field(default_factory=list)


@implementer(IEventBus)
class InProcessEventBus:
    """IEventBus for one node."""

    def __init__(
        self,
        reactor: IReactorTime,
        retries: int = 5,
        first_backoff: float = 0.1,
        max_backoff: float = 10.0,
    ) -> None:
        self._reactor = reactor
        self._retries = retries
        self._first_backoff = first_backoff
        self._max_backoff = max_backoff
        self._keyed: dict[str, list[Listener]] = defaultdict(list)
        self._pending: list[IDelayedCall] = []
        self._groups: dict[str, _Group] = defaultdict(_Group)

    def start(self) -> Deferred[None]:
        return succeed(None)

    def stop(self) -> Deferred[None]:
        """Cancel scheduled retries: the node is going away, and nothing must run after it."""
        for call in self._pending:
            if call.active():
                call.cancel()
        self._pending.clear()
        return succeed(None)

    def dispatch(self, event: Event) -> Deferred[None]:
        payload = encode(event)
        self._reactor.callLater(0, self._deliver, payload)
        return succeed(None)

    def connected(self) -> bool:
        return True

    def generation(self) -> int:
        return 0  # nothing in between can lose an event

    def register(self, listener: Listener, key: str) -> Deferred[IRegistration]:
        self._keyed[key].append(listener)

        def remove() -> None:
            listeners = self._keyed.get(key, [])
            if listener in listeners:
                listeners.remove(listener)
            if not listeners:
                self._keyed.pop(key, None)

        return succeed(_Registration(remove))

    def register_group(self, listener: Listener, group: str) -> Deferred[IRegistration]:
        self._groups[group].listeners.append(listener)
        return succeed(_Registration(lambda: self._groups[group].listeners.remove(listener)))

    def dead_letters(self, group: str) -> Deferred[list[Event]]:
        return succeed(list(self._groups[group].dead))

    def replay_dead_letters(self, group: str) -> Deferred[int]:
        dead, self._groups[group].dead = self._groups[group].dead, []
        for event in dead:
            self._run_group(group, event, attempt=0)
        return succeed(len(dead))

    def bindings(self) -> int:
        """How many mailbox keys have at least one listener (for tests and metrics)."""
        return len(self._keyed)

    def _deliver(self, payload: bytes) -> None:
        try:
            event = decode(payload)
        except UnknownEvent as e:
            log.warning("event.skipped", reason=str(e))
            return
        for listener in list(self._keyed.get(event.key, ())):
            maybeDeferred(listener, event).addErrback(self._listener_failed, event)
        for group in list(self._groups):
            self._run_group(group, event, attempt=0)

    def _listener_failed(self, failure: Failure, event: Event) -> None:
        log.error("event.listener_failed", event_type=event.kind, error=failure.getErrorMessage())

    def _run_group(self, group: str, event: Event, attempt: int) -> None:
        listener = self._groups[group].pick()
        if listener is None:
            return
        d = maybeDeferred(listener, event)
        d.addErrback(self._group_failed, group, event, attempt)

    def _group_failed(self, failure: Failure, group: str, event: Event, attempt: int) -> None:
        if attempt >= self._retries:
            log.error(
                "event.dead_letter", group=group, event_type=event.kind,
                error=failure.getErrorMessage(),
            )
            self._groups[group].dead.append(event)
            return
        delay = min(self._first_backoff * (2**attempt), self._max_backoff)
        log.warning(
            "event.retry", group=group, event_type=event.kind, attempt=attempt + 1,
            delay=delay, error=failure.getErrorMessage(),
        )
        self._pending = [c for c in self._pending if c.active()]
        self._pending.append(self._reactor.callLater(delay, self._run_group, group, event, attempt + 1))
