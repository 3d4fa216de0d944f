"""Clients that do not read, send huge literals before login, or open connection after connection.

Findings 1, 2 and 9 of the hostile-client review, each against a real node.
"""

from __future__ import annotations

import imaplib
import smtplib
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mailserver import PASSWORD, LineClient, MailServer, node_with, running

from .conftest import ALICE, BOB, Bystander, rss_kib

FLOOD = {"pop3": b"CAPA\r\n", "smtp": b"EHLO x\r\n", "imap": b"a CAPABILITY\r\n"}


def flood(port: int, command: bytes, connections: int, megabytes_each: float, seconds: float = 6.0) -> int:
    """Send ``command`` over and over on each connection and never read; the bytes the kernel took."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(connections)]
    for s in socks:
        s.setblocking(False)
    payload = command * (65536 // len(command))
    goal = int(megabytes_each * 2**20) * connections
    sent = 0
    deadline = time.monotonic() + seconds
    try:
        while sent < goal and time.monotonic() < deadline:
            moved = False
            for s in socks:
                try:
                    sent += s.send(payload)
                    moved = True
                except BlockingIOError:
                    pass
            if not moved:
                time.sleep(0.05)  # every socket is full: the node stopped reading them
        time.sleep(1)  # let the node catch up with what it did read
        return sent
    finally:
        for s in socks:
            s.close()


@pytest.mark.parametrize("protocol", ["pop3", "smtp", "imap"])
def test_a_client_that_never_reads_its_replies_costs_little_memory(
    hostile_node: MailServer, bystander: Bystander, protocol: str
) -> None:
    """Before: 8.5 MB of CAPA sent without reading grew the node by 417 MiB (EHLO 296, IMAP 42)."""
    assert hostile_node.process is not None
    pid = hostile_node.process.pid
    before = rss_kib(pid)
    connections = 20
    sent = flood(getattr(hostile_node, protocol), FLOOD[protocol], connections, megabytes_each=8.5)
    grown_mib = (rss_kib(pid) - before) / 1024
    assert sent > connections * 2**20  # a real flood: the kernel's buffers took megabytes per connection
    assert grown_mib < connections * 1.0, f"{grown_mib:.1f} MiB for {connections} connections"
    bystander.answers_within(1.0)


# -- before login, a command is small --------------------------------------------------------


def test_a_big_literal_before_login_is_refused_without_reading_it(
    hostile_node: MailServer, bystander: Bystander
) -> None:
    raw = LineClient(hostile_node.imap)
    raw.until(b"\r\n")
    raw.send(b"a APPEND INBOX {26214400}\r\n")
    assert raw.until(b"\r\n") == b"a BAD Literal too big.\r\n"  # no "+ Ready": nothing is spooled
    raw.send(b'b LOGIN {8}\r\n')
    assert raw.until(b"\r\n").startswith(b"+ ")  # a small literal (a user name) still works
    raw.send(b'x@y.test "pw"\r\n')
    assert raw.until(b"\r\n").startswith(b"b NO")
    raw.close()
    bystander.answers_within(1.0)


def test_many_literals_in_one_command_before_login_close_the_connection(
    hostile_node: MailServer, bystander: Bystander
) -> None:
    """Before: 5,000,000 `{0+}` after `a APPEND INBOX` took the node from 265 to 668 MB."""
    assert hostile_node.process is not None
    before = rss_kib(hostile_node.process.pid)
    raw = LineClient(hostile_node.imap)
    raw.until(b"\r\n")
    try:
        raw.send(b"a APPEND INBOX {0+}\r\n" + b" {0+}\r\n" * 200_000)
    except (BrokenPipeError, ConnectionResetError):
        pass  # the node hung up while we were still sending: that is the point
    assert raw.until(b"\r\n") == b"* BYE [LIMIT] Too many literals in one command.\r\n"
    assert (rss_kib(hostile_node.process.pid) - before) < 10 * 1024
    raw.close()
    bystander.answers_within(1.0)


@pytest.fixture
def quick_login_node(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    with running(tmp_path, provisioned, "[imap]\nlogin_timeout = 3\ncommand_timeout = 3\n") as node:
        yield node


def test_a_literal_trickled_byte_by_byte_meets_the_command_deadline(quick_login_node: MailServer) -> None:
    """Before: one byte every 20 s kept a command open for 640 s, though the idle timeout is 60 s."""
    raw = LineClient(quick_login_node.imap)
    raw.until(b"\r\n")
    raw.send(b"a LOGIN {4000}\r\n")
    raw.until(b"\r\n")
    started = time.monotonic()
    with pytest.raises(ConnectionError):
        for _ in range(40):  # a byte every 0.5 s: each one restarts the idle timer
            raw.send(b"x")
            time.sleep(0.5)
            raw.sock.settimeout(0.01)
            try:
                data = raw.sock.recv(4096)
            except TimeoutError:
                continue
            raw.buffer += data
            if not data or b"BYE" in raw.buffer:
                raise ConnectionError(raw.buffer)
    assert b"* BYE Command not received in time." in raw.buffer
    assert time.monotonic() - started < 10
    raw.close()


# -- connection limits -------------------------------------------------------------------------


LIMITS = """
[smtp]
max_connections_per_address = 4
[pop3]
max_connections_per_address = 4
[imap]
max_connections_per_address = 6
max_userip_connections = 3
"""


def settled(node: MailServer) -> MailServer:
    """The harness found the ports open by connecting to them: let the node see those go."""
    time.sleep(0.5)
    return node


@pytest.fixture
def limited(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    with running(tmp_path, provisioned, LIMITS) as node:
        yield settled(node)


def connect_from(source: str, port: int) -> LineClient:
    """A connection from another loopback address: another client, as the node counts them."""
    client = LineClient.__new__(LineClient)
    client.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    client.buffer = b""
    return client


@pytest.mark.parametrize(("protocol", "limit", "refusal"), [
    ("smtp", 4, b"421 4.7.0 mx.example.test Error: too many connections from your address\r\n"),
    ("pop3", 4, b"-ERR [SYS/TEMP] Too many connections from your address, try again later.\r\n"),
    ("imap", 6, b"* BYE [UNAVAILABLE] Too many connections from your address, try again later.\r\n"),
])
def test_one_address_gets_only_so_many_connections(
    limited: MailServer, protocol: str, limit: int, refusal: bytes
) -> None:
    port = getattr(limited, protocol)
    held = [LineClient(port) for _ in range(limit)]
    for client in held:
        assert not client.until(b"\r\n").startswith((b"421", b"-ERR", b"* BYE"))
    extra = LineClient(port)
    assert extra.until(b"\r\n") == refusal
    with pytest.raises(ConnectionError):
        extra.until(b"\r\n", timeout=5)  # and then it is closed
    other = connect_from("127.0.0.2", port)  # another address is not affected
    assert not other.until(b"\r\n").startswith((b"421", b"-ERR", b"* BYE"))
    held[0].close()
    time.sleep(0.5)
    again = LineClient(port)  # a freed slot is free again
    assert not again.until(b"\r\n").startswith((b"421", b"-ERR", b"* BYE"))
    for client in (*held[1:], extra, other, again):
        client.close()


def test_one_user_from_one_address_gets_only_so_many_imap_sessions(limited: MailServer) -> None:
    sessions = []
    for _ in range(3):
        session = imaplib.IMAP4("127.0.0.1", limited.imap, timeout=10)
        session.login(ALICE, PASSWORD)
        sessions.append(session)
    fourth = imaplib.IMAP4("127.0.0.1", limited.imap, timeout=10)
    with pytest.raises(imaplib.IMAP4.error, match=r"\[LIMIT\] Maximum number of connections from user\+IP"):
        fourth.login(ALICE, PASSWORD)
    assert fourth.login(BOB, PASSWORD)[0] == "OK"  # another user on the same connection is fine
    fourth.logout()
    assert sessions[0].noop()[0] == "OK"  # the sessions already open are untouched
    sessions[0].logout()
    time.sleep(0.5)
    fifth = imaplib.IMAP4("127.0.0.1", limited.imap, timeout=10)
    assert fifth.login(ALICE, PASSWORD)[0] == "OK"  # a session that ended frees its place
    for session in (fifth, *sessions[1:]):
        session.logout()


def test_the_node_wide_limit_refuses_everyone_past_it(tmp_path: Path, provisioned: Path) -> None:
    node = settled(node_with(tmp_path, provisioned, "[pop3]\nmax_connections = 3\n[smtp]\nmax_connections = 3\n"))
    try:
        held = [connect_from(f"127.0.0.{n}", node.pop3) for n in (2, 3, 4)]
        for client in held:
            assert client.until(b"\r\n").startswith(b"+OK")
        late = connect_from("127.0.0.5", node.pop3)
        assert late.until(b"\r\n") == b"-ERR [SYS/TEMP] Too many connections on this server, try again later.\r\n"
        with smtplib.SMTP("127.0.0.1", node.smtp, timeout=10) as smtp:  # other protocols count apart
            assert smtp.noop()[0] == 250
        for client in (*held, late):
            client.close()
    finally:
        node.stop()
