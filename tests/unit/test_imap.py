"""IMAP server in-process, over real TCP, driven by imaplib and raw sockets."""

from __future__ import annotations

import imaplib
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.helpers.imap import SIMPLE
from tests.helpers.node import DOMAIN, PASSWORD, listen, make_node, stop
from twisted_mail_cluster.imap.server import IMAPFactory
from twisted_mail_cluster.node import Node

ALICE = f"alice@{DOMAIN}"
BOB = f"bob@{DOMAIN}"


class Server:
    def __init__(self, node: Node, port: int) -> None:
        self.node = node
        self.port = port

    def client(self) -> imaplib.IMAP4:
        return imaplib.IMAP4("127.0.0.1", self.port, timeout=10)

    def logged_in(self, user: str = ALICE) -> imaplib.IMAP4:
        client = self.client()
        client.login(user, PASSWORD)
        return client

    async def deliver(self, raw: bytes, *users: str, flags: frozenset[str] = frozenset()) -> Any:
        targets = [(await self.node.accounts.inbox(u), flags) for u in users or (ALICE,)]
        prepared = await self.node.mailboxes.prepare(raw)
        return await self.node.mailboxes.deliver(prepared, targets)

    def raw(self) -> "RawClient":
        return RawClient(self.port)


class RawClient:
    """Exact bytes in, exact bytes out: for pipelining, literals, IDLE."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buffer = b""
        self.read_until(b"\r\n")

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, marker: bytes, timeout: float = 10) -> bytes:
        deadline = time.monotonic() + timeout
        while marker not in self.buffer:
            self.sock.settimeout(max(0.01, deadline - time.monotonic()))
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("closed: " + self.buffer.decode("latin-1"))
            self.buffer += chunk
        index = self.buffer.index(marker) + len(marker)
        data, self.buffer = self.buffer[:index], self.buffer[index:]
        return data

    def command(self, tag: bytes, text: bytes) -> bytes:
        self.send(tag + b" " + text + b"\r\n")
        return self.read_tagged(tag)

    def read_tagged(self, tag: bytes, timeout: float = 10) -> bytes:
        out = b""
        while True:
            line = self.read_until(b"\r\n", timeout)
            out += line
            literal = re.search(rb"\{(\d+)\}\r\n$", line)
            if literal:
                size = int(literal.group(1))
                while len(self.buffer) < size:
                    self.buffer += self.sock.recv(65536)
                out += self.buffer[:size]
                self.buffer = self.buffer[size:]
                continue
            if line.startswith(tag + b" "):
                return out

    def login(self, user: str = ALICE) -> None:
        response = self.command(b"L", b'LOGIN "' + user.encode() + b'" "' + PASSWORD.encode() + b'"')
        assert b"L OK" in response

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    node = pytest_twisted.blockon(Deferred.fromCoroutine(make_node(tmp_path)))
    port_number, port = listen(IMAPFactory(node))
    yield Server(node, port_number)
    pytest_twisted.blockon(stop(port, node))


def in_thread(f: Any, *args: Any) -> Any:
    return deferToThread(f, *args)


@pytest_twisted.ensureDeferred
async def test_greeting_capabilities_and_login(server: Server) -> None:
    def session() -> tuple[Any, ...]:
        client = server.client()
        caps = client.capabilities
        typ, data = client.login(ALICE, PASSWORD)
        client.logout()
        return caps, typ, data

    caps, typ, data = await in_thread(session)
    for cap in ("IMAP4REV1", "IDLE", "UIDPLUS", "MOVE", "UNSELECT", "ID", "ENABLE", "SPECIAL-USE",
                "NAMESPACE", "LITERAL+", "AUTH=PLAIN", "CHILDREN"):
        assert cap in caps
    assert typ == "OK"
    assert b"CAPABILITY" in data[0]


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_refused_after_a_delay(server: Server) -> None:
    def session() -> tuple[str, float]:
        client = server.client()
        started = time.monotonic()
        try:
            client.login(ALICE, "wrong")
        except imaplib.IMAP4.error as e:
            return str(e), time.monotonic() - started
        return "accepted", 0.0

    message, elapsed = await in_thread(session)
    assert "AUTHENTICATIONFAILED" in message
    assert elapsed >= 0.05


@pytest_twisted.ensureDeferred
async def test_list_shows_special_use_mailboxes(server: Server) -> None:
    def session() -> list[bytes]:
        client = server.logged_in()
        typ, data = client.list()
        client.logout()
        return data

    data = await in_thread(session)
    assert b'(\\HasNoChildren) "/" "INBOX"' in data
    assert b'(\\HasNoChildren \\Sent) "/" "Sent"' in data
    assert b'(\\HasNoChildren \\Drafts) "/" "Drafts"' in data
    assert b'(\\HasNoChildren \\Trash) "/" "Trash"' in data
    assert b'(\\HasNoChildren \\Junk) "/" "Junk"' in data


@pytest_twisted.ensureDeferred
async def test_select_reports_rfc3501_required_responses(server: Server) -> None:
    await server.deliver(SIMPLE)
    await server.deliver(SIMPLE, flags=frozenset({"\\Seen"}))
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    response = await in_thread(raw.command, b"S", b"SELECT INBOX")
    raw.close()
    assert b"* 2 EXISTS\r\n" in response
    assert b"* 2 RECENT\r\n" in response
    assert b"* OK [UNSEEN 1]" in response
    assert b"* OK [UIDNEXT 3]" in response
    assert re.search(rb"\* OK \[UIDVALIDITY \d+\]", response)
    assert b"* OK [PERMANENTFLAGS (\\Answered \\Flagged \\Deleted \\Seen \\Draft \\*)]" in response
    assert b"S OK [READ-WRITE]" in response


@pytest_twisted.ensureDeferred
async def test_fetch_envelope_body_and_partial(server: Server) -> None:
    await server.deliver(SIMPLE)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    response = await in_thread(raw.command, b"F", b"FETCH 1 (UID RFC822.SIZE ENVELOPE BODY.PEEK[]<0.4> FLAGS)")
    full = await in_thread(raw.command, b"G", b"FETCH 1 BODY[TEXT]")
    raw.close()
    assert b"UID 1 RFC822.SIZE %d" % len(SIMPLE) in response
    assert b'ENVELOPE ("Mon, 7 Feb 1994 21:52:25 -0800" "Hello there" (("Bob" NIL "bob" "example.test"))' in response
    assert b"BODY[]<0> {4}\r\nFrom" in response
    assert b"FLAGS (\\Recent)" in response
    assert b"BODY[TEXT] {30}\r\nBody line one\r\nBody line two\r\n" in full
    # A non-peek fetch sets \Seen and says so.
    assert b"\\Seen" in full


@pytest_twisted.ensureDeferred
async def test_append_without_flags_gives_appenduid(server: Server) -> None:
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    response = await in_thread(raw.command, b"A", b"APPEND INBOX {%d+}\r\n" % len(SIMPLE) + SIMPLE)
    raw.close()
    assert re.search(rb"A OK \[APPENDUID \d+ 1\] Append completed", response)
    inbox = await server.node.accounts.inbox(ALICE)
    assert len((await server.node.store.imap_snapshot(inbox.id)).entries) == 1


@pytest_twisted.ensureDeferred
async def test_pipelined_select_then_fetch_runs_in_order(server: Server) -> None:
    await server.deliver(SIMPLE)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    raw.send(b"a SELECT INBOX\r\nb FETCH 1 (UID)\r\nc NOOP\r\n")
    response = await in_thread(raw.read_tagged, b"c")
    raw.close()
    assert response.index(b"a OK") < response.index(b"* 1 FETCH (UID 1)") < response.index(b"b OK")
    assert b"c OK" in response


@pytest_twisted.ensureDeferred
async def test_idle_sees_delivery_and_pop3_style_removal(server: Server) -> None:
    await server.deliver(SIMPLE)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    raw.send(b"I IDLE\r\n")
    await in_thread(raw.read_until, b"+ idling\r\n")
    await server.deliver(SIMPLE)
    exists = await in_thread(raw.read_until, b"* 2 EXISTS\r\n", 2)
    assert exists.endswith(b"* 2 EXISTS\r\n")
    inbox = await server.node.accounts.inbox(ALICE)
    first = (await server.node.store.pop3_list(inbox.id))[0]
    await server.node.mailboxes.pop3_remove(inbox, [first.message_id])
    expunge = await in_thread(raw.read_until, b"* 1 EXPUNGE\r\n", 2)
    assert expunge.endswith(b"* 1 EXPUNGE\r\n")
    raw.send(b"DONE\r\n")
    done = await in_thread(raw.read_tagged, b"I")
    raw.close()
    assert b"I OK Idle completed." in done


@pytest_twisted.ensureDeferred
async def test_idle_is_only_ended_by_done(server: Server) -> None:
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    raw.send(b"I IDLE\r\n")
    await in_thread(raw.read_until, b"+ idling\r\n")
    raw.send(b"X NOOP\r\n")
    response = await in_thread(raw.read_tagged, b"I")
    raw.close()
    assert b"I BAD Expected DONE." in response


@pytest_twisted.ensureDeferred
async def test_no_expunge_during_fetch_but_after_noop(server: Server) -> None:
    await server.deliver(SIMPLE)
    await server.deliver(SIMPLE)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    inbox = await server.node.accounts.inbox(ALICE)
    first = (await server.node.store.pop3_list(inbox.id))[0]
    await server.node.mailboxes.pop3_remove(inbox, [first.message_id])
    await deferLater(reactor, 0.05, lambda: None)
    during_fetch = await in_thread(raw.command, b"F", b"FETCH 1:* (FLAGS)")
    assert b"EXPUNGE" not in during_fetch
    # The expunged message is still message 1 for the client until told otherwise.
    assert b"* 2 FETCH (FLAGS (\\Recent))" in during_fetch
    noop = await in_thread(raw.command, b"N", b"NOOP")
    raw.close()
    assert b"* 1 EXPUNGE\r\n" in noop


@pytest_twisted.ensureDeferred
async def test_store_copy_move_expunge_uidplus(server: Server) -> None:
    for _ in range(3):
        await server.deliver(SIMPLE)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    store = await in_thread(raw.command, b"A", b"STORE 1 +FLAGS (\\Deleted)")
    assert b"* 1 FETCH (FLAGS (\\Deleted \\Recent))" in store
    copy = await in_thread(raw.command, b"B", b"UID COPY 2:3 Trash")
    assert re.search(rb"B OK \[COPYUID \d+ 2:3 1:2\]", copy)
    move = await in_thread(raw.command, b"C", b"UID MOVE 3 Junk")
    assert re.search(rb"\* OK \[COPYUID \d+ 3 1\]", move)
    assert b"* 3 EXPUNGE\r\n" in move
    expunge = await in_thread(raw.command, b"D", b"EXPUNGE")
    assert b"* 1 EXPUNGE\r\n" in expunge
    status = await in_thread(raw.command, b"E", b"STATUS Trash (MESSAGES UIDNEXT)")
    raw.close()
    assert b'* STATUS "Trash" (MESSAGES 2 UIDNEXT 3)' in status


@pytest_twisted.ensureDeferred
async def test_search_keyword_text_and_uid(server: Server) -> None:
    await server.deliver(SIMPLE)
    await server.deliver(SIMPLE.replace(b"Hello there", b"Quarterly =?utf-8?q?r=C3=A9sultats?="))
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    await in_thread(raw.command, b"A", b"STORE 2 +FLAGS ($Important)")
    keyword = await in_thread(raw.command, b"B", b"SEARCH KEYWORD $Important")
    subject = await in_thread(raw.command, b"C", b"UID SEARCH SUBJECT {9+}\r\nr\xc3\xa9sultat")
    body = await in_thread(raw.command, b"D", b"SEARCH BODY \"line two\" NOT SUBJECT Quarterly")
    empty = await in_thread(raw.command, b"E", b"SEARCH SUBJECT nothing-like-this")
    raw.close()
    assert b"* SEARCH 2\r\n" in keyword
    assert b"* SEARCH 2\r\n" in subject
    assert b"* SEARCH 1\r\n" in body
    assert b"* SEARCH\r\n" in empty


@pytest_twisted.ensureDeferred
async def test_create_rename_delete_hierarchy(server: Server) -> None:
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    assert b"A OK" in await in_thread(raw.command, b"A", b"CREATE Projects/2026/Q1")
    listing = await in_thread(raw.command, b"B", b'LIST "" "Projects/*"')
    assert b'(\\HasChildren) "/" "Projects/2026"' in listing
    assert b'(\\HasNoChildren) "/" "Projects/2026/Q1"' in listing
    assert b"C OK" in await in_thread(raw.command, b"C", b"RENAME Projects Archive")
    listing = await in_thread(raw.command, b"D", b'LIST "" "%"')
    assert b'"Archive"' in listing and b'"Projects"' not in listing
    refused = await in_thread(raw.command, b"E", b"DELETE Archive")
    assert b"E NO" in refused
    assert b"F OK" in await in_thread(raw.command, b"F", b"DELETE Archive/2026/Q1")
    utf7 = await in_thread(raw.command, b"G", b"CREATE Entw&APw-rfe")
    assert b"G OK" in utf7
    listing = await in_thread(raw.command, b"H", b'LIST "" "Entw*"')
    raw.close()
    assert b'"Entw&APw-rfe"' in listing
    names = [m.name for m in await server.node.store.list_mailboxes(ALICE)]
    assert "Entwürfe" in names


@pytest_twisted.ensureDeferred
async def test_oversized_literal_is_refused_before_upload(server: Server) -> None:
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    too_big = server.node.config.imap.max_literal_size + 1
    response = await in_thread(raw.command, b"A", b"APPEND INBOX {%d}" % too_big)
    still_works = await in_thread(raw.command, b"B", b"NOOP")
    raw.close()
    assert b"A NO [TOOBIG]" in response
    assert b"B OK" in still_works


@pytest_twisted.ensureDeferred
async def test_bad_commands_get_bad_and_session_continues(server: Server) -> None:
    raw = await in_thread(server.raw)
    bad = await in_thread(raw.command, b"A", b"FROB")
    early = await in_thread(raw.command, b"B", b"SELECT INBOX")
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    out_of_range = await in_thread(raw.command, b"C", b"FETCH 5 FLAGS")
    malformed = await in_thread(raw.command, b"D", b"FETCH 1 (FLAGS")
    ok = await in_thread(raw.command, b"E", b"NOOP")
    raw.close()
    assert b"A BAD" in bad
    assert b"B BAD" in early
    assert b"C BAD" in out_of_range
    assert b"D BAD" in malformed
    assert b"E OK" in ok


@pytest_twisted.ensureDeferred
async def test_logout_after_a_large_fetch_closes_once_the_client_has_read_it(server: Server) -> None:
    big = SIMPLE + b"0123456789abcdef" * (6 * 1024 * 1024 // 16) + b"\r\n"
    await server.deliver(big)
    raw = await in_thread(server.raw)
    await in_thread(raw.login)
    await in_thread(raw.command, b"S", b"SELECT INBOX")
    raw.send(b"F FETCH 1 BODY.PEEK[]\r\nB LOGOUT\r\n")
    await deferLater(reactor, 0.5, lambda: None)  # let the server's buffer fill up

    def read_to_eof() -> bytes:
        data = raw.buffer
        raw.sock.settimeout(10)
        while True:
            chunk = raw.sock.recv(1 << 20)
            if not chunk:
                return data
            data += chunk

    everything = await in_thread(read_to_eof)
    raw.close()
    assert b"F OK Fetch completed." in everything
    assert everything.endswith(b"B OK Logout completed.\r\n")
    assert b"{%d}\r\n" % len(big) in everything


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_its_bye_is_aborted_after_a_grace_period(server: Server) -> None:
    import dataclasses

    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from twisted_mail_cluster.imap.server import BYE_GRACE, IMAPServer

    clock = Clock()
    protocol = IMAPServer(dataclasses.replace(server.node, reactor=clock))
    transport = StringTransport(peerAddress=None)
    protocol.makeConnection(transport)
    protocol.dataReceived(b"a LOGOUT\r\n")
    assert transport.value().endswith(b"* BYE Logging out\r\na OK Logout completed.\r\n")
    # StringTransport: loseConnection sets "disconnecting", abortConnection "disconnected".
    assert transport.disconnecting and not transport.disconnected
    clock.advance(BYE_GRACE - 0.1)
    assert not transport.disconnected
    clock.advance(0.2)
    assert transport.disconnected
