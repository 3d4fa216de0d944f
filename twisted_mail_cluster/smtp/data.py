"""The message text of one DATA phase, held once for all of its recipients.

Twisted's SMTP hands every line to one ``IMessage`` per recipient, which
would keep N copies and make N deliveries; the store wants one copy and one
``deliver`` call.  So the lines are gathered here, once, in a bytearray (no
per-line object overhead), and never beyond ``max_size``: past the limit the
text is dropped and only the verdict is kept until the final dot, where it
becomes the 552 (RFC 1870 6.3 allows refusing only at the end of DATA).
"""

from __future__ import annotations

import enum


class Verdict(enum.Enum):
    OK = "ok"
    TOO_BIG = "too big"
    LINE_TOO_LONG = "line too long"


class IncomingMessage:
    def __init__(self, max_size: int) -> None:
        self.max_size = max_size
        self.size = 0
        self.first_line: bytes | None = None
        self.verdict = Verdict.OK
        self._text = bytearray()

    def add_line(self, line: bytes) -> None:
        """Add one line, already dot-unstuffed and without its CRLF."""
        if self.first_line is None:
            self.first_line = line[:1000]
        self.size += len(line) + 2
        if self.verdict is not Verdict.OK:
            return
        if self.size > self.max_size:
            self._refuse(Verdict.TOO_BIG)
            return
        self._text += line
        self._text += b"\r\n"

    def line_too_long(self) -> None:
        """A line beyond the limit went by (and was discarded by the reader)."""
        self._refuse(Verdict.LINE_TOO_LONG)

    def _refuse(self, verdict: Verdict) -> None:
        if self.verdict is Verdict.OK:
            self.verdict = verdict
        self._text = bytearray()  # free it now, not at the final dot

    def text(self) -> bytes:
        return bytes(self._text)
