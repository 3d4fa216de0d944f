"""The POP3 server over real TCP on 127.0.0.1, driven by poplib and by raw sockets.

Blocking clients run in a thread (deferToThread) while the test reactor
serves them.  Raw sockets are used wherever the exact bytes matter.

Tests parametrised over ``server`` also run against Twisted's own
``twisted.mail.pop3.POP3`` with the same portal and avatar, marked as a
strict expected failure: they show that each fix is needed (and will tell
us if Twisted ever fixes the gap itself).
"""

from __future__ import annotations

import base64
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import poplib
import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.mail import pop3 as twisted_pop3

from tests.helpers.node import DOMAIN, PASSWORD, listen, make_node, stop
from twisted_mail_cluster.config import AuthConfig, Pop3Config
from twisted_mail_cluster.events.model import Event, Expunged
from twisted_mail_cluster.node import Node, build_node
from twisted_mail_cluster.pop3.server import POP3Factory
from twisted_mail_cluster.store.errors import ContentCorrupted, ContentMissing, TemporaryFailure

ensure = pytest_twisted.ensureDeferred
T = TypeVar("T")

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"
GREETING = b"+OK twisted-mail-cluster ready.\r\n"
AUTH_FAILED = b"-ERR [AUTH] Authentication failed.\r\n"
PLAINTEXT_REFUSED = (
    b"-ERR [AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections.\r\n"
)

DOTTED = (
    b"From: sender@remote.test\r\n"
    b"To: alice@example.test\r\n"
    b"Subject: dots\r\n"
    b"\r\n"
    b".starts with a dot\r\n"
    b"..two dots\r\n"
    b".\r\n"
    b"middle . line\r\n"
    b"last line\r\n"
)
PLAIN = b"From: a@remote.test\r\nSubject: plain\r\n\r\nhello\r\nworld\r\n"
THIRD = b"From: c@remote.test\r\nSubject: third\r\n\r\nthree\r\n"


def stuffed(content: bytes) -> bytes:
    """What RETR must send for CRLF content ending in CRLF."""
    lines = content.split(b"\r\n")[:-1]
    return b"".join((b"." + line if line.startswith(b".") else line) + b"\r\n" for line in lines)


# -- a blocking raw client (runs in a thread) ----------------------------------------


class Raw:
    """POP3 over a plain socket, for exact bytes; every read has a timeout."""

    #: Every socket opened, so that the fixture closes whatever a test left open.
    opened: list[socket.socket] = []

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        Raw.opened.append(self.sock)
        self.buffer = b""
        self.greeting = self.line()

    def _fill(self) -> bool:
        chunk = self.sock.recv(65536)
        self.buffer += chunk
        return bool(chunk)

    def line(self) -> bytes:
        """One reply line, CRLF included."""
        while b"\r\n" not in self.buffer:
            if not self._fill():
                raise EOFError(self.buffer)
        line, _, self.buffer = self.buffer.partition(b"\r\n")
        return line + b"\r\n"

    def multi(self) -> bytes:
        """A whole reply: the status line and, after +OK, everything up to CRLF.CRLF."""
        status = self.line()
        if not status.startswith(b"+OK"):
            return status
        while not (b"\r\n" + self.buffer).count(b"\r\n.\r\n"):
            if not self._fill():
                raise EOFError(self.buffer)
        end = (b"\r\n" + self.buffer).index(b"\r\n.\r\n") + 3
        body, self.buffer = self.buffer[:end], self.buffer[end:]
        return status + body

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def command(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.line()

    def command_multi(self, line: bytes) -> bytes:
        self.send(line + b"\r\n")
        return self.multi()

    def rest(self) -> bytes:
        """Everything until the server closes the connection."""
        while self._fill():
            pass
        data, self.buffer = self.buffer, b""
        return data

    def login(self, user: str = ALICE, password: str = PASSWORD) -> None:
        assert self.command(b"USER " + user.encode()).startswith(b"+OK")
        assert self.command(b"PASS " + password.encode()).startswith(b"+OK")

    def close(self) -> None:
        self.sock.close()


def in_thread(f: Callable[[], T]) -> Deferred[T]:
    return deferToThread(f)


async def wait_for_log(logs: list[dict[str, Any]], event: str, timeout: float = 5.0) -> None:
    """Some events (connection.close) happen after the client is done: wait for them."""
    deadline = time.monotonic() + timeout
    while not any(e["event"] == event for e in logs):
        assert time.monotonic() < deadline, f"no {event} logged"
        await deferLater(reactor, 0.01, lambda: None)


def pop(port: int) -> poplib.POP3:
    client = poplib.POP3("127.0.0.1", port, timeout=10)
    client.user(ALICE)
    client.pass_(PASSWORD)
    return client


# -- the site: a node, a listening server, helpers ------------------------------------


class FaultyStore:
    """The real store, except for the methods told to fail."""

    def __init__(self, store: Any) -> None:
        self._store = store
        self.failures: dict[str, Exception] = {}

    def __getattr__(self, name: str) -> Any:
        if name in self.failures:
            error = self.failures[name]
            return lambda *args, **kwargs: fail(error)
        return getattr(self._store, name)


class PlainTwistedFactory(ServerFactory):
    """Twisted's own POP3 server with our portal and avatar: the baseline we fix."""

    def __init__(self, ours: POP3Factory) -> None:
        self.portal = ours.portal

    def buildProtocol(self, addr: Any) -> twisted_pop3.POP3:
        server = twisted_pop3.POP3()
        server.portal = self.portal
        server.factory = self
        return server


@dataclass
class Site:
    node: Node
    port: int
    faulty: FaultyStore
    listening: list[Any] = field(default_factory=list)

    async def deliver(self, raw: bytes, to: str = ALICE) -> uuid.UUID:
        prepared = await self.node.mailboxes.prepare(raw)
        inbox = await self.node.accounts.inbox(to)
        [delivered] = await self.node.mailboxes.deliver(prepared, [(inbox, frozenset())])
        return delivered.message_id

    async def pop3_ids(self, owner: str = ALICE) -> list[uuid.UUID]:
        inbox = await self.node.accounts.inbox(owner)
        return [e.message_id for e in await self.node.store.pop3_list(inbox.id)]

    async def imap_ids(self, owner: str = ALICE) -> list[uuid.UUID]:
        inbox = await self.node.accounts.inbox(owner)
        return [e.message_id for e in (await self.node.store.imap_snapshot(inbox.id)).entries]

    async def stored(self, message_id: uuid.UUID) -> bytes:
        info = (await self.node.store.message_info([message_id]))[message_id]
        with await self.node.store.open_content(info.blob_id) as f:
            return f.read()


@pytest.fixture
def make_site(tmp_path: Path) -> Iterator[Callable[..., Any]]:
    """``await make_site(server="ours"|"twisted", **config_sections)``.

    The node's store is wrapped in a FaultyStore (``site.faulty.failures``)
    that behaves as the real store until a test tells a method to fail.
    """
    sites: list[Site] = []

    async def make(server: str = "ours", **sections: Any) -> Site:
        node = await make_node(tmp_path / f"node{len(sites)}", users=("alice", "bob"), **sections)
        faulty = FaultyStore(node.store)
        node = build_node(node.config, faulty, node.bus, reactor)  # type: ignore[arg-type]
        ours = POP3Factory(node)
        port, listening = listen(ours if server == "ours" else PlainTwistedFactory(ours))
        site = Site(node, port, faulty, [listening])
        sites.append(site)
        return site

    yield make
    while Raw.opened:
        Raw.opened.pop().close()
    for site in sites:
        pytest_twisted.blockon(stop(site.listening[0], site.node))


SERVERS = [
    "ours",
    pytest.param("twisted", marks=pytest.mark.xfail(strict=True, reason="Twisted's POP3 gap")),
]


# -- RETR, TOP, sizes -----------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_retr_is_byte_exact_with_dots_and_crlf(make_site: Any, server: str) -> None:
    site = await make_site(server)
    message_id = await site.deliver(DOTTED)
    content = await site.stored(message_id)
    assert content == DOTTED

    def scenario() -> tuple[bytes, list[bytes]]:
        raw = Raw(site.port)
        raw.login()
        wire = raw.command_multi(b"RETR 1")
        raw.close()
        client = pop(site.port)
        _, lines, _ = client.retr(1)
        client.quit()
        return wire, lines

    wire, lines = await in_thread(scenario)
    assert b"\r\n".join(lines) + b"\r\n" == content
    assert wire == b"+OK %d octets\r\n" % len(DOTTED) + stuffed(DOTTED) + b".\r\n"


@ensure
async def test_message_without_final_crlf_still_ends_with_crlf_dot_crlf(make_site: Any) -> None:
    site = await make_site()
    raw_message = b"Subject: x\r\n\r\n.no final newline"
    await site.deliver(raw_message)

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.login()
        return raw.command_multi(b"RETR 1")

    wire = await in_thread(scenario)
    assert wire == (
        b"+OK %d octets\r\nSubject: x\r\n\r\n..no final newline\r\n.\r\n" % len(raw_message)
    )


@ensure
async def test_large_message_is_streamed_whole(make_site: Any) -> None:
    site = await make_site()
    # > 1 MiB; dotted lines land on both sides of the 64 KiB read boundaries.
    body = b"".join(
        (b"." if i % 7 == 0 else b"") + b"line %06d " % i + b"x" * (i % 90) + b"\r\n"
        for i in range(25_000)
    )
    big = b"From: big@remote.test\r\nSubject: big\r\n\r\n" + body
    assert len(big) > 1024 * 1024
    message_id = await site.deliver(big)
    await site.deliver(PLAIN)

    def scenario() -> tuple[bytes, list[bytes], bytes]:
        client = pop(site.port)
        stat = client.stat()
        resp, lines, octets = client.retr(1)
        _, second, _ = client.retr(2)
        client.quit()
        assert stat == (2, len(big) + len(PLAIN))
        assert octets == len(big)
        return resp, lines, b"\r\n".join(second) + b"\r\n"

    resp, lines, second = await in_thread(scenario)
    assert resp == b"+OK %d octets" % len(big)
    assert b"\r\n".join(lines) + b"\r\n" == await site.stored(message_id) == big
    assert second == PLAIN


@ensure
async def test_top(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(DOTTED)

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        return [
            raw.command_multi(b"TOP 1 0"),
            raw.command_multi(b"TOP 1 2"),
            raw.command_multi(b"TOP 1 100"),
        ]

    zero, two, all_lines = await in_thread(scenario)
    headers = DOTTED[: DOTTED.index(b"\r\n\r\n") + 4]
    ok = b"+OK Top of message follows\r\n"
    assert zero == ok + headers + b".\r\n"
    assert two == ok + headers + b"..starts with a dot\r\n...two dots\r\n.\r\n"
    assert all_lines == ok + stuffed(DOTTED) + b".\r\n"


# -- UIDL, LIST, STAT, DELE, RSET ---------------------------------------------------------


@ensure
async def test_uidl_is_the_message_id_and_stable_across_sessions(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]

    def scenario() -> tuple[list[bytes], list[bytes], bytes]:
        first = pop(site.port)
        one = first.uidl()[1]
        first.quit()
        second = pop(site.port)
        two = second.uidl()[1]
        single = second.uidl(2)
        second.quit()
        return one, two, single

    one, two, single = await in_thread(scenario)
    expected = [b"1 %s" % str(ids[0]).encode(), b"2 %s" % str(ids[1]).encode()]
    assert one == two == expected
    assert single == b"+OK 2 %s" % str(ids[1]).encode()
    assert await site.pop3_ids() == ids


@ensure
async def test_stat_list_uidl_after_dele(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED, THIRD)]

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        return [
            raw.command(b"DELE 2"),
            raw.command(b"STAT"),
            raw.command_multi(b"LIST"),
            raw.command_multi(b"UIDL"),
            raw.command(b"LIST 2"),
            raw.command(b"UIDL 2"),
            raw.command(b"RETR 2"),
            raw.command(b"TOP 2 0"),
            raw.command(b"DELE 2"),
            raw.command(b"LIST 3"),
        ]

    replies = await in_thread(scenario)
    p, t = len(PLAIN), len(THIRD)
    assert replies == [
        b"+OK Message 2 deleted.\r\n",
        b"+OK 2 %d\r\n" % (p + t),
        b"+OK 2 messages (%d octets)\r\n1 %d\r\n3 %d\r\n.\r\n" % (p + t, p, t),
        b"+OK Unique-ID listing follows\r\n1 %s\r\n3 %s\r\n.\r\n"
        % (str(ids[0]).encode(), str(ids[2]).encode()),
        b"-ERR Message 2 is deleted.\r\n",
        b"-ERR Message 2 is deleted.\r\n",
        b"-ERR Message 2 is deleted.\r\n",
        b"-ERR Message 2 is deleted.\r\n",
        b"-ERR Message 2 is deleted.\r\n",
        b"+OK 3 %d\r\n" % t,
    ]


@ensure
async def test_dele_and_quit_remove_from_both_views_and_tell_imap(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED, THIRD)]
    inbox = await site.node.accounts.inbox(ALICE)
    events: list[Event] = []
    await site.node.bus.register(events.append, str(inbox.id))

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        replies = [raw.command(b"DELE 1"), raw.command(b"DELE 3"), raw.command(b"QUIT")]
        assert raw.rest() == b""
        return replies

    with capture_logs() as logs:
        replies = await in_thread(scenario)
        await deferLater(reactor, 0, lambda: None)  # the bus delivers in a later turn
    assert replies == [
        b"+OK Message 1 deleted.\r\n",
        b"+OK Message 3 deleted.\r\n",
        b"+OK Logging out.\r\n",
    ]
    assert await site.pop3_ids() == [ids[1]]
    assert await site.imap_ids() == [ids[1]]
    assert [(type(e), set(e.message_ids)) for e in events] == [(Expunged, {ids[0], ids[2]})]
    updates = [e for e in logs if e["event"] == "pop3.update"]
    assert [(u["user"], u["deleted"]) for u in updates] == [(ALICE, 2)]


@ensure
async def test_dele_then_dropped_connection_deletes_nothing(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.login()
        reply = raw.command(b"DELE 1")
        raw.close()
        return reply

    with capture_logs() as logs:
        assert await in_thread(scenario) == b"+OK Message 1 deleted.\r\n"
        await wait_for_log(logs, "connection.close")  # the server has seen the connection go
    assert [e["event"] for e in logs if e["event"].startswith("pop3.update")] == []
    assert await site.pop3_ids() == ids
    assert await site.imap_ids() == ids


@ensure
async def test_rset_undeletes(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        return [
            raw.command(b"DELE 1"),
            raw.command(b"DELE 2"),
            raw.command(b"STAT"),
            raw.command(b"RSET"),
            raw.command(b"STAT"),
            raw.command(b"LIST 1"),
            raw.command(b"QUIT"),
        ]

    replies = await in_thread(scenario)
    total = len(PLAIN) + len(DOTTED)
    assert replies == [
        b"+OK Message 1 deleted.\r\n",
        b"+OK Message 2 deleted.\r\n",
        b"+OK 0 0\r\n",
        b"+OK Maildrop has 2 messages (%d octets).\r\n" % total,
        b"+OK 2 %d\r\n" % total,
        b"+OK 1 %d\r\n" % len(PLAIN),
        b"+OK Logging out.\r\n",
    ]
    assert await site.pop3_ids() == ids


@ensure
async def test_bad_numbers_and_arguments_answer_err_and_the_session_goes_on(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)
    commands_and_replies = [
        (b"RETR 0", b"-ERR No such message.\r\n"),
        (b"RETR 2", b"-ERR No such message.\r\n"),
        (b"RETR x", b"-ERR Invalid message number.\r\n"),
        (b"RETR -1", b"-ERR Invalid message number.\r\n"),
        (b"RETR +1", b"-ERR Invalid message number.\r\n"),
        (b"RETR 12345678901", b"-ERR Invalid message number.\r\n"),
        (b"RETR", b"-ERR Syntax: RETR msg\r\n"),
        (b"RETR 1 2", b"-ERR Syntax: RETR msg\r\n"),
        (b"DELE", b"-ERR Syntax: DELE msg\r\n"),
        (b"DELE 1.0", b"-ERR Invalid message number.\r\n"),
        (b"LIST 1 2", b"-ERR Syntax: LIST [msg]\r\n"),
        (b"LIST 9", b"-ERR No such message.\r\n"),
        (b"UIDL 0", b"-ERR No such message.\r\n"),
        (b"TOP 1", b"-ERR Syntax: TOP msg lines\r\n"),
        (b"TOP 1 -1", b"-ERR Invalid line count.\r\n"),
        (b"TOP 2 1", b"-ERR No such message.\r\n"),
        (b"STAT 1", b"-ERR STAT takes no arguments.\r\n"),
        (b"USER alice", b"-ERR Already logged in.\r\n"),
        (b"APOP alice 0123", b"-ERR Unknown command: APOP\r\n"),
        (b"XYZZY\x01\xff", b"-ERR Unknown command: XYZZY??\r\n"),
        (b"", b"-ERR Unknown command: \r\n"),
        (b"noop", b"+OK\r\n"),
        (b"list 1", b"+OK 1 %d\r\n" % len(PLAIN)),
    ]

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        return [raw.command(command) for command, _ in commands_and_replies]

    assert await in_thread(scenario) == [reply for _, reply in commands_and_replies]


@ensure
async def test_bare_lf_commands_are_accepted_and_answered_with_crlf(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.send(b"USER %s\nPASS %s\nSTAT\nQUIT\n" % (ALICE.encode(), PASSWORD.encode()))
        return raw.rest()

    assert await in_thread(scenario) == (
        b"+OK Send PASS.\r\n+OK Logged in.\r\n+OK 1 %d\r\n+OK Logging out.\r\n" % len(PLAIN)
    )


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_dele_with_a_bad_argument_keeps_the_session(make_site: Any, server: str) -> None:
    site = await make_site(server)
    await site.deliver(PLAIN)

    def scenario() -> list[bytes]:
        raw = Raw(site.port, timeout=3)
        raw.login()
        return [raw.command(b"DELE x")[:4], raw.command(b"STAT")]

    assert await in_thread(scenario) == [b"-ERR", b"+OK 1 %d\r\n" % len(PLAIN)]


@ensure
async def test_transaction_commands_need_a_login(make_site: Any) -> None:
    site = await make_site()

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        replies = [raw.greeting, raw.command(b"STAT"), raw.command(b"RETR 1"), raw.command(b"PASS x")]
        raw.send(b"QUIT\r\n")
        return [*replies, raw.rest()]

    assert await in_thread(scenario) == [
        GREETING,
        b"-ERR Not logged in.\r\n",
        b"-ERR Not logged in.\r\n",
        b"-ERR No user name given: send USER first.\r\n",
        b"+OK Logging out.\r\n",
    ]


# -- login -------------------------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_capa(make_site: Any, server: str) -> None:
    site = await make_site(server)

    def scenario() -> tuple[bytes, bytes]:
        raw = Raw(site.port)
        before = raw.command_multi(b"CAPA")
        raw.login()
        return before, raw.command_multi(b"CAPA")

    before, after = await in_thread(scenario)
    capabilities = [
        b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING", b"USER", b"SASL PLAIN",
        b"IMPLEMENTATION twisted-mail-cluster",
    ]
    assert before.split(b"\r\n")[1:] == after.split(b"\r\n")[1:] == [*capabilities, b".", b""]
    if server == "ours":
        assert before.startswith(b"+OK Capability list follows\r\n")


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_wrong_password_is_refused_after_the_guard_delay(make_site: Any, server: str) -> None:
    delay = 0.4
    site = await make_site(
        server,
        auth=AuthConfig(failed_login_delay=delay, max_failed_login_delay=delay),
    )
    host = "127.0.0.1"

    def attempt(password: str) -> tuple[bytes, float]:
        raw = Raw(site.port)
        raw.command(b"USER " + ALICE.encode())
        start = time.monotonic()
        reply = raw.command(b"PASS " + password.encode())
        elapsed = time.monotonic() - start
        raw.close()
        return reply, elapsed

    with capture_logs() as logs:
        reply, elapsed = await in_thread(lambda: attempt("wrong password"))
        assert elapsed >= delay
        assert reply == AUTH_FAILED
        assert site.node.guard.failures(host) == 1
        # A successful login answers without the delay and clears the record.
        reply, elapsed = await in_thread(lambda: attempt(PASSWORD))
        assert reply == b"+OK Logged in.\r\n"
        assert site.node.guard.failures(host) == 0
    assert [(e["event"], e["user"], e["remote"]) for e in logs if e["event"] in ("login.failure", "login.success")] == [
        ("login.failure", ALICE, host),
        ("login.success", ALICE, host),
    ]
    assert not any("wrong password" in repr(e) or PASSWORD in repr(e) for e in logs)


@ensure
async def test_three_failures_close_the_connection(make_site: Any) -> None:
    site = await make_site()

    def scenario() -> tuple[list[bytes], bytes]:
        raw = Raw(site.port)
        replies = []
        for attempt in range(3):
            raw.command(b"USER " + ALICE.encode())
            replies.append(raw.command(b"PASS nope%d" % attempt))
        return replies, raw.rest()

    replies, rest = await in_thread(scenario)
    assert replies == [AUTH_FAILED] * 3
    assert rest == b""  # closed right after the third answer


@ensure
async def test_unknown_user_is_refused_like_a_wrong_password(make_site: Any) -> None:
    site = await make_site()

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.command(b"USER nobody@" + DOMAIN.encode())
        return raw.command(b"PASS " + PASSWORD.encode())

    assert await in_thread(scenario) == AUTH_FAILED


@ensure
async def test_plaintext_refused_for_an_untrusted_peer(make_site: Any) -> None:
    site = await make_site(trusted=False)
    await site.deliver(PLAIN)
    plain = base64.b64encode(b"\0" + ALICE.encode() + b"\0" + PASSWORD.encode())

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        return [
            raw.command_multi(b"CAPA"),
            raw.command(b"USER " + ALICE.encode()),
            raw.command(b"PASS " + PASSWORD.encode()),
            raw.command(b"AUTH PLAIN " + plain),
            raw.command(b"AUTH PLAIN"),
            raw.command_multi(b"AUTH"),
            raw.command(b"STAT"),
        ]

    assert await in_thread(scenario) == [
        b"+OK Capability list follows\r\nTOP\r\nUIDL\r\nRESP-CODES\r\nAUTH-RESP-CODE\r\n"
        b"PIPELINING\r\nIMPLEMENTATION twisted-mail-cluster\r\n.\r\n",
        PLAINTEXT_REFUSED,
        PLAINTEXT_REFUSED,
        PLAINTEXT_REFUSED,
        PLAINTEXT_REFUSED,
        b"+OK Mechanisms follow\r\n.\r\n",
        b"-ERR Not logged in.\r\n",
    ]
    assert site.node.guard.failures("127.0.0.1") == 0


@ensure
async def test_auth_plain(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)

    def b64(*parts: bytes) -> bytes:
        return base64.b64encode(b"\0".join(parts))

    good = b64(b"", ALICE.encode(), PASSWORD.encode())
    as_bob = b64(BOB.encode(), ALICE.encode(), PASSWORD.encode())

    def scenario() -> list[bytes]:
        replies = []
        raw = Raw(site.port)
        replies.append(raw.command_multi(b"AUTH"))
        replies.append(raw.command(b"AUTH CRAM-MD5"))
        replies.append(raw.command(b"AUTH PLAIN"))
        replies.append(raw.command(b"*"))
        replies.append(raw.command(b"AUTH PLAIN not-base64!"))
        replies.append(raw.command(b"AUTH PLAIN " + as_bob))
        replies.append(raw.command(b"AUTH PLAIN"))
        replies.append(raw.command(good))
        replies.append(raw.command(b"STAT"))
        raw.close()
        raw = Raw(site.port)
        replies.append(raw.command(b"auth plain " + good))
        replies.append(raw.command(b"STAT"))
        return replies

    assert await in_thread(scenario) == [
        b"+OK Mechanisms follow\r\nPLAIN\r\n.\r\n",
        b"-ERR Unsupported authentication mechanism.\r\n",
        b"+ \r\n",
        b"-ERR Authentication aborted by client.\r\n",
        b"-ERR Invalid SASL PLAIN response: invalid base64.\r\n",
        AUTH_FAILED,  # acting as another user is not offered
        b"+ \r\n",
        b"+OK Logged in.\r\n",
        b"+OK 1 %d\r\n" % len(PLAIN),
        b"+OK Logged in.\r\n",
        b"+OK 1 %d\r\n" % len(PLAIN),
    ]


@ensure
async def test_password_with_spaces_and_poplib_login(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)
    assert " " in PASSWORD

    def scenario() -> tuple[int, int]:
        client = pop(site.port)
        try:
            return client.stat()
        finally:
            client.quit()

    assert await in_thread(scenario) == (1, len(PLAIN))


# -- UPDATE and store errors ---------------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_quit_with_a_failing_store_answers_sys_temp_and_deletes_nothing(
    make_site: Any, server: str
) -> None:
    site = await make_site(server)
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]
    site.faulty.failures["pop3_remove"] = TemporaryFailure("the store is away")

    def scenario() -> tuple[bytes, bytes, bytes]:
        raw = Raw(site.port, timeout=3)
        raw.login()
        dele = raw.command(b"DELE 1")
        return dele, raw.command(b"QUIT"), raw.rest()

    dele, quit_reply, rest = await in_thread(scenario)
    assert dele.startswith(b"+OK")
    assert quit_reply == (
        b"-ERR [SYS/TEMP] Deleting the messages failed; they are all kept, try again later.\r\n"
    )
    assert rest == b""
    del site.faulty.failures["pop3_remove"]
    assert await site.pop3_ids() == ids


@ensure
async def test_quit_skips_messages_another_session_removed(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]
    inbox = await site.node.accounts.inbox(ALICE)

    def login_and_delete() -> Raw:
        raw = Raw(site.port)
        raw.login()
        assert raw.command(b"DELE 1") == b"+OK Message 1 deleted.\r\n"
        return raw

    first = await in_thread(login_and_delete)
    second = await in_thread(login_and_delete)
    # Meanwhile an IMAP client expunges message 1 too.
    await site.node.mailboxes.pop3_remove(inbox, [ids[0]])

    def finish(raw: Raw) -> list[bytes]:
        return [raw.command(b"RETR 1"), raw.command(b"QUIT")]

    assert await in_thread(lambda: finish(first)) == [
        b"-ERR Message 1 is deleted.\r\n",
        b"+OK Logging out.\r\n",
    ]
    assert await in_thread(lambda: finish(second)) == [
        b"-ERR Message 1 is deleted.\r\n",
        b"+OK Logging out.\r\n",
    ]
    assert await site.pop3_ids() == [ids[1]]


@ensure
async def test_retr_of_a_message_removed_meanwhile(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (PLAIN, DOTTED)]
    inbox = await site.node.accounts.inbox(ALICE)

    def login() -> Raw:
        raw = Raw(site.port)
        raw.login()
        return raw

    raw = await in_thread(login)
    await site.node.mailboxes.pop3_remove(inbox, [ids[0]])

    def finish() -> list[bytes]:
        return [raw.command(b"RETR 1"), raw.command(b"STAT"), raw.command(b"DELE 1"), raw.command(b"QUIT")]

    assert await in_thread(finish) == [
        b"-ERR Message 1 was removed by another session.\r\n",
        b"+OK 2 %d\r\n" % (len(PLAIN) + len(DOTTED)),  # the snapshot taken at login
        b"+OK Message 1 deleted.\r\n",
        b"+OK Logging out.\r\n",
    ]
    assert await site.pop3_ids() == [ids[1]]


@ensure
async def test_temporary_store_failure_on_retr_answers_sys_temp(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        site.faulty.failures["message_info"] = TemporaryFailure("timeout")
        replies = [raw.command(b"RETR 1"), raw.command(b"TOP 1 0"), raw.command(b"NOOP")]
        del site.faulty.failures["message_info"]
        replies.append(raw.command_multi(b"RETR 1"))
        return replies

    assert await in_thread(scenario) == [
        b"-ERR [SYS/TEMP] The mail store is temporarily unavailable, try again later.\r\n",
        b"-ERR [SYS/TEMP] The mail store is temporarily unavailable, try again later.\r\n",
        b"+OK\r\n",
        b"+OK %d octets\r\n" % len(PLAIN) + PLAIN + b".\r\n",
    ]


@ensure
async def test_temporary_store_failure_at_login_answers_sys_temp(make_site: Any) -> None:
    site = await make_site()
    site.faulty.failures["pop3_list"] = TemporaryFailure("timeout")

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        return [raw.command(b"USER " + ALICE.encode()), raw.command(b"PASS " + PASSWORD.encode()),
                raw.command(b"STAT")]

    assert await in_thread(scenario) == [
        b"+OK Send PASS.\r\n",
        b"-ERR [SYS/TEMP] The mail store is temporarily unavailable, try again later.\r\n",
        b"-ERR Not logged in.\r\n",
    ]
    assert site.node.guard.failures("127.0.0.1") == 0


@pytest.mark.parametrize("error", [ContentCorrupted("chunk 0 fails its SHA-256"), ContentMissing("gone")])
@ensure
async def test_damaged_content_answers_sys_perm_and_logs_an_error(
    make_site: Any, error: Exception
) -> None:
    site = await make_site()
    message_id = await site.deliver(PLAIN)

    def scenario() -> list[bytes]:
        raw = Raw(site.port)
        raw.login()
        return [raw.command(b"RETR 1"), raw.command(b"TOP 1 1"), raw.command(b"NOOP")]

    site.faulty.failures["open_content"] = error
    with capture_logs() as logs:
        replies = await in_thread(scenario)
    assert replies == [
        b"-ERR [SYS/PERM] message content is unavailable\r\n",
        b"-ERR [SYS/PERM] message content is unavailable\r\n",
        b"+OK\r\n",
    ]
    errors = [e for e in logs if e["log_level"] == "error"]
    assert [(e["event"], e["message_id"], e["user"]) for e in errors] == [
        ("pop3.content_unavailable", str(message_id), ALICE)
    ] * 2


@ensure
async def test_really_corrupted_content_is_never_sent(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)
    import sqlite3

    db = sqlite3.connect(site.node.store._store.path)  # FaultyStore -> EmbeddedStore
    with db:
        db.execute("UPDATE blob_chunks SET data = CAST('tampered' AS BLOB)")
    db.close()

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.login()
        return raw.command(b"RETR 1")

    assert await in_thread(scenario) == b"-ERR [SYS/PERM] message content is unavailable\r\n"


# -- pipelining, timeouts, limits ----------------------------------------------------------


@pytest.mark.parametrize("server", SERVERS)
@ensure
async def test_commands_pipelined_after_pass_wait_for_the_login(make_site: Any, server: str) -> None:
    site = await make_site(server)
    await site.deliver(PLAIN)
    burst = b"USER %s\r\nPASS %s\r\nSTAT\r\nLIST 1\r\nQUIT\r\n" % (ALICE.encode(), PASSWORD.encode())

    def scenario() -> list[bytes]:
        raw = Raw(site.port, timeout=5)
        raw.send(burst)
        return raw.rest().split(b"\r\n")

    lines = await in_thread(scenario)
    assert [line[:3] for line in lines[:2]] == [b"+OK", b"+OK"]
    assert lines[2:4] == [b"+OK 1 %d" % len(PLAIN), b"+OK 1 %d" % len(PLAIN)]
    assert lines[4].startswith(b"+OK") and lines[5:] == [b""]


@ensure
async def test_pipelined_commands_are_answered_in_order(make_site: Any) -> None:
    site = await make_site()
    ids = [await site.deliver(m) for m in (DOTTED, PLAIN)]
    burst = (
        b"USER %s\r\nPASS %s\r\nSTAT\r\nRETR 1\r\nTOP 2 0\r\nLIST 2\r\nDELE 1\r\nUIDL\r\nNOOP\r\nQUIT\r\n"
        % (ALICE.encode(), PASSWORD.encode())
    )

    def scenario() -> bytes:
        raw = Raw(site.port, timeout=5)
        raw.send(burst)
        return raw.rest()

    wire = await in_thread(scenario)
    d, p = len(DOTTED), len(PLAIN)
    assert wire == (
        b"+OK Send PASS.\r\n"
        b"+OK Logged in.\r\n"
        b"+OK 2 %d\r\n" % (d + p)
        + b"+OK %d octets\r\n" % d + stuffed(DOTTED) + b".\r\n"
        + b"+OK Top of message follows\r\n" + PLAIN[: PLAIN.index(b"\r\n\r\n") + 4] + b".\r\n"
        + b"+OK 2 %d\r\n" % p
        + b"+OK Message 1 deleted.\r\n"
        + b"+OK Unique-ID listing follows\r\n2 %s\r\n.\r\n" % str(ids[1]).encode()
        + b"+OK\r\n"
        + b"+OK Logging out.\r\n"
    )
    assert await site.pop3_ids() == [ids[1]]


@ensure
async def test_a_flood_of_pipelined_commands_is_answered_in_full(make_site: Any) -> None:
    site = await make_site()
    await site.deliver(PLAIN)
    count = 300

    def scenario() -> bytes:
        raw = Raw(site.port, timeout=10)
        raw.login()
        raw.send(b"RETR 1\r\n" * count + b"QUIT\r\n")
        return raw.rest()

    one = b"+OK %d octets\r\n" % len(PLAIN) + PLAIN + b".\r\n"
    assert await in_thread(scenario) == one * count + b"+OK Logging out.\r\n"


@ensure
async def test_idle_timeout(make_site: Any) -> None:
    site = await make_site(pop3=Pop3Config(timeout=0.3))

    def scenario() -> tuple[bytes, float]:
        raw = Raw(site.port)
        start = time.monotonic()
        rest = raw.rest()
        return rest, time.monotonic() - start

    rest, elapsed = await in_thread(scenario)
    assert rest == b"-ERR Disconnected for inactivity.\r\n"
    assert 0.1 <= elapsed < 5  # the configured 0.3 s, not the 600 s default


@ensure
async def test_overlong_line_closes_the_connection(make_site: Any) -> None:
    site = await make_site()

    def scenario() -> bytes:
        raw = Raw(site.port)
        raw.send(b"USER " + b"a" * 9000 + b"\r\n")
        return raw.rest()

    assert await in_thread(scenario) == b"-ERR Line too long.\r\n"


@ensure
async def test_connection_logs(make_site: Any) -> None:
    site = await make_site()

    def scenario() -> None:
        client = pop(site.port)
        client.quit()

    with capture_logs() as logs:
        await in_thread(scenario)
        await wait_for_log(logs, "connection.close")
    events = [
        (e["event"], e.get("protocol"), e.get("remote"), e.get("user"))
        for e in logs
        if e["event"] in {"connection.open", "connection.close", "login.success", "pop3.update"}
    ]
    assert events == [
        ("connection.open", "pop3", "127.0.0.1", None),
        ("login.success", "pop3", "127.0.0.1", ALICE),
        ("pop3.update", None, "127.0.0.1", ALICE),
        ("connection.close", "pop3", "127.0.0.1", ALICE),
    ]
    assert not any(PASSWORD in repr(e) for e in logs)
