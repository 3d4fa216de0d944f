"""The SMTP server over real TCP on 127.0.0.1, driven by smtplib, raw sockets and swaks.

Clients run in threads (``deferToThread``) while the server runs in the test
reactor.  Each test that checks a fix of Twisted's behaviour says which one;
on plain ``twisted.mail.smtp.ESMTP`` it would fail.
"""

from __future__ import annotations

import base64
import os
import smtplib
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
import pytest_twisted
from structlog.testing import capture_logs
from twisted.internet import reactor
from twisted.internet.defer import Deferred, fail
from twisted.internet.interfaces import IListeningPort
from twisted.internet.protocol import ServerFactory
from twisted.internet.task import Clock, deferLater
from twisted.internet.threads import deferToThread
from twisted.internet.utils import getProcessOutputAndValue

from tests.helpers import node as helpers
from twisted_mail_cluster.config import DEFAULT_MAX_MESSAGE_SIZE, SmtpConfig
from twisted_mail_cluster.events.inprocess import InProcessEventBus
from twisted_mail_cluster.node import Node, build_node
from twisted_mail_cluster.smtp.server import SMTPFactory
from twisted_mail_cluster.store.embedded import EmbeddedStore
from twisted_mail_cluster.store.errors import TemporaryFailure

DOMAIN = helpers.DOMAIN
PASSWORD = helpers.PASSWORD
ALICE, BOB, CAROL = (f"{u}@{DOMAIN}" for u in ("alice", "bob", "carol"))
SENDER = "sender@remote.test"
HOSTNAME = "mx.example.test"

T = TypeVar("T")

MESSAGE = (
    b"From: Sender <sender@remote.test>\r\n"
    b"To: Alice <alice@example.test>\r\n"
    b"Subject: hello\r\n"
    b"\r\n"
    b"Line one\r\n"
    b"Line two\r\n"
)


# -- the server under test -------------------------------------------------------


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


@dataclass
class Server:
    node: Node
    store: FaultyStore
    port: int
    listening: IListeningPort
    clock: Clock | None = None

    def smtp(self) -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port, local_hostname="client.example", timeout=10)
        return client

    def raw(self) -> RawClient:
        return RawClient(self.port)

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
    """Start a server: ``await start(trusted=False, smtp=SmtpConfig(...), clock=True)``."""
    servers: list[Server] = []

    async def starter(*, clock: bool = False, trusted: bool = True, **sections: Any) -> Server:
        n = len(servers)
        inner = EmbeddedStore(tmp_path / f"store{n}.sqlite3", reactor)
        await inner.start()
        store = FaultyStore(inner)
        node_reactor: Any = Clock() if clock else reactor
        config = helpers.make_config(tmp_path, trusted=trusted, **sections)
        node = build_node(config, store, InProcessEventBus(reactor), node_reactor)  # type: ignore[arg-type]
        await node.accounts.add_domain(DOMAIN)
        for user in (ALICE, BOB, CAROL):
            await node.accounts.add_user(user, PASSWORD)
        listening = reactor.listenTCP(0, SMTPFactory(node), interface="127.0.0.1")
        server = Server(node, store, listening.getHost().port, listening, node_reactor if clock else None)
        servers.append(server)
        return server

    yield starter
    for server in servers:
        await server.listening.stopListening()
        await server.store.close()


def in_thread(f: Callable[..., T], *args: Any) -> Deferred[T]:
    return deferToThread(f, *args)


async def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await deferLater(reactor, 0.01, lambda: None)


# -- a client that shows exact bytes -------------------------------------------------


class RawClient:
    """Blocking socket client (use it in a thread): send bytes, read whole replies."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
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
        return self.sock.recv(65536) == b""

    def close(self) -> None:
        self.sock.close()


def hello(client: RawClient) -> list[str]:
    client.send(b"EHLO client.example\r\n")
    return client.reply()


# -- EHLO and extensions -------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_ehlo_advertises_extensions_and_auth_for_trusted_peer(start: Start) -> None:
    """Twisted advertised only AUTH/STARTTLS (smtp.py ``extensions``)."""
    server = await start()

    def talk() -> tuple[list[str], list[str]]:
        client = server.raw()
        try:
            return client.greeting, hello(client)
        finally:
            client.close()

    greeting, ehlo = await in_thread(talk)
    assert greeting == [f"220 {HOSTNAME} ESMTP twisted-mail-cluster"]
    assert ehlo == [
        f"250-{HOSTNAME}",
        "250-PIPELINING",
        f"250-SIZE {DEFAULT_MAX_MESSAGE_SIZE}",
        "250-8BITMIME",
        "250-ENHANCEDSTATUSCODES",
        "250 AUTH PLAIN LOGIN",
    ]


@pytest_twisted.ensureDeferred
async def test_untrusted_peer_gets_no_auth(start: Start) -> None:
    server = await start(trusted=False)

    def talk() -> tuple[list[str], str, str]:
        client = server.raw()
        try:
            ehlo = hello(client)
            plain = base64.b64encode(f"\0{ALICE}\0{PASSWORD}".encode()).decode()
            return ehlo, client.command(f"AUTH PLAIN {plain}".encode()), client.command(b"NOOP")
        finally:
            client.close()

    ehlo, auth, noop = await in_thread(talk)
    assert ehlo[-1] == "250 ENHANCEDSTATUSCODES"
    assert not any("AUTH" in line for line in ehlo)
    assert auth == "538 5.7.11 Encryption required for requested authentication mechanism"
    assert noop == "250 2.0.0 Ok"
    assert server.node.guard.failures("127.0.0.1") == 0


# -- delivery ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_three_recipients_share_one_stored_copy(start: Start) -> None:
    server = await start()

    def send() -> tuple[int, bytes]:
        with server.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            for rcpt in (ALICE, BOB.upper(), CAROL):
                assert client.rcpt(rcpt) == (250, b"2.1.5 Ok")
            return client.data(MESSAGE)

    with capture_logs() as logs:
        code, text = await in_thread(send)
    assert code == 250
    assert text.startswith(b"2.0.0 Ok: stored as ")
    transaction_id = text.split()[-1].decode()

    copies = [await server.inbox_entries(user) for user in (ALICE, BOB, CAROL)]
    assert [len(c) for c in copies] == [1, 1, 1]
    infos = [c[0][0] for c in copies]
    assert len({info.blob_id for info in infos}) == 1  # the content is stored once
    assert len({info.message_id for info in infos}) == 3
    assert server.store.deliveries == 1  # and in one deliver call

    content = copies[0][0][1]
    trace = content[: len(content) - len(MESSAGE)]
    assert content.endswith(MESSAGE)
    lines = trace.split(b"\r\n")
    assert lines[0] == f"Return-Path: <{SENDER}>".encode()
    assert lines[1] == b"Received: from client.example ([127.0.0.1])"
    by = f"\tby {HOSTNAME} (twisted-mail-cluster) with ESMTP id {transaction_id}; ".encode()
    assert lines[2].startswith(by)  # three recipients: no "for" clause
    when = parsedate_to_datetime(lines[2][len(by) :].decode())
    assert abs(when.timestamp() - time.time()) < 60
    assert lines[3:] == [b""]
    delivered = [e for e in logs if e["event"] == "smtp.delivered"]
    assert len(delivered) == 1
    assert delivered[0]["recipients"] == 3
    assert delivered[0]["sender"] == SENDER
    assert delivered[0]["size"] == len(content)
    assert sorted(delivered[0]["message_ids"]) == sorted(str(i.message_id) for i in infos)


@pytest_twisted.ensureDeferred
async def test_single_recipient_trace_fields_and_dot_unstuffing(start: Start) -> None:
    server = await start()

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(b"MAIL FROM:<>\r\nRCPT TO:<Alice@Example.TEST>\r\nDATA\r\n")
            replies = client.replies(3)
            # No header at all, a stuffed dot line, a lone stuffed dot.
            client.send(b"first body line\r\n..hidden\r\n..\r\nlast\r\n.\r\n")
            return replies + client.replies(1)
        finally:
            client.close()

    replies = await in_thread(talk)
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[3].startswith("250 2.0.0 Ok: stored as ")
    [content] = await server.inbox(ALICE)
    lines = content.split(b"\r\n")
    assert lines[0] == b"Return-Path: <>"
    assert lines[1] == b"Received: from client.example ([127.0.0.1])"
    assert lines[2].startswith(f"\tby {HOSTNAME} (twisted-mail-cluster) with ESMTP id ".encode())
    assert lines[3].startswith(b"\tfor <Alice@Example.TEST>; ")
    # A body without a header gets a blank line after our fields (RFC 5322 2.1).
    assert lines[4:] == [b"", b"first body line", b".hidden", b".", b"last", b""]


@pytest_twisted.ensureDeferred
async def test_helo_gives_smtp_and_auth_gives_esmtpa(start: Start) -> None:
    server = await start()

    def send(authenticate: bool) -> None:
        with server.smtp() as client:
            if authenticate:
                client.login(ALICE, PASSWORD)
                client.sendmail(ALICE, [BOB], MESSAGE)
            else:
                client.helo()
                client.sendmail(SENDER, [BOB], MESSAGE)

    await in_thread(send, False)
    await in_thread(send, True)
    first, second = await server.inbox(BOB)
    assert b") with SMTP id " in first.split(b"\r\n")[2]
    assert b") with ESMTPA id " in second.split(b"\r\n")[2]
    assert second.startswith(f"Return-Path: <{ALICE}>\r\n".encode())


@pytest_twisted.ensureDeferred
async def test_duplicate_recipients_are_delivered_once(start: Start) -> None:
    server = await start()

    def send() -> dict[str, Any]:
        with server.smtp() as client:
            return client.sendmail(SENDER, [ALICE, "ALICE@example.test", ALICE], MESSAGE)

    assert await in_thread(send) == {}
    assert len(await server.inbox(ALICE)) == 1


# -- refusals --------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_unknown_user_and_relay_are_refused(start: Start) -> None:
    server = await start()

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(
                b"MAIL FROM:<sender@remote.test>\r\n"
                b"RCPT TO:<nobody@example.test>\r\n"
                b"RCPT TO:<someone@elsewhere.test>\r\n"
                b"DATA\r\n"
            )
            return client.replies(4)
        finally:
            client.close()

    with capture_logs() as logs:
        replies = await in_thread(talk)
    assert replies == [
        "250 2.1.0 Ok",
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
        "550 5.7.1 <someone@elsewhere.test>: Relay access denied: this server only accepts"
        " mail for its own domains; outbound delivery is not available in this version",
        "554 5.5.1 Error: no valid recipients",
    ]
    reasons = [(e["reason"], e.get("recipient")) for e in logs if e["event"] == "smtp.rejected"]
    assert reasons == [
        ("unknown user", "nobody@example.test"),
        ("relay denied", "someone@elsewhere.test"),
    ]


@pytest_twisted.ensureDeferred
async def test_authenticated_user_cannot_relay_either(start: Start) -> None:
    server = await start()

    def send() -> tuple[int, bytes]:
        with server.smtp() as client:
            client.login(ALICE, PASSWORD)
            client.mail(ALICE)
            return client.rcpt("friend@elsewhere.test")

    code, text = await in_thread(send)
    assert code == 550
    assert text.startswith(b"5.7.1 <friend@elsewhere.test>: Relay access denied")
    assert b"outbound delivery is not available in this version" in text


@pytest_twisted.ensureDeferred
async def test_mail_from_parameters(start: Start) -> None:
    """Twisted ignored every parameter, SIZE=999999999 included (smtp.py do_MAIL)."""
    server = await start()
    too_big = DEFAULT_MAX_MESSAGE_SIZE + 1

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            answers = []
            for params in (
                f"SIZE={too_big}",
                "SIZE=12x",
                "BODY=BINARYMIME",
                "SMTPUTF8",
                "FOO=bar",
                "SIZE=100 SIZE=100",
                "BODY=8bitmime SIZE=1000",
                # the transaction above is open: the next must be refused as nested
                "",
            ):
                answers.append(client.command(f"MAIL FROM:<{SENDER}> {params}".rstrip().encode()))
            answers.append(client.command(b"RSET"))
            answers.append(client.command(b"MAIL FROM:<> AUTH=<>"))
            return answers
        finally:
            client.close()

    with capture_logs() as logs:
        answers = await in_thread(talk)
    assert answers == [
        f"552 5.3.4 Message size exceeds fixed limit of {DEFAULT_MAX_MESSAGE_SIZE} bytes",
        "501 5.5.4 Bad SIZE parameter",
        "501 5.5.4 Bad BODY parameter",
        "555 5.5.4 Unsupported option: SMTPUTF8",
        "555 5.5.4 Unsupported option: FOO",
        "501 5.5.4 Duplicate parameter SIZE",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: nested MAIL command",
        "250 2.0.0 Ok",
        "250 2.1.0 Ok",
    ]
    assert [e["code"] for e in logs if e["event"] == "smtp.rejected"][:1] == [552]


@pytest_twisted.ensureDeferred
async def test_rcpt_parameters_are_refused(start: Start) -> None:
    server = await start()

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test> NOTIFY=NEVER\r\n")
            return client.replies(2)
        finally:
            client.close()

    assert await in_thread(talk) == ["250 2.1.0 Ok", "555 5.5.4 Unsupported option: NOTIFY"]


@pytest_twisted.ensureDeferred
async def test_oversize_message_is_refused_at_the_dot_and_nothing_stored(start: Start) -> None:
    limit = 2000
    server = await start(smtp=SmtpConfig(max_message_size=limit))

    def talk() -> list[str]:
        client = server.raw()
        try:
            ehlo = hello(client)
            client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            replies = client.replies(3)
            client.send(b"Subject: big\r\n\r\n")
            client.send((b"y" * 78 + b"\r\n") * 40 + b".\r\n")  # 3200 bytes
            replies += client.replies(1)
            # The connection is still usable, and a message within the limit goes through.
            client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            replies += client.replies(3)
            client.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
            replies += client.replies(1)
            return [ehlo[2]] + replies
        finally:
            client.close()

    replies = await in_thread(talk)
    assert replies[0] == f"250-SIZE {limit}"
    assert replies[1:4] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[4] == f"552 5.3.4 Error: message file too big (limit {limit} bytes)"
    assert replies[5:8] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[8].startswith("250 2.0.0 Ok: stored as ")
    [stored] = await server.inbox(ALICE)
    assert stored.endswith(b"Subject: small\r\n\r\nok\r\n")
    assert server.store.deliveries == 1


@pytest_twisted.ensureDeferred
async def test_too_many_recipients(start: Start) -> None:
    server = await start(smtp=SmtpConfig(max_recipients=2))

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(
                b"MAIL FROM:<x@remote.test>\r\n"
                b"RCPT TO:<alice@example.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\n"  # a repeat is not one more
                b"RCPT TO:<carol@example.test>\r\n"
            )
            return client.replies(5)
        finally:
            client.close()

    assert await in_thread(talk) == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        "250 2.1.5 Ok",
        "452 4.5.3 Error: too many recipients",
    ]


# -- pipelining -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_pipelined_replies_come_back_in_order(start: Start) -> None:
    """Twisted #8126: a slow RCPT lookup let later replies overtake it.

    Alice's lookup is made slow, so on plain Twisted her 250 would come after
    the unknown user's 550 and DATA would be answered before any recipient
    was accepted.
    """
    server = await start()
    server.store.lookup_delays[ALICE] = 0.2

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(
                b"MAIL FROM:<x@remote.test>\r\n"
                b"RCPT TO:<alice@example.test>\r\n"
                b"RCPT TO:<nobody@example.test>\r\n"
                b"RCPT TO:<bob@example.test>\r\n"
                b"DATA\r\n"
            )
            replies = client.replies(5)
            client.send(MESSAGE + b".\r\nNOOP\r\nQUIT\r\n")
            replies += client.replies(3)
            assert client.closed()
            return replies
        finally:
            client.close()

    replies = await in_thread(talk)
    assert replies[:5] == [
        "250 2.1.0 Ok",
        "250 2.1.5 Ok",
        "550 5.1.1 <nobody@example.test>: Recipient address rejected: User unknown",
        "250 2.1.5 Ok",
        "354 End data with <CR><LF>.<CR><LF>",
    ]
    assert replies[5].startswith("250 2.0.0 Ok: stored as ")
    assert replies[6:] == ["250 2.0.0 Ok", "221 2.0.0 Bye"]
    assert len(await server.inbox(ALICE)) == 1
    assert len(await server.inbox(BOB)) == 1


# -- store failures ------------------------------------------------------------------------


@pytest.mark.parametrize("error", [TemporaryFailure("cluster unavailable"), RuntimeError("bug")])
@pytest_twisted.ensureDeferred
async def test_store_failure_is_451_and_nothing_stored(start: Start, error: Exception) -> None:
    """Twisted answered 550 for any failure (smtp.py _messageHandled): a bounce for a hiccup."""
    server = await start()
    server.store.deliver_error = error

    def send() -> tuple[int, bytes]:
        with server.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            client.rcpt(ALICE)
            client.rcpt(BOB)
            return client.data(MESSAGE)

    with capture_logs() as logs:
        code, text = await in_thread(send)
    assert (code, text) == (451, b"4.3.0 Error: temporary failure storing the message, try again later")
    assert await server.inbox(ALICE) == []
    assert await server.inbox(BOB) == []
    [failure] = [e for e in logs if e["event"] == "smtp.delivery_failed"]
    assert failure["log_level"] == "error"
    assert type(error).__name__ in failure["exception"]
    assert "Traceback" in failure["exception"]


@pytest_twisted.ensureDeferred
async def test_lookup_failure_is_451(start: Start) -> None:
    server = await start()
    server.store.lookup_error = TemporaryFailure("timeout")

    def send() -> tuple[int, bytes]:
        with server.smtp() as client:
            client.ehlo()
            client.mail(SENDER)
            return client.rcpt(ALICE)

    assert await in_thread(send) == (451, b"4.3.0 Temporary lookup failure, try again later")


# -- AUTH ---------------------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_auth_plain_success_is_logged_without_password(start: Start) -> None:
    server = await start()

    def login() -> tuple[int, bytes]:
        with server.smtp() as client:
            client.ehlo()
            return client.login(ALICE, PASSWORD)

    with capture_logs() as logs:
        assert await in_thread(login) == (235, b"2.7.0 Authentication successful")
    [success] = [e for e in logs if e["event"] == "login.success"]
    assert success["user"] == ALICE and success["remote"] == "127.0.0.1"
    assert PASSWORD not in repr(logs)


@pytest_twisted.ensureDeferred
async def test_auth_login_mechanism_prompts(start: Start) -> None:
    server = await start()

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            b64 = lambda s: base64.b64encode(s.encode())  # noqa: E731
            return [
                client.command(b"AUTH LOGIN"),
                client.command(b64(ALICE)),
                client.command(b64(PASSWORD)),
                client.command(b"AUTH PLAIN"),  # once is enough
            ]
        finally:
            client.close()

    assert await in_thread(talk) == [
        "334 VXNlcm5hbWU6",  # "Username:"
        "334 UGFzc3dvcmQ6",  # "Password:"
        "235 2.7.0 Authentication successful",
        "503 5.5.1 Error: already authenticated",
    ]


@pytest_twisted.ensureDeferred
async def test_auth_failure_waits_for_the_guard_delay(start: Start) -> None:
    """The 535 comes only when the node's clock has passed the guard's delay."""
    server = await start(clock=True)
    clock = server.clock
    assert clock is not None
    client = await in_thread(server.raw)
    try:
        await in_thread(hello, client)
        bad = base64.b64encode(f"\0{ALICE}\0wrong".encode())
        with capture_logs() as logs:
            await in_thread(client.send, b"AUTH PLAIN " + bad + b"\r\n")
            await wait_for(lambda: server.node.guard.failures("127.0.0.1") == 1)
            # Pipelined commands must wait too, or the delay would not slow anyone down.
            await in_thread(client.send, b"NOOP\r\n")
            assert await in_thread(client.nothing_within, 0.2)
            clock.advance(0.049)
            assert await in_thread(client.nothing_within, 0.1)
            clock.advance(0.001)
            replies = await in_thread(client.replies, 2)
        assert replies == ["535 5.7.8 Error: authentication failed", "250 2.0.0 Ok"]
        [failure] = [e for e in logs if e["event"] == "login.failure"]
        assert failure["user"] == ALICE and failure["remote"] == "127.0.0.1"
        assert failure["delay"] == 0.05
        assert "wrong" not in repr(logs)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_auth_failures_with_smtplib_and_bad_responses(start: Start) -> None:
    server = await start()

    def login(user: str, password: str) -> int:
        """One PLAIN attempt (smtplib's login() would go on to try LOGIN too)."""
        with server.smtp() as client:
            client.ehlo()
            client.user, client.password = user, password
            try:
                return client.auth("PLAIN", client.auth_plain)[0]
            except smtplib.SMTPAuthenticationError as e:
                return e.smtp_code

    started = time.monotonic()
    assert await in_thread(login, ALICE, "wrong") == 535
    assert time.monotonic() - started >= 0.05
    assert await in_thread(login, "nobody@example.test", PASSWORD) == 535
    assert server.node.guard.failures("127.0.0.1") == 2
    assert await in_thread(login, ALICE, PASSWORD) == 235
    assert server.node.guard.failures("127.0.0.1") == 0

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            as_bob = base64.b64encode(f"{BOB}\0{ALICE}\0{PASSWORD}".encode())
            return [
                client.command(b"AUTH PLAIN !!notbase64"),
                client.command(b"AUTH PLAIN " + base64.b64encode(b"no-nul-at-all")),
                client.command(b"AUTH CRAM-MD5"),
                client.command(b"AUTH PLAIN"),
                client.command(b"*"),
                client.command(b"AUTH PLAIN " + as_bob),  # authzid must be the user
            ]
        finally:
            client.close()

    assert await in_thread(talk) == [
        "501 5.5.2 Cannot decode response",
        "501 5.5.2 Invalid authentication response",
        "504 5.5.4 Unrecognized authentication type",
        "334 ",
        "501 5.7.0 Authentication aborted",
        "535 5.7.8 Error: authentication failed",
    ]


# -- lines and commands ------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_overlong_data_line_is_refused_and_never_read_as_commands(start: Start) -> None:
    """Twisted went back to command mode mid-message (smtp.py lineLengthExceeded)."""
    server = await start(smtp=SmtpConfig(max_line_length=1000))

    def talk() -> list[str]:
        client = server.raw()
        try:
            hello(client)
            client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            replies = client.replies(3)
            client.send(b"Subject: long\r\n\r\n")
            client.send(b"z" * 30000)  # no CRLF yet: longer than any limit...
            client.send(b"RSET\r")  # ...its tail looks like a command, and the CRLF is split
            client.send(b"\nQUIT\r\nMAIL FROM:<evil@remote.test>\r\n" + b"w" * 998 + b"\r\n.\r\n")
            replies += client.replies(1)
            assert client.nothing_within(0.2)  # exactly one reply for all of it
            replies.append(client.command(b"NOOP"))  # still usable
            # A line of exactly the limit (998 + CRLF = 1000 octets) is fine.
            client.send(b"MAIL FROM:<x@remote.test>\r\nRCPT TO:<alice@example.test>\r\nDATA\r\n")
            replies += client.replies(3)
            client.send(b"Subject: ok\r\n\r\n" + b"v" * 998 + b"\r\n.\r\n")
            replies += client.replies(1)
            return replies
        finally:
            client.close()

    replies = await in_thread(talk)
    assert replies[:3] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[3] == (
        "554 5.6.0 Error: message has a line longer than 1000 bytes (RFC 5321 4.5.3.1.6)"
    )
    assert replies[4] == "250 2.0.0 Ok"
    assert replies[5:8] == ["250 2.1.0 Ok", "250 2.1.5 Ok", "354 End data with <CR><LF>.<CR><LF>"]
    assert replies[8].startswith("250 2.0.0 Ok: stored as ")
    [stored] = await server.inbox(ALICE)
    assert stored.endswith(b"Subject: ok\r\n\r\n" + b"v" * 998 + b"\r\n")


@pytest_twisted.ensureDeferred
async def test_commands_and_sequence_errors(start: Start) -> None:
    server = await start(smtp=SmtpConfig(max_line_length=1000))

    def talk() -> list[str]:
        client = server.raw()
        try:
            answers = [
                client.command(b"MAIL FROM:<x@remote.test>"),
                client.command(b"HELO"),
                client.command(b"HELO client.example"),
                client.command(b"RCPT TO:<alice@example.test>"),
                client.command(b"DATA"),
                client.command(b"MAIL FROM:<x@remote.test>"),
                client.command(b"DATA"),
                client.command(b"RSET"),
                client.command(b"MAIL FROM:x@@"),
                client.command(b"NOOP"),
                client.command(b"VRFY alice"),
                client.command(b"STARTTLS"),
                client.command(b"BOGUS"),
                client.command(b""),
                client.command(b"NOOP \xff\xfe"),  # Twisted: UnicodeDecodeError, connection dropped
                client.command(b"EHLO evil\nBcc: x@y"),  # a bare LF never reaches a header
                client.command(b"NOOP " + b"n" * 2000),
                client.command(b"RSET"),
                client.command(b"QUIT"),
            ]
            assert client.closed()
            return answers
        finally:
            client.close()

    assert await in_thread(talk) == [
        "503 5.5.1 Error: send HELO/EHLO first",
        "501 5.5.4 Syntax: HELO hostname",
        f"250 {HOSTNAME}",
        "503 5.5.1 Error: need MAIL command",
        "503 5.5.1 Error: need MAIL command",
        "250 2.1.0 Ok",
        "503 5.5.1 Error: need RCPT command",
        "250 2.0.0 Ok",
        "501 5.1.7 Bad sender address syntax",
        "250 2.0.0 Ok",
        "252 2.5.2 Cannot VRFY user, but will accept message for local users",
        "502 5.5.1 Error: STARTTLS is not available in this version",
        "502 5.5.2 Error: command not recognized",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: bad syntax",
        "500 5.5.2 Error: line too long",
        "250 2.0.0 Ok",
        "221 2.0.0 Bye",
    ]


@pytest_twisted.ensureDeferred
async def test_idle_connection_is_closed_with_421(start: Start) -> None:
    server = await start(clock=True, smtp=SmtpConfig(timeout=30.0))
    assert server.clock is not None
    client = await in_thread(server.raw)
    try:
        assert await in_thread(client.command, b"NOOP") == "250 2.0.0 Ok"
        server.clock.advance(29.9)
        assert await in_thread(client.nothing_within, 0.1)
        server.clock.advance(0.1)
        assert await in_thread(client.replies, 1) == [
            f"421 4.4.2 {HOSTNAME} Error: timeout exceeded"
        ]
        assert await in_thread(client.closed)
    finally:
        client.close()


@pytest_twisted.ensureDeferred
async def test_connection_open_and_close_are_logged(start: Start) -> None:
    server = await start()

    def talk() -> int:
        client = server.raw()
        port = client.sock.getsockname()[1]
        client.command(b"QUIT")
        client.close()
        return port

    with capture_logs() as logs:
        port = await in_thread(talk)
        await wait_for(lambda: any(e["event"] == "connection.close" for e in logs))
    events = [
        {k: e[k] for k in ("event", "protocol", "remote", "port")}
        for e in logs
        if e["event"].startswith("connection.")
    ]
    assert events == [
        {"event": "connection.open", "protocol": "smtp", "remote": "127.0.0.1", "port": port},
        {"event": "connection.close", "protocol": "smtp", "remote": "127.0.0.1", "port": port},
    ]


def test_factory_is_a_server_factory(tmp_path: Path) -> None:
    assert issubclass(SMTPFactory, ServerFactory)


# -- a real client ----------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_swaks_pipelined_delivery(start: Start) -> None:
    server = await start()
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/swaks",
        [
            "--server", "127.0.0.1", "--port", str(server.port),
            "--helo", "client.example",
            "--from", SENDER, "--to", f"{ALICE},{BOB}",
            "--pipeline",
            "--h-Subject", "probe",
            "--body", "hello from swaks",
        ],
        env=dict(os.environ),
    )
    assert code == 0, (out + err).decode()
    assert b"<** " not in out  # swaks marks failed replies so
    for user in (ALICE, BOB):
        [stored] = await server.inbox(user)
        assert stored.startswith(f"Return-Path: <{SENDER}>\r\nReceived: from client.example".encode())
        assert b"\r\nSubject: probe\r\n" in stored
        assert b"\r\n\r\nhello from swaks\r\n" in stored


@pytest_twisted.ensureDeferred
async def test_swaks_auth_login(start: Start) -> None:
    server = await start()
    out, err, code = await getProcessOutputAndValue(
        "/usr/bin/swaks",
        [
            "--server", "127.0.0.1", "--port", str(server.port),
            "--helo", "client.example",
            "--from", ALICE, "--to", BOB,
            "--auth", "LOGIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
            "--body", "signed in",
        ],
        env=dict(os.environ),
    )
    assert code == 0, (out + err).decode()
    [stored] = await server.inbox(BOB)
    assert b") with ESMTPA id " in stored

