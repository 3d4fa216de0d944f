"""SMTP test rig: a node on a faulty-able store, our server or plain Twisted's, raw clients.

``start(server="twisted")`` serves the same node with Twisted's own
``ESMTP`` and a straightforward ``IMessageDelivery`` over the same lookups
(one ``IMessage`` per recipient, as Twisted's design has it).  Tests of a
fix run against both; the Twisted run is a strict xfail, so each such test
is shown to fail on plain Twisted.  ``tests/conftest.py`` loads this module
as a pytest plugin, so test modules take the ``start`` fixture as an argument
without importing it.
"""

from __future__ import annotations

import smtplib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IListeningPort
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.mail import smtp
from twisted.mail._cred import LOGINCredentials, PLAINCredentials
from zope.interface import implementer

from tests.helpers import node as helpers
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.names import normalise_address
from twisted_mail_cluster.node import Node, build_node
from twisted_mail_cluster.smtp.delivery import LocalDelivery, Recipient
from twisted_mail_cluster.smtp.server import SMTPFactory
from twisted_mail_cluster.store.embedded import EmbeddedStore

DOMAIN = helpers.DOMAIN
PASSWORD = helpers.PASSWORD
ALICE, BOB, CAROL = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))
SENDER = "sender@remote.test"
HOSTNAME = "mx.example.test"

T = TypeVar("T")

#: Parametrise a test of a fix with this: it must pass on ours and fail on Twisted's.
SERVERS = [
    "ours",
    pytest.param(
        "twisted",
        marks=pytest.mark.xfail(strict=True, reason="a gap of twisted.mail.smtp.ESMTP"),
    ),
]

MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Line one\r\n"
    b"Line two\r\n"
)


class FaultyStore:
    """The real store, with failures and delays switched on by a test."""

    def __init__(self, inner: EmbeddedStore) -> None:
        self._inner = inner
        self.deliver_error: Exception | None = None
        self.lookup_error: Exception | None = None
        self.lookup_delays: dict[str, float] = {}
        self.deliveries = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def deliver(self, *args: Any) -> Deferred[Any]:
        self.deliveries += 1
        if self.deliver_error is not None:
            return fail(self.deliver_error)
        return self._inner.deliver(*args)

    def get_user(self, address: str) -> Deferred[Any]:
        return Deferred.fromCoroutine(self._get_user(address))

    async def _get_user(self, address: str) -> Any:
        if self.lookup_error is not None:
            raise self.lookup_error
        delay = self.lookup_delays.get(address)
        if delay:
            await deferLater(reactor, delay, lambda: None)
        return await self._inner.get_user(address)


# -- plain Twisted, the baseline ---------------------------------------------------------


@implementer(smtp.IMessage)
class _TwistedMessage:
    def __init__(self, local: LocalDelivery, address: str) -> None:
        self._local = local
        self._address = address
        self._lines: list[bytes] = []

    def lineReceived(self, line: bytes) -> None:
        self._lines.append(line)

    def eomReceived(self) -> Deferred[Any]:
        return self._local.deliver(b"\r\n".join(self._lines) + b"\r\n", [self._address])

    def connectionLost(self) -> None:
        self._lines = []


@implementer(smtp.IMessageDelivery)
class _TwistedDelivery:
    """The obvious IMessageDelivery over the same recipient rules."""

    def __init__(self, node: Node) -> None:
        self._local = LocalDelivery(node)

    def receivedHeader(self, helo: Any, origin: Any, recipients: Any) -> None:
        return None

    def validateFrom(self, helo: Any, origin: smtp.Address) -> smtp.Address:
        return origin

    def validateTo(self, user: smtp.User) -> Deferred[Callable[[], _TwistedMessage]]:
        address = normalise_address(str(user.dest))

        def check(result: tuple[Recipient, str]) -> Callable[[], _TwistedMessage]:
            kind, owner = result
            if kind is not Recipient.LOCAL:
                raise smtp.SMTPBadRcpt(user)
            return lambda: _TwistedMessage(self._local, owner)

        return self._local.classify(address).addCallback(check)


class PlainTwistedFactory(smtp.SMTPFactory):
    """Twisted's ESMTP with our portal and our recipient rules."""

    def __init__(self, ours: SMTPFactory) -> None:
        super().__init__(ours.portal)
        self.node = ours.node
        self.domain = HOSTNAME.encode()

    def buildProtocol(self, addr: Any) -> smtp.ESMTP:
        protocol = smtp.ESMTP(chal={b"PLAIN": PLAINCredentials, b"LOGIN": LOGINCredentials})
        protocol.delivery = _TwistedDelivery(self.node)
        protocol.portal = self.portal
        protocol.host = self.domain
        protocol.factory = self
        return protocol


# -- the server under test ---------------------------------------------------------------


@dataclass
class Server:
    node: Node
    store: FaultyStore
    port: int
    listening: IListeningPort
    clock: Clock | None = None

    def raw(self) -> RawClient:
        return RawClient(self.port)

    def smtp(self) -> smtplib.SMTP:
        return smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example", timeout=10)

    async def inbox(self, address: str) -> list[bytes]:
        """The stored content of every message in the user's INBOX, oldest first."""
        return [content for _, content in await self.inbox_entries(address)]

    async def inbox_entries(self, address: str) -> list[tuple[Any, bytes]]:
        inbox = await self.node.accounts.inbox(address)
        entries = await self.node.store.pop3_list(inbox.id)
        infos = await self.node.store.message_info([e.message_id for e in entries])
        found = []
        for entry in entries:
            info = infos[entry.message_id]
            with await self.node.store.open_content(info.blob_id) as f:
                found.append((info, f.read()))
        return found


Start = Callable[..., Awaitable[Server]]


@pytest_twisted.async_yield_fixture
async def start(tmp_path: Path) -> AsyncIterator[Start]:
    """``await start(server="ours"|"twisted", clock=False, trusted=True, smtp=SmtpConfig(...))``.

    ``clock=True`` gives the node a ``Clock`` as its reactor (login delays,
    idle timeouts) while the store, the bus and the sockets use the real one.
    """
    servers: list[Server] = []
    stores: list[EmbeddedStore] = []

    async def starter(
        server: str = "ours", *, clock: bool = False, trusted: bool = True, **sections: Any
    ) -> Server:
        inner = EmbeddedStore(tmp_path / f"store{len(stores)}.sqlite3", reactor)
        stores.append(inner)  # closed even if the rest of the set-up fails
        await inner.start()
        store = FaultyStore(inner)
        node_reactor: Any = Clock() if clock else reactor
        config = helpers.make_config(tmp_path, trusted=trusted, **sections)
        node = build_node(config, store, InProcessEventBus(reactor), node_reactor)  # type: ignore[arg-type]
        await node.accounts.add_domain(DOMAIN)
        for user in (ALICE, BOB, CAROL):
            await node.accounts.add_user(user, PASSWORD)
        factory: Any = SMTPFactory(node)
        if server == "twisted":
            factory = PlainTwistedFactory(factory)
        listening = reactor.listenTCP(0, factory, interface="127.0.0.1")
        started = Server(node, store, listening.getHost().port, listening, node_reactor if clock else None)
        servers.append(started)
        return started

    yield starter
    while RawClient.opened:
        RawClient.opened.pop().close()
    for server in servers:
        await server.listening.stopListening()
    for store in stores:
        await store.close()


def in_thread(f: Callable[..., T], *args: Any) -> Deferred[T]:
    return deferToThread(f, *args)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.01, lambda: None)


# -- a client that shows exact bytes -------------------------------------------------------


class RawClient:
    """Blocking socket client (use it in a thread): send bytes, read whole replies."""

    #: Every socket opened, so the fixture closes whatever a failed test left open.
    opened: list[socket.socket] = []

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        RawClient.opened.append(self.sock)
        self.buffer = b""
        self.greeting = self.reply()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> str:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed, unread: {self.buffer!r}")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return line.decode("ascii")

    def reply(self) -> list[str]:
        """One reply, all of its lines ("250-..." ... "250 ...")."""
        lines = [self.line()]
        while len(lines[-1]) > 3 and lines[-1][3] == "-":
            lines.append(self.line())
        return lines

    def replies(self, n: int) -> list[str]:
        """``n`` single-line replies."""
        found = []
        for _ in range(n):
            lines = self.reply()
            assert len(lines) == 1, lines
            found.append(lines[0])
        return found

    def command(self, line: bytes) -> str:
        self.send(line + b"\r\n")
        return self.replies(1)[0]

    def hello(self) -> list[str]:
        self.send(b"EHLO client.example\r\n")
        return self.reply()

    def nothing_within(self, seconds: float) -> bool:
        """Whether no byte arrives for ``seconds``."""
        if self.buffer:
            return False
        self.sock.settimeout(seconds)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            return True
        finally:
            self.sock.settimeout(10)
        self.buffer += chunk
        return False

    def closed(self) -> bool:
        """Whether the server has closed the connection (after any unread data)."""
        return not self.buffer and self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


def codes(replies: list[str]) -> list[int]:
    return [int(reply[:3]) for reply in replies]
