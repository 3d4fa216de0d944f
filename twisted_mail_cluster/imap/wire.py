"""How values are written in IMAP responses (RFC 3501 section 4 and 9).

Strings go out quoted when they can be, as literals when they cannot (CR, LF,
NUL, or too long to be friendly); mailbox names are modified UTF-7.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import datetime, timezone

import twisted.mail.imap4  # noqa: F401  (registers the "imap4-utf-7" codec)

_QUOTED_OK = re.compile(rb"^[^\r\n\x00]{0,1024}$")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def string(value: bytes | str) -> bytes:
    """A quoted string, or a literal when quoting cannot carry the value."""
    data = value.encode("utf-8") if isinstance(value, str) else value
    if _QUOTED_OK.match(data):
        return b'"' + data.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return b"{%d}\r\n" % len(data) + data


def nstring(value: bytes | str | None) -> bytes:
    return b"NIL" if value is None else string(value)


def mailbox_name(name: str) -> bytes:
    """A mailbox name as LIST/STATUS show it: modified UTF-7, quoted."""
    return string(name.encode("imap4-utf-7"))


def flag_list(flags: Iterable[str]) -> bytes:
    """A parenthesised flag list: sets in a stable (sorted) order, sequences as given."""
    ordered = sorted(flags) if isinstance(flags, (set, frozenset)) else list(flags)
    return b"(" + " ".join(ordered).encode("utf-8") + b")"


def internal_date(timestamp: float) -> bytes:
    """INTERNALDATE as ``"dd-Mon-yyyy hh:mm:ss +zzzz"`` (in UTC: nodes share no zone)."""
    when = datetime.fromtimestamp(timestamp, timezone.utc)
    return (
        f'"{when.day:02d}-{_MONTHS[when.month - 1]}-{when.year:04d} '
        f'{when.hour:02d}:{when.minute:02d}:{when.second:02d} +0000"'
    ).encode("ascii")


def number_list(numbers: Iterable[int]) -> bytes:
    return b" ".join(b"%d" % n for n in numbers)
