"""IMAP test rig: a raw wire client, exact-bytes matching, and two servers to point it at.

* ``RawImap`` is a blocking socket client meant to run in a thread (the test
  reactor serves it meanwhile).  It returns exactly what the server sent.
* ``assert_wire(actual, *parts)`` checks a transcript byte for byte, where
  only the human-readable ``resp-text`` may vary (``TEXT``) and numbers the
  test cannot know may be matched by ``NUM``: protocol bytes are exact.
* ``start_site("ours")`` serves a real node with our ``IMAPFactory``;
  ``start_site("twisted")`` serves plain ``twisted.mail.imap4.IMAP4Server``
  over an honest in-memory account (``MemoryImapAccount``) whose ``select``
  answers in a later reactor turn, as any real store does.  Both have the
  same user, password and mailboxes, so one scenario runs against both.
* The ``make_site`` fixture starts sites of either kind and stops them after
  the test; ``tests/conftest.py`` loads this module as a pytest plugin, so
  tests take it as an argument without importing it.

Steps that must happen in the reactor (deliveries, reading the store) are
run from the client thread with ``Site.call``.
"""

from __future__ import annotations

import email.parser
import email.policy
import email.utils
import io
import re
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from twisted.cred.checkers import InMemoryUsernamePasswordDatabaseDontUse
from twisted.cred.portal import IRealm, Portal
from twisted.internet import reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import blockingCallFromThread, deferToThread
from twisted.mail import imap4
from twisted.mail._cred import PLAINCredentials
from zope.interface import implementer

from tests.helpers import node as helpers
from twisted_mail_cluster.imap.server import IMAPFactory
from twisted_mail_cluster.node import Node

T = TypeVar("T")

DOMAIN = helpers.DOMAIN
PASSWORD = helpers.PASSWORD
ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"

#: Any resp-text (the human-readable end of a status line).
TEXT = object()
#: Any decimal number (a UIDVALIDITY, say).
NUM = object()
#: Any bytes at all, lines included (what comes before the part under test).
ANYTHING = object()

SIMPLE = (
    b"From: Bob <bob@example.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: Hello there\r\n"
    b"Date: Mon, 7 Feb 1994 21:52:25 -0800\r\n"
    b"Message-ID: <1@example.test>\r\n"
    b"\r\n"
    b"Body line one\r\n"
    b"Body line two\r\n"
)


def gap(reason: str) -> list[Any]:
    """Parametrise a test of one fix: it must pass on ours and fail on plain Twisted.

    The Twisted run must fail on an assertion about the protocol, not on a
    timeout or a crash of the test, so ``raises`` is pinned.
    """
    return [
        "ours",
        pytest.param(
            "twisted",
            marks=pytest.mark.xfail(strict=True, raises=AssertionError, reason="Twisted gap: " + reason),
        ),
    ]


# -- exact matching ------------------------------------------------------------------------


def wire_pattern(*parts: bytes | object) -> re.Pattern[bytes]:
    """A regex for a transcript: bytes are literal, TEXT is a resp-text, NUM a number."""
    pieces = []
    for part in parts:
        if part is TEXT:
            pieces.append(rb"[^\r\n]*")
        elif part is NUM:
            pieces.append(rb"[0-9]+")
        elif part is ANYTHING:
            pieces.append(rb".*?")
        elif isinstance(part, bytes):
            pieces.append(re.escape(part))
        else:
            raise TypeError(f"not a transcript part: {part!r}")
    return re.compile(b"".join(pieces), re.DOTALL)


def assert_wire(actual: bytes, *parts: bytes | object) -> None:
    """The whole of ``actual`` must be exactly ``parts`` (TEXT/NUM aside)."""
    if wire_pattern(*parts).fullmatch(actual) is None:
        names = {id(TEXT): b"<text>", id(NUM): b"<n>", id(ANYTHING): b"<...>"}
        shown = b"".join(names.get(id(p), p) for p in parts)  # type: ignore[misc]
        raise AssertionError(
            "transcript mismatch\n--- expected\n" + shown.decode("latin-1")
            + "\n--- actual\n" + actual.decode("latin-1")
        )


def wire_contains(actual: bytes, *parts: bytes | object) -> bool:
    return wire_pattern(*parts).search(actual) is not None


# -- a raw client ---------------------------------------------------------------------------


class RawImap:
    """IMAP over a plain blocking socket: exact bytes both ways, every read bounded in time."""

    #: Every socket opened, so that a fixture can close whatever a test left open.
    opened: list[socket.socket] = []

    def __init__(self, port: int, timeout: float = 10.0, receive_buffer: int | None = None) -> None:
        """``receive_buffer`` shrinks SO_RCVBUF, so that a client that reads slowly
        (or not at all) makes the server's writes back up quickly."""
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        RawImap.opened.append(self.sock)
        if receive_buffer is not None:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        self.sock.settimeout(timeout)
        self.sock.connect(("127.0.0.1", port))
        self.timeout = timeout
        self.buffer = b""
        self.greeting = self.line()

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("waited too long; got so far: " + self.buffer.decode("latin-1"))
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("waited too long; got so far: " + self.buffer.decode("latin-1")) from None
        if not chunk:
            raise EOFError(self.buffer)
        self.buffer += chunk

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self, timeout: float | None = None) -> bytes:
        """One line, CRLF included (a literal announced at its end is *not* read)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while b"\r\n" not in self.buffer:
            self._fill(deadline)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def exactly(self, size: int, timeout: float | None = None) -> bytes:
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while len(self.buffer) < size:
            self._fill(deadline)
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def response_line(self, timeout: float | None = None) -> bytes:
        """One response line with any literals it carries."""
        out = b""
        while True:
            line = self.line(timeout)
            out += line
            literal = re.search(rb"\{(\d+)\}\r\n\Z", line)
            if literal is None:
                return out
            out += self.exactly(int(literal.group(1)), timeout)

    def until_tagged(self, *tags: bytes, timeout: float | None = None) -> bytes:
        """Everything up to and including the tagged replies of all ``tags``."""
        pending = set(tags)
        out = b""
        while pending:
            line = self.response_line(timeout)
            out += line
            for tag in list(pending):
                if line.startswith(tag + b" "):
                    pending.discard(tag)
        return out

    def until(self, marker: bytes, timeout: float | None = None) -> bytes:
        """Everything up to and including ``marker``."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while marker not in self.buffer:
            self._fill(deadline)
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def command(self, tag: bytes, text: bytes) -> bytes:
        self.send(tag + b" " + text + b"\r\n")
        return self.until_tagged(tag)

    def login(self, user: str = ALICE, password: str = PASSWORD) -> bytes:
        response = self.command(b"L", b'LOGIN "' + user.encode() + b'" "' + password.encode() + b'"')
        assert response.startswith(b"L OK"), response
        return response

    def select(self, mailbox: bytes = b"INBOX") -> bytes:
        response = self.command(b"S", b"SELECT " + mailbox)
        assert b"\r\nS OK" in b"\r\n" + response, response
        return response

    def rest(self, timeout: float | None = None) -> bytes:
        """Everything until the server closes the connection."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        try:
            while True:
                self._fill(deadline)
        except EOFError:
            pass
        data, self.buffer = self.buffer, b""
        return data

    def close(self) -> None:
        self.sock.close()


# -- plain Twisted over an honest in-memory account -------------------------------------------


@implementer(imap4.IMessage, imap4.IMessageFile)
class MemoryMessage:
    """A single-part message held in memory, as ``IMessage`` describes it."""

    def __init__(self, raw: bytes, uid: int, flags: Iterable[str], date: float) -> None:
        self.raw = raw
        self.uid = uid
        self.flags = set(flags)
        self.date = date
        parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw)
        self._headers = [(name, str(value)) for name, value in parsed.items()]
        index = raw.find(b"\r\n\r\n")
        self._body = raw[index + 4:] if index >= 0 else b""

    def getHeaders(self, negate: bool, *names: str | bytes) -> dict[str, str]:
        wanted = {(n.decode() if isinstance(n, bytes) else n).lower() for n in names}
        return {k.lower(): v for k, v in self._headers if (k.lower() in wanted) != negate}

    def getBodyFile(self) -> io.BytesIO:
        return io.BytesIO(self._body)

    def getSize(self) -> int:
        return len(self.raw)

    def isMultipart(self) -> bool:
        return False

    def getSubPart(self, part: int) -> Any:
        raise TypeError("not a multipart message")

    def getUID(self) -> int:
        return self.uid

    def getFlags(self) -> list[str]:
        return sorted(self.flags)

    def getInternalDate(self) -> str:
        return email.utils.formatdate(self.date)

    def open(self) -> io.BytesIO:
        return io.BytesIO(self.raw)


SYSTEM_FLAGS = ["\\Answered", "\\Flagged", "\\Deleted", "\\Seen", "\\Draft"]


@implementer(imap4.IMailbox)
class MemoryMailbox:
    """One mailbox: UIDs, flags, listeners; what Twisted's IMailbox asks for, honestly done.

    It does not provide ``ISearchableMailbox``: SEARCH is then evaluated by
    Twisted's server itself, which is the code we would ship.
    """

    def __init__(self, name: str, uidvalidity: int) -> None:
        self.name = name
        self.uidvalidity = uidvalidity
        self.messages: list[MemoryMessage] = []
        self.next_uid = 1
        self.listeners: list[Any] = []

    def getFlags(self) -> list[str]:
        return list(SYSTEM_FLAGS)

    def getHierarchicalDelimiter(self) -> str:
        return "/"

    def getUIDValidity(self) -> int:
        return self.uidvalidity

    def getUIDNext(self) -> int:
        return self.next_uid

    def getUID(self, message: int) -> int:
        return self.messages[message - 1].uid

    def getMessageCount(self) -> int:
        return len(self.messages)

    def getRecentCount(self) -> int:
        return 0

    def getUnseenCount(self) -> int:
        return sum(1 for m in self.messages if "\\Seen" not in m.flags)

    def isWriteable(self) -> bool:
        return True

    def destroy(self) -> None:
        self.messages.clear()

    def requestStatus(self, names: Iterable[str]) -> dict[str, int]:
        return imap4.statusRequestHelper(self, names)

    def addListener(self, listener: Any) -> None:
        self.listeners.append(listener)

    def removeListener(self, listener: Any) -> None:
        self.listeners.remove(listener)

    def add(self, raw: bytes, flags: Iterable[str] = (), date: float | None = None) -> int:
        """Store a message and tell the listeners, as a delivery would; return its UID."""
        message = MemoryMessage(raw, self.next_uid, flags, time.time() if date is None else date)
        self.next_uid += 1
        self.messages.append(message)
        for listener in list(self.listeners):
            listener.newMessages(len(self.messages), None)
        return message.uid

    def addMessage(self, message: Any, flags: Iterable[str | bytes], date: Any = None) -> Deferred[int]:
        raw = message.read()
        names = [f.decode() if isinstance(f, bytes) else f for f in flags]
        return deferLater(reactor, 0, self.add, raw, names)

    def expunge(self) -> list[int]:
        """Remove \\Deleted messages; return the sequence numbers as EXPUNGE must report them."""
        removed: list[int] = []
        kept: list[MemoryMessage] = []
        for seq, message in enumerate(self.messages, start=1):
            if "\\Deleted" in message.flags:
                removed.append(seq - len(removed))
            else:
                kept.append(message)
        self.messages = kept
        return removed

    def _select(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, MemoryMessage]]:
        if uid:
            messages.last = self.messages[-1].uid if self.messages else 0
            return [(seq, m) for seq, m in enumerate(self.messages, start=1) if m.uid in messages]
        messages.last = len(self.messages)
        return [(seq, m) for seq, m in enumerate(self.messages, start=1) if seq in messages]

    def fetch(self, messages: imap4.MessageSet, uid: bool) -> list[tuple[int, MemoryMessage]]:
        return self._select(messages, uid)

    def store(self, messages: imap4.MessageSet, flags: list[str], mode: int, uid: bool) -> dict[int, list[str]]:
        changed: dict[int, list[str]] = {}
        for seq, message in self._select(messages, uid):
            if mode == 0:
                message.flags = set(flags)
            elif mode == 1:
                message.flags |= set(flags)
            else:
                message.flags -= set(flags)
            changed[seq] = message.getFlags()
        return changed


@implementer(imap4.IAccount, imap4.INamespacePresenter)
class MemoryImapAccount:
    """Mailboxes by name (INBOX case-insensitive); ``select`` answers in a later reactor turn."""

    def __init__(self) -> None:
        self.mailboxes: dict[str, MemoryMailbox] = {}
        self.subscriptions: set[str] = set()
        self._uidvalidity = 1000
        for name in ("INBOX", "Sent", "Drafts", "Trash", "Junk"):
            self.addMailbox(name)

    @staticmethod
    def _name(name: str | bytes) -> str:
        text = name.decode("imap4-utf-7") if isinstance(name, bytes) else name
        head, sep, rest = text.partition("/")
        return ("INBOX" if head.upper() == "INBOX" else head) + sep + rest

    def addMailbox(self, name: str, mbox: Any = None) -> bool:
        name = self._name(name)
        if name in self.mailboxes:
            raise imap4.MailboxCollision(name)
        self._uidvalidity += 1
        self.mailboxes[name] = mbox or MemoryMailbox(name, self._uidvalidity)
        return True

    def create(self, pathspec: str) -> bool:
        name = self._name(pathspec).rstrip("/")
        parts = name.split("/")
        for depth in range(1, len(parts) + 1):
            partial = "/".join(parts[:depth])
            if partial not in self.mailboxes:
                self.addMailbox(partial)
            elif depth == len(parts):
                return False
        return True

    def select(self, name: str, rw: bool = True) -> Deferred[MemoryMailbox | None]:
        return deferLater(reactor, 0, self.mailboxes.get, self._name(name))

    def delete(self, name: str) -> None:
        name = self._name(name)
        if name not in self.mailboxes:
            raise imap4.MailboxException("No such mailbox")
        self.mailboxes.pop(name).destroy()

    def rename(self, oldname: str, newname: str) -> None:
        old, new = self._name(oldname), self._name(newname)
        if old not in self.mailboxes:
            raise imap4.NoSuchMailbox(old)
        if new in self.mailboxes:
            raise imap4.MailboxCollision(new)
        self.mailboxes[new] = self.mailboxes.pop(old)

    def isSubscribed(self, name: str) -> bool:
        return self._name(name) in self.subscriptions

    def subscribe(self, name: str) -> None:
        self.subscriptions.add(self._name(name))

    def unsubscribe(self, name: str) -> None:
        self.subscriptions.discard(self._name(name))

    def listMailboxes(self, ref: str, wildcard: str) -> list[tuple[str, MemoryMailbox]]:
        pattern = imap4.wildcardToRegexp(self._name(ref + wildcard), "/")
        return [(name, box) for name, box in sorted(self.mailboxes.items()) if pattern.match(name)]

    def getPersonalNamespaces(self) -> list[list[bytes]]:
        return [[b"", b"/"]]

    def getSharedNamespaces(self) -> None:
        return None

    def getOtherNamespaces(self) -> None:
        return None

    def getUserNamespaces(self) -> None:
        return None


@implementer(IRealm)
@dataclass
class _Realm:
    accounts: dict[str, MemoryImapAccount]

    def requestAvatar(self, avatar_id: bytes, mind: object, *interfaces: Any) -> tuple[Any, Any, Callable[[], None]]:
        return imap4.IAccount, self.accounts[avatar_id.decode()], lambda: None


class TwistedImapFactory(ServerFactory):
    """Plain ``IMAP4Server`` with a portal over the in-memory accounts, PLAIN offered."""

    def __init__(self, portal: Portal) -> None:
        self.portal = portal

    def buildProtocol(self, addr: object) -> imap4.IMAP4Server:
        protocol = imap4.IMAP4Server(chal={b"PLAIN": PLAINCredentials})
        protocol.portal = self.portal
        protocol.factory = self
        return protocol


# -- one server under test --------------------------------------------------------------------


@dataclass
class Site:
    """A listening IMAP server of either kind, driven from a client thread."""

    kind: str
    port: int
    listening: IListeningPort
    node: Node | None = None
    accounts: dict[str, MemoryImapAccount] = field(default_factory=dict)

    def client(self, receive_buffer: int | None = None) -> RawImap:
        return RawImap(self.port, receive_buffer=receive_buffer)

    def logged_in(self, user: str = ALICE) -> RawImap:
        client = self.client()
        client.login(user)
        return client

    def take_recent(self, mailbox: bytes = b"INBOX") -> None:
        """SELECT once in a throwaway session: \\Recent goes to it, later sessions see none.

        Tests of EXPUNGE use it so that a changed RECENT count (which our
        server reports, as Dovecot does) does not mix into the transcript.
        """
        client = self.logged_in()
        client.select(mailbox)
        client.command(b"Z", b"LOGOUT")
        client.close()

    def call(self, f: Callable[..., Awaitable[T] | T], *args: Any) -> T:
        """Run ``f`` in the reactor thread and wait for its result (from the client thread)."""

        def run() -> Any:
            result = f(*args)
            if isinstance(result, Deferred):
                return result
            if hasattr(result, "__await__"):
                return Deferred.fromCoroutine(result)  # type: ignore[arg-type]
            return succeed(result)

        return blockingCallFromThread(reactor, run)  # type: ignore[no-any-return]

    def deliver(self, raw: bytes, flags: Iterable[str] = (), user: str = ALICE, mailbox: str = "INBOX") -> int:
        """Put a message into a mailbox behind the sessions' backs; return its UID."""
        flags = frozenset(flags)
        if self.node is None:
            return self.call(lambda: self.accounts[user].mailboxes[mailbox].add(raw, flags))
        node = self.node

        async def deliver() -> int:
            box = await node.store.get_mailbox(user, mailbox)
            prepared = await node.mailboxes.prepare(raw)
            delivered = await node.mailboxes.deliver(prepared, [(box, flags)])
            return delivered[0].uid or 0

        return self.call(deliver)

    def uids(self, mailbox: str = "INBOX", user: str = ALICE) -> list[int]:
        """The UIDs a mailbox holds now, from the backend."""
        if self.node is None:
            return self.call(lambda: [m.uid for m in self.accounts[user].mailboxes[mailbox].messages])
        node = self.node

        async def uids() -> list[int]:
            box = await node.store.get_mailbox(user, mailbox)
            return [e.uid for e in (await node.store.imap_snapshot(box.id)).entries]

        return self.call(uids)


async def start_site(kind: str, tmp_path: Path, **config: Any) -> Site:
    """Our server on a real node (``config`` as for make_node), or plain Twisted's."""
    if kind == "ours":
        node = await helpers.make_node(tmp_path, **config)
        port_number, listening = helpers.listen(IMAPFactory(node))
        return Site(kind, port_number, listening, node=node)
    accounts = {ALICE: MemoryImapAccount(), BOB: MemoryImapAccount()}
    checker = InMemoryUsernamePasswordDatabaseDontUse()
    for user in accounts:
        checker.addUser(user.encode(), PASSWORD.encode())
    portal = Portal(_Realm(accounts), [checker])
    port_number, listening = helpers.listen(TwistedImapFactory(portal))
    return Site(kind, port_number, listening, accounts=accounts)


def last_line(transcript: bytes) -> bytes:
    """The final line of a transcript, CRLF included (the tagged reply of ``until_tagged``)."""
    end_of_previous = transcript.rfind(b"\r\n", 0, len(transcript) - 2)
    return transcript if end_of_previous < 0 else transcript[end_of_previous + 2:]


async def stop_site(site: Site) -> None:
    while RawImap.opened:
        RawImap.opened.pop().close()
    await site.listening.stopListening()
    if site.node is not None:
        await site.node.store.close()


MakeSite = Callable[..., Awaitable[Site]]


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[MakeSite]:
    """``await make_site("ours"|"twisted", **config)`` (ours by default); all stopped afterwards."""
    sites: list[Site] = []

    async def make(kind: str = "ours", **config: Any) -> Site:
        site = await start_site(kind, tmp_path, **config)
        sites.append(site)
        return site

    yield make
    for site in sites:
        pytest_twisted.blockon(Deferred.fromCoroutine(stop_site(site)))


def run(scenario: Callable[[], Any]) -> Deferred[Any]:
    """Drive a blocking client scenario in a thread while the reactor serves it."""
    return deferToThread(scenario)
