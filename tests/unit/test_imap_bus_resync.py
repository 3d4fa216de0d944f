"""IMAP sessions when events are lost: the bus reconnected (generation changed) or is down.

A cluster bus loses the events dispatched while a node's queue was gone; the
session must then look at the store itself: at its next command, and within
IDLE_CHECK seconds while in IDLE (not only at the 30 s IDLE_POLL).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import deferLater

from tests.helpers.imap import SIMPLE
from tests.helpers.node import DOMAIN, PASSWORD, listen, make_config, stop
from tests.unit.test_imap import RawClient, in_thread
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.events.model import Event
from twisted_mail_cluster.imap import server as imap_server
from twisted_mail_cluster.imap.server import IDLE_CHECK, IDLE_POLL, IMAPFactory
from twisted_mail_cluster.node import Node, build_node
from twisted_mail_cluster.store.embedded import EmbeddedStore

ALICE = f"alice@{DOMAIN}"


class LossyBus(InProcessEventBus):
    """An in-process bus that can drop events and be 'reconnected' or 'down' on demand."""

    def __init__(self) -> None:
        super().__init__(reactor)
        self.dropping = False
        self.up = True
        self.reconnections = 0

    def dispatch(self, event: Event) -> Deferred[None]:
        if self.dropping:
            return succeed(None)
        return super().dispatch(event)

    def connected(self) -> bool:
        return self.up

    def generation(self) -> int:
        return self.reconnections


async def _node(tmp_path: Path, bus: LossyBus) -> Node:
    store = EmbeddedStore(tmp_path / "mailcluster.sqlite3", reactor)
    await store.start()
    node = build_node(make_config(tmp_path), store, bus, reactor)  # type: ignore[arg-type]
    await node.accounts.add_domain(DOMAIN)
    await node.accounts.add_user(ALICE, PASSWORD)
    return node


@pytest.fixture
def lossy(tmp_path: Path) -> Iterator[tuple[Node, LossyBus, int]]:
    bus = LossyBus()
    node = pytest_twisted.blockon(Deferred.fromCoroutine(_node(tmp_path, bus)))
    port_number, port = listen(IMAPFactory(node))
    yield node, bus, port_number
    pytest_twisted.blockon(stop(port, node))


async def deliver(node: Node) -> Any:
    prepared = await node.mailboxes.prepare(SIMPLE)
    return await node.mailboxes.deliver(prepared, [(await node.accounts.inbox(ALICE), frozenset())])


async def selected_session(port: int) -> RawClient:
    raw: RawClient = await in_thread(RawClient, port)
    await in_thread(raw.login, ALICE)
    selected = await in_thread(raw.command, b"S", b"SELECT INBOX")
    assert b"* 1 EXISTS\r\n" in selected
    return raw


@pytest_twisted.ensureDeferred
async def test_idle_looks_at_the_store_soon_after_the_bus_reconnected(lossy: tuple[Node, LossyBus, int]) -> None:
    node, bus, port = lossy
    await deliver(node)
    raw = await selected_session(port)
    raw.send(b"I IDLE\r\n")
    await in_thread(raw.read_until, b"+ idling\r\n")
    bus.dropping = True  # the node's queue is gone: this delivery's event is lost
    await deliver(node)
    bus.dropping = False
    bus.reconnections += 1  # the bus is back, bound again
    # within IDLE_CHECK, not IDLE_POLL
    assert IDLE_CHECK + 1.5 < IDLE_POLL
    exists = await in_thread(raw.read_until, b"* 2 EXISTS\r\n", IDLE_CHECK + 1.5)
    assert exists == b"* 2 EXISTS\r\n"
    # from then on, events again: a delivery is announced at once
    await deliver(node)
    assert await in_thread(raw.read_until, b"* 3 EXISTS\r\n", 1.0) == b"* 2 RECENT\r\n* 3 EXISTS\r\n"
    raw.send(b"DONE\r\n")
    assert (await in_thread(raw.read_tagged, b"I")).endswith(b"I OK Idle completed.\r\n")
    raw.close()


@pytest_twisted.ensureDeferred
async def test_any_command_looks_at_the_store_after_the_bus_reconnected(lossy: tuple[Node, LossyBus, int]) -> None:
    node, bus, port = lossy
    await deliver(node)
    raw = await selected_session(port)
    bus.dropping = True
    await deliver(node)
    bus.dropping = False
    # no event came and the bus did not change: a FETCH reports nothing new
    fetched = await in_thread(raw.command, b"F1", b"FETCH 1 (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\nF1 OK Fetch completed.\r\n"
    bus.reconnections += 1
    fetched = await in_thread(raw.command, b"F2", b"FETCH 1 (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\n* 2 EXISTS\r\n* 2 RECENT\r\nF2 OK Fetch completed.\r\n"
    # once looked, the same generation does not make every command read the store again
    assert await in_thread(raw.command, b"F3", b"FETCH 2 (UID)") == b"* 2 FETCH (UID 2)\r\nF3 OK Fetch completed.\r\n"
    raw.close()


@pytest_twisted.ensureDeferred
async def test_while_the_bus_is_down_every_command_and_idle_check_looks(lossy: tuple[Node, LossyBus, int]) -> None:
    node, bus, port = lossy
    await deliver(node)
    raw = await selected_session(port)
    bus.up, bus.dropping = False, True
    await deliver(node)
    fetched = await in_thread(raw.command, b"F", b"FETCH 1 (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\n* 2 EXISTS\r\n* 2 RECENT\r\nF OK Fetch completed.\r\n"
    raw.send(b"I IDLE\r\n")
    await in_thread(raw.read_until, b"+ idling\r\n")
    await deliver(node)
    assert await in_thread(raw.read_until, b"* 3 EXISTS\r\n", IDLE_CHECK + 1.5) == b"* 3 EXISTS\r\n"
    raw.send(b"DONE\r\n")
    await in_thread(raw.read_tagged, b"I")
    raw.close()


@pytest_twisted.ensureDeferred
async def test_a_session_that_has_not_looked_for_idle_poll_seconds_looks(
    lossy: tuple[Node, LossyBus, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An event can be lost at its sender (its node's bus was down when it made the
    change): no generation moves anywhere, so the session also looks at the store
    when its last look is IDLE_POLL seconds old, at its next command."""
    monkeypatch.setattr(imap_server, "IDLE_POLL", 3.0)
    node, bus, port = lossy
    await deliver(node)
    raw = await selected_session(port)
    bus.dropping = True
    await deliver(node)
    fetched = await in_thread(raw.command, b"F1", b"FETCH 1 (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\nF1 OK Fetch completed.\r\n"  # looked less than 3 s ago
    await deferLater(reactor, 3.1, lambda: None)
    fetched = await in_thread(raw.command, b"F2", b"FETCH 1 (UID)")
    assert fetched == b"* 1 FETCH (UID 1)\r\n* 2 EXISTS\r\n* 2 RECENT\r\nF2 OK Fetch completed.\r\n"
    raw.close()
