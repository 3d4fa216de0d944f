"""Message bytes on the wire for RETR and TOP: dot-stuffing, the final dot, TOP's cut.

Why not Twisted's ``POP3.transformChunk`` (twisted/mail/pop3.py:1172-1186):
it turns every LF into CRLF, so the CRLF content we store goes out as
CR CR LF, and it stuffs only ``"\\r\\n."`` found *inside* one 16 KiB chunk,
so a line starting with "." at the very start of the message, or at the
start of a chunk, is sent unstuffed and a client may take it for the end of
the message.  ``_HeadersPlusNLines`` (TOP, pop3.py:79) has the same
chunk-boundary blindness.

Here the transforms keep their state across chunks, so the output does not
depend on where the chunks happen to be cut, and the message is streamed by a
pull producer registered only for the duration of one transfer: the
transport asks for the next chunk only when its buffer has drained, so a
large message never sits in memory, however slowly the client reads.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import IO

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.python.failure import Failure
from zope.interface import implementer

TERMINATOR = b".\r\n"
_BARE_LF = re.compile(rb"(?<!\r)\n")


class DotStuffer:
    """CRLF line endings and RFC 1939 byte-stuffing over a stream of chunks.

    Stored content already has CRLF line endings; a bare LF is still turned
    into CRLF rather than trusted, because a bare LF before the final dot
    would leave the client without its CRLF.CRLF terminator.
    """

    def __init__(self) -> None:
        self._at_line_start = True
        self._last_was_cr = False

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:
            return b""
        head = b""
        if chunk[:1] == b"\n":
            # The lookbehind cannot see the previous chunk's last byte.
            head = b"\n" if self._last_was_cr else b"\r\n"
            chunk = chunk[1:]
        if chunk.count(b"\n") != chunk.count(b"\r\n"):
            chunk = _BARE_LF.sub(b"\r\n", chunk)
        out = head + chunk
        if out:
            stuffed = out.replace(b"\n.", b"\n..")
            if self._at_line_start and stuffed[:1] == b".":
                stuffed = b"." + stuffed
            self._at_line_start = stuffed.endswith(b"\n")
            self._last_was_cr = stuffed.endswith(b"\r")
            return stuffed
        return out

    def end(self) -> bytes:
        """The multi-line terminator, preceded by a CRLF if the message lacked a final one."""
        return (b"" if self._at_line_start else b"\r\n") + TERMINATOR


class TopFilter:
    """Pass the headers, the blank line after them, then ``lines`` body lines (RFC 1939 TOP).

    Only the length and first byte of the current line are remembered, so a
    header line split across chunks still counts once and a blank line
    (empty, or a lone CR before the LF) is recognised wherever the cut falls.
    A message without a blank line is all header and passes whole.
    """

    def __init__(self, lines: int) -> None:
        self._left = lines
        self._in_headers = True
        self._line_length = 0
        self._line_head = b""
        self.done = False

    def feed(self, chunk: bytes) -> bytes:
        if self.done:
            return b""
        pos = 0
        while True:
            if not self._in_headers and self._left <= 0:
                self.done = True
                return chunk[:pos]
            newline = chunk.find(b"\n", pos)
            if newline < 0:
                if pos < len(chunk):
                    if self._line_length == 0:
                        self._line_head = chunk[pos:pos + 1]
                    self._line_length += len(chunk) - pos
                return chunk
            length = self._line_length + newline - pos
            head = self._line_head if self._line_length else chunk[pos:pos + 1]
            blank = length == 0 or (length == 1 and head == b"\r")
            self._line_length, self._line_head = 0, b""
            if self._in_headers:
                self._in_headers = not blank
            else:
                self._left -= 1
            pos = newline + 1


class TransferStopped(Exception):
    """The connection went away in the middle of a transfer."""


@implementer(IPullProducer)
class MessageSender:
    """Stream one message (or its top) to a transport, dot-stuffed and terminated.

    ``start`` fires when the terminator has been handed to the transport, or
    fails with TransferStopped if the connection was lost first, or with the
    read error if the content could not be read.  ``progress`` is called
    after every chunk, so the session can treat a client that keeps reading
    as active however long the transfer takes.
    """

    CHUNK_SIZE = 64 * 1024

    def __init__(
        self,
        source: IO[bytes],
        consumer: IConsumer,
        top_lines: int | None = None,
        progress: Callable[[], object] | None = None,
    ) -> None:
        self._source = source
        self._consumer = consumer
        self._top = TopFilter(top_lines) if top_lines is not None else None
        self._stuffer = DotStuffer()
        self._progress = progress
        self._done: Deferred[None] | None = None

    def start(self) -> Deferred[None]:
        self._done = Deferred()
        done = self._done
        self._consumer.registerProducer(self, False)
        return done

    def resumeProducing(self) -> None:
        if self._done is None:
            return
        try:
            chunk = self._source.read(self.CHUNK_SIZE)
        except Exception:
            self._finish(Failure())
            return
        finished = not chunk
        if self._top is not None:
            chunk = self._top.feed(chunk)
            finished = finished or self._top.done
        out = self._stuffer.feed(chunk)
        if finished:
            out += self._stuffer.end()
        if out:
            self._consumer.write(out)
        if self._progress is not None:
            self._progress()
        if finished:
            self._finish(None)

    def stopProducing(self) -> None:
        self._finish(Failure(TransferStopped("the connection was lost during the transfer")))

    def _finish(self, result: Failure | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        try:
            self._source.close()
        finally:
            self._consumer.unregisterProducer()
            if result is None:
                done.callback(None)
            else:
                done.errback(result)
