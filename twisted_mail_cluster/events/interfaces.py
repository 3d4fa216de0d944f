"""The event bus contract (DESIGN.md, "Event bus").

Two kinds of listener:

* *key* listeners, registered under a mailbox id, get every event of that
  mailbox on every node where they are registered: IMAP sessions use them to
  learn of changes made elsewhere;
* *group* listeners run once per cluster for each event, at least once, with
  retries and a dead-letter place for events that keep failing.

The bus is a notification channel, not the truth: the store is.  If the bus is
down, dispatch fails but the change it reports is already stored, and
sessions catch up from the store at their next command.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from zope.interface import Interface

from .groups import Listener
from .model import Event


class IRegistration(Interface):
    def unregister() -> Deferred[None]:
        """Stop delivering to this listener; fire when done.  Idempotent."""


class IEventBus(Interface):
    def start() -> Deferred[None]:
        """Connect; fire when the bus can take registrations."""

    def stop() -> Deferred[None]:
        """Disconnect; fire when done."""

    def dispatch(event: Event) -> Deferred[None]:
        """Send an event to its key listeners and to every group; fire when handed over."""

    def register(listener: Listener, key: str) -> Deferred[IRegistration]:
        """Call ``listener(event)`` for every event with this key.

        Fire with an IRegistration once events are routed to the listener (a
        cluster bus has to bind first), so that a caller that registers and
        then reads the store misses nothing that happens after its read.
        """

    def register_group(listener: Listener, group: str) -> Deferred[IRegistration]:
        """Call ``listener(event)`` once per cluster per event, at least once.

        Fire with an IRegistration once the listener consumes.
        A listener that fails (raises, or returns a Deferred that fails) is
        retried with backoff; after the last retry the event goes to the
        group's dead letters, which an admin can list and replay.
        """

    def connected() -> bool:
        """Whether events flow now.  While they do not, sessions must not wait
        for events: they resynchronise from the store at every command."""

    def generation() -> int:
        """A number that changes each time events start flowing again (a cluster
        bus reconnected and re-bound).  Events dispatched before that may never
        have arrived, so a listener that last looked at the store under another
        generation must look again."""

    def dead_letters(group: str) -> Deferred[list[Event]]:
        """Fire with the events of a group that exhausted their retries."""

    def replay_dead_letters(group: str) -> Deferred[int]:
        """Dispatch a group's dead letters to it again; fire with how many."""
