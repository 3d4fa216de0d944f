"""The SMTP line reader on its own: one command at a time, bounded lines, any packet split."""

from __future__ import annotations

import itertools

from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure

from twisted_mail_cluster.smtp.lines import SerialLineReader


class Recorder(SerialLineReader):
    """Records what a protocol would see; lines named in ``slow`` answer later."""

    def __init__(self, limit: int = 12, slow: tuple[bytes, ...] = ()) -> None:
        self.line_limit = limit
        self.transport = StringTransport()
        self.events: list[object] = []
        self.slow = slow
        self.pending: list[Deferred[None]] = []
        self.failures: list[Failure] = []
        self.endings: list[tuple[bool, bool]] = []

    def lineReceived(self, line: bytes) -> object:
        self.events.append(line)
        self.endings.append((self.after_crlf, self.line_crlf))
        if line in self.slow:
            d: Deferred[None] = Deferred()
            self.pending.append(d)
            return d
        if line == b"sync":
            return succeed(None)  # an already-fired Deferred must not block anything
        if line == b"boom":
            raise ValueError("boom")
        return None

    def line_too_long(self) -> None:
        self.events.append("TOO LONG")

    def command_failed(self, failure: Failure) -> None:
        self.failures.append(failure)
        self.events.append("FAILED")

    def blocked(self) -> None:
        self.events.append("blocked")

    def unblocked(self) -> None:
        self.events.append("unblocked")


STREAM = (
    b"one\r\n"
    b"\r\n"
    b"exactly-10\r\n"  # 10 + CRLF = 12 octets: the limit itself is allowed
    b"eleven-char\r\n"  # 13 octets: too long
    b"far too long for the limit\rRSET\r\n"  # skipped whole, CR inside included
    b"two\r\n"
    b"waytoolong\r\r\n"  # the CR before CRLF is part of the line: 13 octets
    b"x\r\n"
)
EXPECTED = [b"one", b"", b"exactly-10", "TOO LONG", "TOO LONG", b"two", "TOO LONG", b"x"]


def test_every_three_way_split_of_the_stream_reads_the_same() -> None:
    for a, b in itertools.combinations(range(1, len(STREAM)), 2):
        reader = Recorder()
        for chunk in (STREAM[:a], STREAM[a:b], STREAM[b:]):
            reader.feed(chunk)
        assert reader.events == EXPECTED, (a, b)


def test_byte_by_byte_reads_the_same() -> None:
    reader = Recorder()
    for i in range(len(STREAM)):
        reader.feed(STREAM[i:i + 1])
    assert reader.events == EXPECTED


def test_a_pending_command_holds_back_later_lines_and_pauses_reading() -> None:
    reader = Recorder(limit=100, slow=(b"RCPT",))
    reader.feed(b"MAIL\r\nRCPT\r\nDATA\r\nsync\r\nQUIT\r\n")
    assert reader.events == [b"MAIL", b"RCPT", "blocked"]
    assert reader.transport.producerState == "paused"
    reader.feed(b"more\r\n")  # already in flight when reading stopped: kept, not run
    assert reader.events == [b"MAIL", b"RCPT", "blocked"]
    reader.pending.pop().callback(None)
    assert reader.events == [
        b"MAIL", b"RCPT", "blocked", "unblocked", b"DATA", b"sync", b"QUIT", b"more",
    ]
    assert reader.transport.producerState == "producing"


def test_a_failing_command_is_reported_and_reading_goes_on() -> None:
    reader = Recorder(limit=100, slow=(b"slow",))
    reader.feed(b"boom\r\nslow\r\nnext\r\n")
    assert reader.events == [b"boom", "FAILED", b"slow", "blocked"]
    reader.pending.pop().errback(RuntimeError("store down"))
    assert reader.events[4:] == ["FAILED", "unblocked", b"next"]
    assert [f.type for f in reader.failures] == [ValueError, RuntimeError]


def test_nothing_is_read_once_the_connection_is_closing() -> None:
    reader = Recorder(limit=100)
    reader.transport.loseConnection()
    reader.feed(b"QUIT\r\n")
    assert reader.events == []


LF_STREAM = (
    b"crlf\r\n"
    b"bare\n"
    b".\n"
    b"too long, bare LF\n"  # 17 + 1 octets, counted as 17 + 2: too long
    b".\r\n"  # after an overlong line that ended with a bare LF
    b"cr\rinside\r\n"  # a bare CR is text
    b"\n"
    b".\r\n"
)


def test_with_lf_ends_lines_a_bare_lf_ends_a_line_and_endings_are_reported() -> None:
    for a, b in itertools.combinations(range(1, len(LF_STREAM)), 2):
        reader = Recorder(limit=18)
        reader.lf_ends_lines = True
        for chunk in (LF_STREAM[:a], LF_STREAM[a:b], LF_STREAM[b:]):
            reader.feed(chunk)
        assert reader.events == [
            b"crlf", b"bare", b".", "TOO LONG", b".", b"cr\rinside", b"", b".",
        ], (a, b)
        # (the line before ended with CRLF, this one does)
        assert reader.endings == [
            (True, True), (True, False), (False, False), (False, True),
            (True, True), (True, False), (False, True),
        ], (a, b)


def test_without_lf_ends_lines_a_bare_lf_is_text() -> None:
    reader = Recorder(limit=100)
    reader.feed(b"EHLO x\nMAIL FROM:<a@b>\r\n")
    assert reader.events == [b"EHLO x\nMAIL FROM:<a@b>"]
