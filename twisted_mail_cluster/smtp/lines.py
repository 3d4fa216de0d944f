"""Reading SMTP lines one command at a time, with bounded lines.

This replaces ``LineOnlyReceiver.dataReceived`` for the SMTP server, for three
reasons:

* **Pipelining order** (Twisted #8126).  ``LineOnlyReceiver`` splits a whole
  packet into lines and runs each one at once; a command whose answer needs
  the store (RCPT, the final dot, AUTH) replies later, so the replies of a
  pipelined burst came back out of order.  Here, when a line's handler
  returns a Deferred, no further line is handled until it fires, and the
  socket stops being read meanwhile (``transport.pauseProducing``) so that a
  client cannot pile data up in our memory.  ``LineOnlyReceiver`` has no
  pause at all; ``LineReceiver``'s pause would work, but SMTP is built on
  the former.
* **Long lines** (``smtp.py`` ``lineLengthExceeded``).  Twisted drops a DATA
  phase back to command mode when a line exceeds ``MAX_LENGTH``, so the rest
  of the message text is read as commands.  Here an overlong line is
  reported once, the rest of it is skipped up to its end, and the
  conversation stays in whatever state it was.
* **Bare LF in message text.**  Scripts often send LF-only text (Python's
  ``smtplib`` does not convert ``bytes`` messages), which would otherwise
  read as one huge line.  With ``lf_ends_lines`` set (the DATA phase), a bare
  LF ends a line too, and ``line_crlf`` tells whether the line just read
  ended with a real CRLF and ``after_crlf`` whether the one before did, so
  that only ``<CRLF>.<CRLF>`` ends the data (the defence against SMTP
  smuggling), as Postfix's ``smtpd_forbid_bare_newline = normalize`` does.
  Commands always end with CRLF.

Lines are found by moving an offset through the buffer rather than slicing
it per line, so a message of N lines costs O(N), not O(N * packet size).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

CRLF = b"\r\n"
LF = b"\n"


class SerialLineReader:
    """Mixin for a protocol with ``lineReceived``; call ``feed`` from ``dataReceived``.

    ``lineReceived`` may return a Deferred: reading waits for it.  Subclasses
    provide ``line_limit`` (octets of a line *with* its CRLF, as
    RFC 5321 4.5.3.1.6 counts), ``line_too_long()``, ``command_failed(failure)``
    and the ``blocked``/``unblocked`` hooks.
    """

    line_limit: int = 1000
    transport: Any
    #: The protocol's (declared, not defined: a definition here would come
    #: before Twisted's in the method order).
    lineReceived: Callable[[bytes], object]
    #: Whether a bare LF ends a line (set it for the DATA phase only).
    lf_ends_lines = False
    #: Whether the line being handled ended with CRLF (rather than a bare LF)...
    line_crlf = True
    #: ...and whether the line before it did (skipped overlong lines included).
    after_crlf = True

    _data = b""
    _pos = 0
    _skipping = False  # inside an overlong line: drop everything up to its end
    _ended_crlf = True  # whether the last line consumed (even skipped) ended with CRLF
    _blocked = False
    _reading = False  # inside the loop of _process
    _paused = False

    def line_too_long(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def command_failed(self, failure: Failure) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def blocked(self) -> None:
        """A command is waiting for its answer."""

    @property
    def output_full(self) -> bool:
        """Whether the client has left too many replies unread: read and run nothing more."""
        return False

    def output_drained(self) -> None:
        """Call when ``output_full`` became false: handle what was held back, read again."""
        self._process()

    def unblocked(self) -> None:
        """The command has answered; reading goes on."""

    def feed(self, data: bytes) -> None:
        self._data = self._data[self._pos:] + data
        self._pos = 0
        self._process()

    def _process(self) -> None:
        if self._reading:
            return  # the loop below is already running (a Deferred fired synchronously)
        self._reading = True
        try:
            while not self._blocked and not self.output_full and not self._closing():
                line = self._next_line()
                if line is None:
                    break
                self._handle(line)
        finally:
            self._reading = False
            self._data = self._data[self._pos:]
            self._pos = 0
        self._pause_or_resume()

    def _next_line(self) -> bytes | None:
        """The next complete line (without its ending), or None when more data is needed.

        Octets are counted as RFC 5321 4.5.3.1.6 does: the line with its
        CRLF, and a bare LF counts as if it were a CRLF.
        """
        while True:
            lf = self.lf_ends_lines
            end = self._data.find(LF if lf else CRLF, self._pos)
            if end < 0:
                # A trailing CR may be the first half of the CRLF ending this line.
                half_crlf = len(self._data) > self._pos and self._data.endswith(b"\r")
                pending = len(self._data) - self._pos - half_crlf
                if not self._skipping and pending + 2 > self.line_limit:
                    self._skipping = True
                    self.line_too_long()
                if self._skipping:
                    self._pos = len(self._data) - half_crlf
                return None
            start = self._pos
            crlf = not lf or (end > start and self._data[end - 1] == 13)  # 13: CR
            self._pos = end + (1 if lf else 2)
            self.after_crlf, self._ended_crlf = self._ended_crlf, crlf
            if lf and crlf:
                end -= 1
            if self._skipping:
                self._skipping = False  # the end of the overlong line, already reported
                continue
            if end - start + 2 > self.line_limit:
                self.line_too_long()
                continue
            self.line_crlf = crlf
            return self._data[start:end]

    def discard_buffered(self) -> None:
        """Forget every octet received but not yet handled (lines after STARTTLS)."""
        self._data = b""
        self._pos = 0
        self._skipping = False

    def _handle(self, line: bytes) -> None:
        try:
            result = self.lineReceived(line)
        except Exception:
            self.command_failed(Failure())
            return
        if isinstance(result, Deferred):
            self._blocked = True
            result.addErrback(self.command_failed)
            result.addBoth(self._command_done)
            if self._blocked:
                self.blocked()

    def _command_done(self, ignored: object) -> None:
        self._blocked = False
        if not self._reading:
            self.unblocked()
        self._process()

    def _closing(self) -> bool:
        return self.transport is None or bool(self.transport.disconnecting)

    def _pause_or_resume(self) -> None:
        """Stop reading the socket while blocked or while replies pile up unread,
        so the client's data stays in the kernel."""
        if self._closing():
            return
        hold = self._blocked or self.output_full
        if hold and not self._paused:
            self._paused = True
            self.transport.pauseProducing()
        elif not hold and self._paused:
            self._paused = False
            self.transport.resumeProducing()
