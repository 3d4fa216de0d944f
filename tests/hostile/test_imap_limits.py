"""Issue 10, findings 5, 6, 7 and 13: IMAP commands that asked too much of the node.

Before the fix each of these froze the whole node (one reactor thread serves
every session): keywords handled in quadratic time, SEARCH matching on the
reactor, LIST comparing every mailbox with every other; and mailbox names
with "." and ".." levels were accepted.  Each test runs the attack against a
real node, checks the exact reply, that a bystander's NOOP still answers
within a second, and that nothing was stored half-way.
"""

from __future__ import annotations

import re
import select
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.mailserver import PASSWORD, LineClient, MailServer, running
from tests.hostile.conftest import ALICE, Bystander

#: Small enough for a LIST test of a few seconds, big enough that the old
#: quadratic LIST took well over a second of the reactor.
MAILBOX_CAP = 4000
DEFAULT_MAILBOXES = 5  # INBOX, Sent, Drafts, Trash, Junk


@pytest.fixture
def hostile_node(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    """The shared harness's node, with a mailbox cap a test can reach in seconds."""
    with running(tmp_path, provisioned, f"[imap]\nmax_mailboxes = {MAILBOX_CAP}\n") as node:
        yield node


class Attacker(LineClient):
    """Alice on a raw socket: exact replies, pipelining, and replies awaited later."""

    def __init__(self, node: MailServer) -> None:
        super().__init__(node.imap)
        self.until(b"\r\n")
        self.command(b'LOGIN %s "%s"' % (ALICE.encode(), PASSWORD.encode()))

    def command(self, line: bytes, tag: bytes = b"t") -> bytes:
        """Send one command; return everything up to and including its tagged reply."""
        self.send(tag + b" " + line + b"\r\n")
        return self.reply(tag)

    def tagged(self, line: bytes, tag: bytes = b"t") -> bytes:
        """Send one command; return its tagged reply line alone, without CRLF."""
        return last_line(self.command(line, tag))

    def reply(self, tag: bytes, timeout: float = 60) -> bytes:
        """What arrived up to and including the line that starts with ``tag``."""
        deadline = time.monotonic() + timeout
        while (end := self._end_of(tag)) is None:
            self._receive(deadline)
        data, self.buffer = self.buffer[:end], self.buffer[end:]
        return data

    def arrived(self, tag: bytes) -> bool:
        """Whether the tagged reply is here yet (reads what is there, never waits)."""
        while select.select([self.sock], [], [], 0)[0]:
            self._receive(time.monotonic() + 1)
        return self._end_of(tag) is not None

    def append(self, mailbox: bytes, message: bytes, flags: bytes = b"") -> bytes:
        """APPEND with a LITERAL+ literal (RFC 7888): one send, no continuation."""
        announce = b"a APPEND %s %s{%d+}\r\n" % (mailbox, flags + b" " if flags else b"", len(message))
        self.send(announce + message + b"\r\n")
        return last_line(self.reply(b"a"))

    def _end_of(self, tag: bytes) -> int | None:
        view = b"\r\n" + self.buffer
        start = view.find(b"\r\n" + tag + b" ")
        end = view.find(b"\r\n", start + 2) if start != -1 else -1
        return None if end == -1 else end  # an offset in view is one past CRLF in buffer

    def _receive(self, deadline: float) -> None:
        self.sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionError(self.buffer)
        self.buffer += chunk


def last_line(reply: bytes) -> bytes:
    return reply.rstrip(b"\r\n").rsplit(b"\r\n", 1)[-1]


def keywords(first: int, last: int) -> bytes:
    return b" ".join(b"k_%05d" % n for n in range(first, last))


def stored_keywords(attacker: Attacker, message: int = 1) -> set[bytes]:
    flags = re.search(rb"FLAGS \(([^)]*)\)", attacker.command(b"FETCH %d FLAGS" % message))
    assert flags is not None
    return {f for f in flags.group(1).split() if not f.startswith(b"\\")}


def permanent_flags(response: bytes) -> bytes:
    found = re.search(rb"\[PERMANENTFLAGS \(([^)]*)\)\]", response)
    assert found is not None, response
    return found.group(1)


# -- finding 5 -------------------------------------------------------------------


def test_keywords_are_capped_and_a_full_mailbox_stops_offering_new_ones(
    hostile_node: MailServer, bystander: Bystander
) -> None:
    attacker = Attacker(hostile_node)
    assert attacker.append(b"INBOX", b"Subject: k\r\n\r\nhello\r\n").startswith(b"a OK [APPENDUID")
    assert b"\\*" in permanent_flags(attacker.command(b"SELECT INBOX"))

    # The review's attack: 6,000 new keywords, four times (58.7 s for the 4th).
    for attempt in range(4):
        assert attacker.tagged(b"STORE 1 +FLAGS.SILENT (" + keywords(attempt * 6000, attempt * 6000 + 6000) + b")") \
            == b"t NO [LIMIT] Too many flags in one command (at most 300)."
        bystander.answers_within(1.0)
    assert stored_keywords(attacker) == set()

    # Under the per-command cap, the mailbox cap (256) holds: all or nothing.
    assert attacker.tagged(b"STORE 1 +FLAGS.SILENT (" + keywords(0, 200) + b")") == b"t OK Store completed."
    assert attacker.tagged(b"STORE 1 +FLAGS.SILENT (" + keywords(200, 300) + b")") \
        == b"t NO [LIMIT] Too many keywords in this mailbox (at most 256)."
    assert stored_keywords(attacker) == set(keywords(0, 200).split())
    filled = attacker.command(b"STORE 1 +FLAGS.SILENT (" + keywords(200, 256) + b")")
    assert filled.endswith(b"t OK Store completed.\r\n")
    assert b"\\*" not in permanent_flags(filled)  # RFC 3501 7.1: no new keywords here
    bystander.answers_within(1.0)

    selected = attacker.command(b"SELECT INBOX")
    assert b"\\*" not in permanent_flags(selected)
    assert b"k_00255" in permanent_flags(selected)
    assert attacker.tagged(b"STORE 1 -FLAGS.SILENT (k_00000)") == b"t OK Store completed."
    assert attacker.tagged(b"STORE 1 +FLAGS.SILENT (K_00000)") == b"t OK Store completed."  # known keyword
    assert attacker.tagged(b"STORE 1 +FLAGS.SILENT (brand_new)") \
        == b"t NO [LIMIT] Too many keywords in this mailbox (at most 256)."

    # APPEND and COPY cannot push a mailbox past it either, nor create a long keyword.
    assert attacker.append(b"INBOX", b"Subject: x\r\n\r\nx\r\n", b"(brand_new)") \
        == b"a NO [LIMIT] Too many keywords in this mailbox (at most 256)."
    assert attacker.append(b"Drafts", b"Subject: x\r\n\r\nx\r\n", b"(" + b"x" * 51 + b")") \
        == b"a NO [LIMIT] Keyword too long (at most 50 characters)."
    assert attacker.append(b"Drafts", b"Subject: x\r\n\r\nx\r\n", b"(" + b"x" * 50 + b")").startswith(b"a OK")
    assert attacker.tagged(b"COPY 1 Drafts") == b"t NO [LIMIT] Too many keywords in this mailbox (at most 256)."
    assert b"MESSAGES 1)" in attacker.command(b"STATUS INBOX (MESSAGES)")
    assert b"MESSAGES 1)" in attacker.command(b"STATUS Drafts (MESSAGES)")
    bystander.answers_within(1.0)


# -- finding 6 -------------------------------------------------------------------


def test_search_keys_are_capped_and_matching_leaves_the_reactor_free(
    hostile_node: MailServer, bystander: Bystander
) -> None:
    attacker = Attacker(hostile_node)
    line = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod\r\n"
    big = b"Subject: big\r\nContent-Type: text/plain\r\n\r\n" + line * (2 * 1024 * 1024 // len(line))
    assert attacker.append(b"INBOX", big).startswith(b"a OK [APPENDUID")
    attacker.command(b"SELECT INBOX")

    # The review's attack: 4,500 keys on a 2 MB message (12.5 s of the reactor).
    assert attacker.tagged(b"SEARCH " + b" ".join([b"NOT BODY zq"] * 4500)) \
        == b"t NO [LIMIT] Too many search keys (at most 1000)."
    bystander.answers_within(1.0)

    # At the cap, with keys that all differ: it takes a while, in a thread.
    attacker.send(b"s SEARCH " + b" ".join(b"NOT BODY q%04d" % n for n in range(1000)) + b"\r\n")
    noops = 0
    while not attacker.arrived(b"s"):
        bystander.answers_within(1.0)
        noops += 1
    assert noops >= 1
    assert attacker.reply(b"s").endswith(b"* SEARCH 1\r\ns OK Search completed.\r\n")

    assert attacker.command(b"SEARCH BODY Lorem").endswith(b"* SEARCH 1\r\nt OK Search completed.\r\n")
    assert attacker.command(b"SEARCH NOT BODY Lorem").endswith(b"* SEARCH\r\nt OK Search completed.\r\n")
    assert attacker.command(b"SEARCH OR SUBJECT big TEXT nothere").endswith(b"* SEARCH 1\r\nt OK Search completed.\r\n")
    bystander.answers_within(1.0)


# -- finding 7 -------------------------------------------------------------------


def create_many(attacker: Attacker, names: list[bytes], per_send: int = 500) -> list[bytes]:
    """Pipelined CREATEs, ``per_send`` commands per write; the tagged replies in order."""
    replies = []
    for start in range(0, len(names), per_send):
        chunk = names[start:start + per_send]
        attacker.send(b"".join(b"c%d CREATE %s\r\n" % (start + i, name) for i, name in enumerate(chunk)))
        for i in range(len(chunk)):
            replies.append(last_line(attacker.reply(b"c%d" % (start + i))))
    return replies


def list_names(attacker: Attacker) -> list[bytes]:
    return re.findall(rb'^\* LIST \([^)]*\) "/" "?([^"\r\n]*)"?\r$', attacker.command(b'LIST "" "*"'), re.M)


def test_list_is_linear_and_mailboxes_are_capped(hostile_node: MailServer, bystander: Bystander) -> None:
    attacker = Attacker(hostile_node)
    room = MAILBOX_CAP - DEFAULT_MAILBOXES
    names = [b"p%02d/box%05d" % (n // 1000, n) if n % 2 else b"box%05d" % n for n in range(room - 4)]
    # The parents p00..p03 of the odd ones bring the total to the cap exactly.
    replies = create_many(attacker, names)
    assert replies == [b"c%d OK Create completed." % n for n in range(len(names))]
    bystander.answers_within(1.0)

    attacker.send(b'l LIST "" "*"\r\n')
    while not attacker.arrived(b"l"):
        bystander.answers_within(1.0)
    listing = attacker.reply(b"l")
    assert listing.count(b"* LIST ") == MAILBOX_CAP
    assert b'* LIST (\\HasChildren) "/" "p03"\r\n' in listing
    assert b'* LIST (\\HasNoChildren) "/" "p03/box03989"\r\n' in listing
    assert b'* LIST (\\HasNoChildren) "/" "p00/box00001"\r\n' in listing
    assert b'* LIST (\\HasNoChildren) "/" "box03990"\r\n' in listing

    full = b"t NO [LIMIT] Too many mailboxes (at most %d)." % MAILBOX_CAP
    assert attacker.tagged(b"CREATE one-more") == full
    assert attacker.tagged(b"RENAME box00000 newparent/box00000") == full  # would create "newparent"
    assert attacker.tagged(b"RENAME box00000 p00/box00000") == b"t OK Rename completed."  # parent exists
    names_now = list_names(attacker)
    assert len(names_now) == MAILBOX_CAP
    assert b"one-more" not in names_now and b"newparent" not in names_now
    assert attacker.tagged(b"DELETE p00/box00000") == b"t OK Delete completed."
    assert attacker.tagged(b"CREATE one-more") == b"t OK Create completed."
    assert attacker.tagged(b"CREATE two-more") == full
    bystander.answers_within(1.0)


# -- finding 13 ------------------------------------------------------------------


def test_dot_levels_in_mailbox_names_are_refused(hostile_node: MailServer, bystander: Bystander) -> None:
    attacker = Attacker(hostile_node)
    dots = b'NO [CANNOT] "." and ".." are not allowed as a level of a mailbox name'
    for name in (b'"../../../etc/passwd"', b"..", b".", b"a/./b", b"a/..", b'"Sent/../../x"'):
        assert attacker.tagged(b"CREATE " + name) == b"t " + dots, name
    assert attacker.tagged(b"CREATE a//b") == b"t NO [CANNOT] the mailbox name has an empty level"
    assert attacker.tagged(b"RENAME Junk ../Junk") == b"t " + dots
    assert attacker.tagged(b"CREATE a..b/.c/c.") == b"t OK Create completed."  # dots inside a level are fine
    assert sorted(list_names(attacker)) == sorted(
        [b"INBOX", b"Sent", b"Drafts", b"Trash", b"Junk", b"a..b", b"a..b/.c", b"a..b/.c/c."]
    )
    bystander.answers_within(1.0)
