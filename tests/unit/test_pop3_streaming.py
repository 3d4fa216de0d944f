"""RETR/TOP byte transforms and the pull producer, without a network.

The transforms keep state across chunks, so each is checked against a
whole-message reference for every way of cutting the input in two or three.
"""

from __future__ import annotations

import io
import re

import pytest
from twisted.internet.testing import StringTransport
from twisted.mail import pop3 as twisted_pop3

from twisted_mail_cluster.pop3.streaming import (
    DotStuffer,
    MessageSender,
    TopFilter,
    TransferStopped,
)


def lines_of(content: bytes) -> list[bytes]:
    """Lines with their endings (bytes.splitlines also splits on \\x0b, \\x1c, ...)."""
    return [line for line in re.split(rb"(?<=\n)", content) if line]


def reference_stuffed(content: bytes) -> bytes:
    """RFC 1939 3: CRLF lines, a "." prefixed to lines starting with ".", then CRLF.CRLF."""
    out = []
    for line in lines_of(content):
        if line.endswith(b"\n") and not line.endswith(b"\r\n"):
            line = line[:-1] + b"\r\n"
        out.append(b"." + line if line.startswith(b".") else line)
    body = b"".join(out)
    if body and not body.endswith(b"\r\n"):
        body += b"\r\n"
    return body + b".\r\n"


def reference_top(content: bytes, n: int) -> bytes:
    out, in_headers = [], True
    for line in lines_of(content):
        if not in_headers:
            if n == 0:
                break
            n -= 1
        out.append(line)
        if in_headers and line in (b"\r\n", b"\n"):
            in_headers = False
    return b"".join(out)


def cuts(content: bytes) -> list[list[bytes]]:
    """The content whole, and cut at every one and every pair of positions."""
    ways = [[content]]
    for i in range(len(content) + 1):
        ways.append([content[:i], content[i:]])
        for j in range(i, len(content) + 1):
            ways.append([content[:i], content[i:j], content[j:]])
    return ways


def stuff(chunks: list[bytes]) -> bytes:
    stuffer = DotStuffer()
    return b"".join(stuffer.feed(c) for c in chunks) + stuffer.end()


SAMPLES = [
    b"",
    b".",
    b"..\r\n",
    b".a\r\n.\r\nb\r\n",
    b"Subject: x\r\n\r\n.hidden\r\nend",
    b"a\nb\n.c\n",  # bare LF: still CRLF on the wire
    b"x\r\n\r\n.\r\n..\r\n",
]


@pytest.mark.parametrize("content", SAMPLES)
def test_dot_stuffing_does_not_depend_on_chunk_boundaries(content: bytes) -> None:
    expected = reference_stuffed(content)
    for chunks in cuts(content):
        assert stuff(chunks) == expected, chunks


def test_dot_stuffing_exact_bytes() -> None:
    assert stuff([b".start\r\nmid\r\n.\r\nend"]) == b"..start\r\nmid\r\n..\r\nend\r\n.\r\n"
    assert stuff([b"a\r\n", b".b\r\n"]) == b"a\r\n..b\r\n.\r\n"
    assert stuff([b""]) == b".\r\n"


def test_twisted_transform_chunk_is_what_we_replace() -> None:
    """Documents the upstream bug (pop3.py:1186); if this fails, Twisted fixed it."""
    transform = twisted_pop3.POP3().transformChunk
    assert transform(b".a\r\nb\r\n") == b".a\r\r\nb\r\r\n"


TOP_SAMPLE = b"From: a\r\nSubject: b\r\n\r\nline 1\r\n.line 2\r\nline 3\r\n"


@pytest.mark.parametrize("n", [0, 1, 2, 3, 10])
@pytest.mark.parametrize(
    "content",
    [TOP_SAMPLE, b"\r\nbody only\r\nmore\r\n", b"H: no body\r\nH2: x\r\n", b"H: x\r\n\r\nno final crlf"],
)
def test_top_filter_does_not_depend_on_chunk_boundaries(content: bytes, n: int) -> None:
    expected = reference_top(content, n)
    for chunks in cuts(content):
        top = TopFilter(n)
        assert b"".join(top.feed(c) for c in chunks) == expected, chunks


def test_top_filter_exact() -> None:
    top = TopFilter(1)
    assert top.feed(TOP_SAMPLE) == b"From: a\r\nSubject: b\r\n\r\nline 1\r\n"
    assert top.done


def drain(transport: StringTransport, sender: MessageSender) -> int:
    """Play the transport: ask for chunks until the producer unregisters; count the asks."""
    asks = 0
    while transport.producer is sender:
        sender.resumeProducing()
        asks += 1
    return asks


def test_sender_streams_one_chunk_per_request() -> None:
    content = b"".join(b".%06d\r\n" % i for i in range(40_000))  # 360 000 bytes
    transport = StringTransport()
    sender = MessageSender(io.BytesIO(content), transport)
    done = sender.start()
    # registerProducer on StringTransport does not pull: nothing written yet.
    assert transport.value() == b""
    sender.resumeProducing()
    assert len(transport.value()) <= MessageSender.CHUNK_SIZE * 2
    asks = 1 + drain(transport, sender)
    # One read per chunk, and one more that finds the end of the file.
    assert asks == -(-len(content) // MessageSender.CHUNK_SIZE) + 1
    assert transport.value() == reference_stuffed(content)
    assert done.called and done.result is None


def test_sender_top_stops_reading_early() -> None:
    body = b"".join(b"line %d\r\n" % i for i in range(100_000))
    source = io.BytesIO(b"Subject: s\r\n\r\n" + body)
    transport = StringTransport()
    sender = MessageSender(source, transport, top_lines=2)
    sender.start()
    assert drain(transport, sender) == 1
    assert transport.value() == b"Subject: s\r\n\r\nline 0\r\nline 1\r\n.\r\n"
    assert source.closed


def test_sender_reports_a_lost_connection() -> None:
    transport = StringTransport()
    sender = MessageSender(io.BytesIO(b"x" * 200_000), transport)
    done = sender.start()
    sender.resumeProducing()
    sender.stopProducing()
    failures: list[object] = []
    done.addErrback(failures.append)
    assert len(failures) == 1 and failures[0].check(TransferStopped)  # type: ignore[attr-defined]
    assert transport.producer is None


def test_sender_reports_a_read_error() -> None:
    class Broken(io.BytesIO):
        def read(self, size: int | None = -1) -> bytes:
            raise OSError("disk gone")

    transport = StringTransport()
    done = MessageSender(Broken(), transport).start()
    drain_failures: list[object] = []
    transport.producer.resumeProducing()
    done.addErrback(drain_failures.append)
    assert drain_failures[0].check(OSError)  # type: ignore[attr-defined]
    assert transport.value() == b""
