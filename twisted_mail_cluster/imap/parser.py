"""IMAP4 command grammar (RFC 3501 section 9, RFC 9051, LITERAL+ from RFC 7888).

This module is deliberately free of I/O.  The protocol class frames one
complete command off the wire (reading any literals, spooling large ones to
disk) and hands it here as a list of *segments*; everything about what the
bytes mean lives in this module so it can be tested exhaustively without a
reactor.

Segments representation
-----------------------
A framed command is ``list[bytes | Literal]`` that strictly alternates
``text, Literal, text, Literal, ..., text``: it always starts and ends with a
``bytes`` segment (possibly ``b""``), so its length is odd.

* Each text segment is the text of one wire line with its CRLF removed.  If
  the line ended in a literal announcement, the ``{N}`` / ``{N+}`` marker is
  removed too, but everything before the marker - in particular the SP that
  separates the marker from the previous argument - stays in the segment.
* The ``Literal`` that follows holds exactly the N octets announced.
* The next text segment is the rest of the line that followed the literal
  octets, starting with the very first octet after them.  So the SP between a
  literal and the next argument is the first byte of that segment, and a
  literal that ends the command is followed by ``b""``.

Example: the wire bytes ``A1 LOGIN {5}\\r\\nfred {3}\\r\\nabc\\r\\n`` arrive as::

    [b"A1 LOGIN ", Literal(b"fred "), b" ", Literal(b"abc"), b""]

Two literals back to back (``{3}\\r\\nabc{3}\\r\\ndef``) have an empty text
segment between them.  `split_literal_announcement` gives the protocol the
text to store for a line that ends in a marker.
"""

from __future__ import annotations

import base64
import datetime
import io
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import IO, TypeAlias, TypeVar

# Importing the module registers the "imap4-utf-7" codec used by
# encode_mailbox().  Its decoder is too lenient to validate client input
# (it accepts unterminated shifts and raw 8-bit), so decoding is done here.
import twisted.mail.imap4  # noqa: F401

__all__ = [
    "MAX_LINE",
    "MAX_NUMBER",
    "MAX_NUMBER64",
    "All",
    "And",
    "BodyKey",
    "CommandReader",
    "DateKey",
    "FetchAttribute",
    "FlagKey",
    "HeaderKey",
    "Literal",
    "ModSeqKey",
    "Not",
    "Or",
    "ParseError",
    "SearchKey",
    "SequenceKey",
    "SequenceSet",
    "SizeKey",
    "TextKey",
    "decode_mailbox_name",
    "encode_mailbox",
    "format_uid_set",
    "literal_announcement",
    "split_literal_announcement",
]

T = TypeVar("T")

#: Longest command line (without literals) the protocol should buffer.
MAX_LINE = 65536
#: ``number`` in RFC 3501 is a 32-bit unsigned integer.
MAX_NUMBER = 2**32 - 1
#: ``number64`` / ``mod-sequence-value`` (RFC 9051, RFC 7162) is 63-bit.
MAX_NUMBER64 = 2**63 - 1
#: Bounds recursion in SEARCH so hostile input gets BAD, not RecursionError.
MAX_SEARCH_DEPTH = 64


class ParseError(ValueError):
    """The command is malformed; the protocol answers ``BAD <message>``.

    Messages are short and meant to be shown to the client verbatim.
    """


# --------------------------------------------------------------------------
# Character classes (bytes regexes).  Each repeated unit is a single
# character so no pattern can backtrack catastrophically on hostile input.

# ATOM-CHAR: CHAR (7-bit, not NUL) minus atom-specials "(" ")" "{" SP CTL
# "%" "*" DQUOTE "\" "]".
_ATOM = re.compile(rb'[^(){ %*"\\\]\x00-\x1f\x7f-\xff]+')
# ASTRING-CHAR = ATOM-CHAR / "]".
_ASTRING = re.compile(rb'[^(){ %*"\\\x00-\x1f\x7f-\xff]+')
# tag = 1*<any ASTRING-CHAR except "+">.
_TAG = re.compile(rb'[^(){ %*"\\+\x00-\x1f\x7f-\xff]+')
# list-char = ATOM-CHAR / list-wildcards / resp-specials.
_LIST_CHARS = re.compile(rb'[^(){ "\\\x00-\x1f\x7f-\xff]+')
# quoted: TEXT-CHAR except quoted-specials, or "\" quoted-specials.  8-bit
# octets are allowed (RFC 9051 UTF8-2/3/4; clients send them anyway).
_QUOTED = re.compile(rb'"((?:[^"\\\r\n\x00]|\\["\\])*)"')
_QUOTED_ESCAPE = re.compile(rb'\\(["\\])')
_DIGITS = re.compile(rb"[0-9]+")
_FETCH_NAME = re.compile(rb"[A-Za-z0-9.]+")
_SECTION_TEXT = re.compile(rb"[A-Za-z.]+")
# RFC 5322 ftext: printable US-ASCII except ":".
_HEADER_NAME = re.compile(rb"[\x21-\x39\x3b-\x7e]+")
_DATE = re.compile(rb"([0-9]{1,2})-([A-Za-z]{3})-([0-9]{4})")
_DATE_TIME = re.compile(
    rb"( [0-9]|[0-9]{1,2})-([A-Za-z]{3})-([0-9]{4}) "
    rb"([0-9]{2}):([0-9]{2}):([0-9]{2}) ([+-])([0-9]{2})([0-9]{2})"
)
_LITERAL_MARKER = re.compile(rb"\{([^{}]*)\}\Z")
_LITERAL_SIZE = re.compile(rb"([0-9]+)(\+?)")
# Modified UTF-7: printable US-ASCII except "&" stands for itself, "&-" is
# "&", and "&" modified-base64 "-" is UTF-16BE.
_MUTF7 = re.compile(rb"(?:[\x20-\x25\x27-\x7e]|&[A-Za-z0-9+,]*-)*")
_MUTF7_SHIFT = re.compile(rb"&([A-Za-z0-9+,]*)-")

# strptime's %b is locale-dependent; IMAP month names are not.
_MONTHS = {
    name: number
    for number, name in enumerate(
        (b"jan", b"feb", b"mar", b"apr", b"may", b"jun",
         b"jul", b"aug", b"sep", b"oct", b"nov", b"dec"),
        start=1,
    )
}

_SYSTEM_FLAGS = {
    name.lower(): "\\" + name
    for name in ("Seen", "Answered", "Flagged", "Deleted", "Draft", "Recent")
}


# --------------------------------------------------------------------------
# Framing helpers


def split_literal_announcement(line: bytes) -> tuple[bytes, int, bool] | None:
    """Split a line ending in ``{N}`` / ``{N+}`` into (text, N, non_sync).

    ``text`` is what the protocol stores as the text segment (the marker is
    dropped, the SP before it kept).  A trailing CRLF is tolerated.  Returns
    None when the line carries no announcement, so the command ends here.
    """
    line = line.removesuffix(b"\n").removesuffix(b"\r")
    match = _LITERAL_MARKER.search(line)
    if match is None:
        return None
    # "{" is not an ATOM-CHAR and cannot end a quoted string, so a line that
    # ends in "{...}" is a literal announcement or garbage - never text.
    size = _LITERAL_SIZE.fullmatch(match.group(1))
    if size is None:
        raise ParseError("invalid literal size")
    return line[: match.start()], _bounded_int(size.group(1), MAX_NUMBER), bool(size.group(2))


def literal_announcement(line: bytes) -> tuple[int, bool] | None:
    """Return (N, non_sync) if ``line`` ends with ``{N}`` or ``{N+}``."""
    split = split_literal_announcement(line)
    return None if split is None else split[1:]


def _bounded_int(digits: bytes, limit: int) -> int:
    """Convert validated digits without ever parsing an absurdly long run.

    Python refuses int() on >4300 digits with a plain ValueError, and big
    numbers are never legitimate, so the length check comes first.
    """
    significant = digits.lstrip(b"0")
    if len(significant) > len(str(limit)) or int(digits) > limit:
        raise ParseError("number out of range")
    return int(digits)


class Literal:
    """The value of a literal the protocol read off the wire.

    It is backed either by bytes (small literals) or by a seekable binary
    file such as a ``SpooledTemporaryFile``, so APPEND of a large message
    never has to live in memory.
    """

    __slots__ = ("_data", "_file", "size")

    def __init__(self, data: bytes) -> None:
        self._data: bytes | None = bytes(data)
        self._file: IO[bytes] | None = None
        self.size = len(self._data)

    @classmethod
    def from_file(cls, fileobj: IO[bytes], size: int | None = None) -> Literal:
        """Wrap a seekable file; ``size`` defaults to the file's length."""
        literal = cls.__new__(cls)
        literal._data = None
        literal._file = fileobj
        if size is None:
            size = fileobj.seek(0, io.SEEK_END)
        literal.size = size
        return literal

    def read(self) -> bytes:
        """The whole value; only sensible for small literals (strings)."""
        if self._data is not None:
            return self._data
        assert self._file is not None
        self._file.seek(0)
        return self._file.read(self.size)

    def open(self) -> IO[bytes]:
        """A binary stream positioned at the start of the value.

        A spooled temporary file cannot be reopened, so for file-backed
        literals this is the underlying file itself: do not close it, call
        `close` when the literal is no longer needed.
        """
        if self._data is not None:
            return io.BytesIO(self._data)
        assert self._file is not None
        self._file.seek(0)
        return self._file

    def close(self) -> None:
        """Release the backing file (deletes a temporary spool file)."""
        if self._file is not None:
            self._file.close()

    def __repr__(self) -> str:
        if self._data is not None and self.size <= 64:
            return f"Literal({self._data!r})"
        return f"<Literal of {self.size} octets>"


# --------------------------------------------------------------------------
# Mailbox names


def decode_mailbox_name(raw: bytes) -> str:
    """Strictly decode an RFC 3501 5.1.3 modified UTF-7 mailbox name.

    Strict because two spellings of one name would let a client create
    look-alike mailboxes; anything the canonical encoder would not produce
    is refused.
    """
    if _MUTF7.fullmatch(raw) is None:
        raise ParseError("mailbox name is not valid modified UTF-7")
    pieces = _MUTF7_SHIFT.split(raw)
    # split() alternates plain text and the captured base64 runs.
    return "".join(
        _decode_shift(piece) if index % 2 else piece.decode("ascii")
        for index, piece in enumerate(pieces)
    )


def _decode_shift(run: bytes) -> str:
    if not run:
        return "&"
    error = ParseError("mailbox name is not valid modified UTF-7")
    if len(run) % 4 == 1:
        raise error
    data = base64.b64decode(run + b"=" * (-len(run) % 4), altchars=b"+,", validate=True)
    # Re-encoding catches non-zero padding bits, i.e. non-canonical runs.
    if base64.b64encode(data, altchars=b"+,").rstrip(b"=") != run:
        raise error
    try:
        text = data.decode("utf-16-be")
    except UnicodeDecodeError:
        raise error from None
    if any("\x20" <= char <= "\x7e" for char in text):
        raise error  # printable ASCII MUST be sent as itself
    return text


def encode_mailbox(name: str, *, utf8: bool = False) -> bytes:
    """Wire form of a mailbox name (for LIST/STATUS responses and tests)."""
    return name.encode("utf-8") if utf8 else name.encode("imap4-utf-7")


def _normalise_inbox(name: str) -> str:
    # isascii() matters: "\u0131nbox".upper() == "INBOX" (dotless i).
    return "INBOX" if name.isascii() and name.upper() == "INBOX" else name


# --------------------------------------------------------------------------
# Sequence sets


@dataclass(frozen=True, slots=True)
class SequenceSet:
    """An IMAP sequence-set with ``*`` kept symbolic (``None``).

    ``parts`` holds (first, last) pairs exactly as sent; a single number n
    is (n, n).  Resolution against the mailbox happens late because ``*``
    means "the largest number in use" at execution time.
    """

    parts: tuple[tuple[int | None, int | None], ...]

    def __post_init__(self) -> None:
        if not self.parts:
            raise ValueError("empty sequence set")
        for part in self.parts:
            for number in part:
                if number is not None and not 1 <= number <= MAX_NUMBER:
                    raise ValueError(f"sequence number out of range: {number}")

    @classmethod
    def parse(cls, text: bytes | str) -> SequenceSet:
        """Parse a complete wire-form sequence set such as ``"1:3,7:*"``."""
        if isinstance(text, str):
            text = text.encode("ascii", "replace")
        reader = CommandReader([text])
        result = reader.sequence_set()
        reader.end()
        return result

    def resolve(self, largest: int) -> list[tuple[int, int]]:
        """Sorted, merged, inclusive ranges with ``*`` replaced by ``largest``.

        Reversed ranges are swapped (RFC 3501: 5:2 == 2:5) and lower bounds
        are clipped to 1, but upper bounds are *not* clipped to ``largest``:
        whether "1:10" in a 5-message mailbox is an error (sequence numbers)
        or harmless (UIDs) is the caller's decision.  With ``largest == 0``
        a lone ``*`` resolves to nothing.
        """
        spans = sorted(
            (min(first, last), max(first, last))
            for first, last in (
                (largest if a is None else a, largest if b is None else b)
                for a, b in self.parts
            )
        )
        merged: list[tuple[int, int]] = []
        for low, high in spans:
            low = max(low, 1)
            if high < low:
                continue
            if merged and low <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(merged[-1][1], high))
            else:
                merged.append((low, high))
        return merged

    def contains(self, number: int, largest: int) -> bool:
        """Whether ``number`` is in the set when ``*`` means ``largest``."""
        for a, b in self.parts:
            first = largest if a is None else a
            last = largest if b is None else b
            if min(first, last) <= number <= max(first, last):
                return True
        return False

    def __str__(self) -> str:
        def one(number: int | None) -> str:
            return "*" if number is None else str(number)

        return ",".join(
            one(a) if a == b else f"{one(a)}:{one(b)}" for a, b in self.parts
        )


def format_uid_set(uids: Iterable[int]) -> bytes:
    """Compress UIDs to wire form, e.g. [1, 2, 3, 5] -> b"1:3,5".

    Input order is preserved (only ascending runs are merged) because
    COPYUID pairs its source and destination sets element by element.
    An empty input gives b"", which is not a valid set: omit the response
    code instead.
    """
    runs: list[list[int]] = []
    for uid in uids:
        if not 1 <= uid <= MAX_NUMBER:
            raise ValueError(f"UID out of range: {uid}")
        if runs and uid == runs[-1][1] + 1:
            runs[-1][1] = uid
        else:
            runs.append([uid, uid])
    return b",".join(
        b"%d" % first if first == last else b"%d:%d" % (first, last)
        for first, last in runs
    )


# --------------------------------------------------------------------------
# FETCH attributes

_SIMPLE_FETCH = frozenset({
    "ENVELOPE", "FLAGS", "INTERNALDATE", "RFC822", "RFC822.HEADER",
    "RFC822.SIZE", "RFC822.TEXT", "BODYSTRUCTURE", "UID", "MODSEQ",
})
_FETCH_MACROS = {
    "ALL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"),
    "FAST": ("FLAGS", "INTERNALDATE", "RFC822.SIZE"),
    "FULL": ("FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"),
}
_SECTION_TEXTS = frozenset({"HEADER", "HEADER.FIELDS", "HEADER.FIELDS.NOT", "TEXT", "MIME"})


@dataclass(frozen=True, slots=True)
class FetchAttribute:
    """One FETCH data item.

    ``name`` is upper-case: "FLAGS", "RFC822.SIZE", "BODYSTRUCTURE", ...
    For ``BODY`` the non-extensible structure and ``BODY[...]`` share the
    name and are told apart by ``has_section``; ``BODY.PEEK[...]`` is name
    "BODY" with ``peek=True``.  ``fields`` are upper-cased since header
    names are case-insensitive.  ``partial`` is (origin, length).
    """

    name: str
    has_section: bool = False
    peek: bool = False
    part: tuple[int, ...] = ()
    text: str | None = None
    fields: tuple[str, ...] = ()
    partial: tuple[int, int] | None = None

    @property
    def marks_seen(self) -> bool:
        """Whether fetching this item implicitly sets \\Seen (RFC 3501 6.4.5)."""
        if self.name == "BODY":
            return self.has_section and not self.peek
        return self.name in ("RFC822", "RFC822.TEXT")

    def response_name(self) -> bytes:
        """The item name to echo in the untagged FETCH response.

        .PEEK is never echoed and a partial echoes only its origin
        (``BODY[]<0>``), as RFC 3501 7.4.2 requires.
        """
        if not self.has_section:
            return self.name.encode("ascii")
        spec = b".".join(b"%d" % number for number in self.part)
        if self.text is not None:
            spec += (b"." if self.part else b"") + self.text.encode("ascii")
        if self.fields:
            names = b" ".join(_astring_wire(name.encode("ascii")) for name in self.fields)
            spec += b" (" + names + b")"
        result = b"BODY[" + spec + b"]"
        if self.partial is not None:
            result += b"<%d>" % self.partial[0]
        return result


def _astring_wire(value: bytes) -> bytes:
    """Atom form when possible, else a quoted string."""
    if _ASTRING.fullmatch(value):
        return value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


# --------------------------------------------------------------------------
# SEARCH program tree


@dataclass(frozen=True, slots=True)
class All:
    """ALL."""


@dataclass(frozen=True, slots=True)
class FlagKey:
    """A flag test: ``present=False`` for UNSEEN, UNKEYWORD x, OLD, ...

    ``flag`` is a canonical system flag ("\\Seen", "\\Recent", ...) or a
    keyword exactly as sent (keywords compare case-insensitively).
    """

    flag: str
    present: bool


@dataclass(frozen=True, slots=True)
class HeaderKey:
    """Substring match in a header field; ``field`` is upper-case.

    FROM/TO/CC/BCC/SUBJECT are HeaderKey("FROM", ...) etc.  An empty
    ``value`` means "has this header" (RFC 3501 6.4.4).
    """

    field: str
    value: str


@dataclass(frozen=True, slots=True)
class BodyKey:
    """BODY: substring in the body."""

    value: str


@dataclass(frozen=True, slots=True)
class TextKey:
    """TEXT: substring in header or body."""

    value: str


@dataclass(frozen=True, slots=True)
class DateKey:
    """BEFORE/ON/SINCE (``source="INTERNAL"``) and SENT* (``source="SENT"``).

    ``op`` is "BEFORE", "ON" or "SINCE"; comparisons ignore time and zone.
    """

    source: str
    op: str
    date: datetime.date


@dataclass(frozen=True, slots=True)
class SizeKey:
    """LARGER / SMALLER (``op``) than ``size`` octets (RFC822.SIZE)."""

    op: str
    size: int


@dataclass(frozen=True, slots=True)
class SequenceKey:
    """A bare sequence set (``uid=False``) or UID <set> (``uid=True``)."""

    sequence: SequenceSet
    uid: bool


@dataclass(frozen=True, slots=True)
class ModSeqKey:
    """CONDSTORE MODSEQ; entry/entry_type (lower-case) are optional."""

    modseq: int
    entry: str | None = None
    entry_type: str | None = None


@dataclass(frozen=True, slots=True)
class And:
    """All keys match: implicit conjunction and parenthesised lists."""

    keys: tuple[SearchKey, ...]


@dataclass(frozen=True, slots=True)
class Or:
    """OR key1 key2."""

    left: SearchKey
    right: SearchKey


@dataclass(frozen=True, slots=True)
class Not:
    """NOT key."""

    key: SearchKey


SearchKey: TypeAlias = (
    All | FlagKey | HeaderKey | BodyKey | TextKey | DateKey | SizeKey
    | SequenceKey | ModSeqKey | And | Or | Not
)

_FLAG_SEARCH = {
    "ANSWERED": ("\\Answered", True), "UNANSWERED": ("\\Answered", False),
    "DELETED": ("\\Deleted", True), "UNDELETED": ("\\Deleted", False),
    "DRAFT": ("\\Draft", True), "UNDRAFT": ("\\Draft", False),
    "FLAGGED": ("\\Flagged", True), "UNFLAGGED": ("\\Flagged", False),
    "SEEN": ("\\Seen", True), "UNSEEN": ("\\Seen", False),
    "RECENT": ("\\Recent", True), "OLD": ("\\Recent", False),
}
_HEADER_SEARCH = frozenset({"BCC", "CC", "FROM", "SUBJECT", "TO"})
_DATE_SEARCH = {
    "BEFORE": ("INTERNAL", "BEFORE"), "ON": ("INTERNAL", "ON"),
    "SINCE": ("INTERNAL", "SINCE"), "SENTBEFORE": ("SENT", "BEFORE"),
    "SENTON": ("SENT", "ON"), "SENTSINCE": ("SENT", "SINCE"),
}
_ARGUMENT_SEARCH = (
    _HEADER_SEARCH | _DATE_SEARCH.keys()
    | {"BODY", "TEXT", "HEADER", "KEYWORD", "UNKEYWORD", "LARGER", "SMALLER",
       "UID", "NOT", "OR", "MODSEQ"}
)


# --------------------------------------------------------------------------
# The reader


class CommandReader:
    """Cursor over one framed command (see the module docstring).

    Methods consume exactly their grammar element and nothing around it;
    the caller sequences them (``tag(); sp(); command_name(); sp(); ...;
    end()``).  Every failure is a `ParseError`.

    Tolerance policy: spaces between arguments must be single, but spaces
    trailing the whole command are ignored (Dovecot does the same and some
    clients send them).  ``utf8_mailboxes`` is for clients that enabled
    UTF8=ACCEPT (RFC 6855/9051): mailbox names are then raw UTF-8, not
    modified UTF-7.
    """

    def __init__(
        self, segments: Sequence[bytes | Literal], *, utf8_mailboxes: bool = False
    ) -> None:
        self._segments = _checked_segments(segments)
        self._index = 0
        self._pos = 0
        self._utf8_mailboxes = utf8_mailboxes

    # -- cursor primitives ------------------------------------------------

    @property
    def _text(self) -> bytes:
        text = self._segments[self._index]
        assert isinstance(text, bytes)
        return text

    def _peek(self) -> bytes:
        """Next octet of the current text segment (b"" at its end)."""
        return self._text[self._pos:self._pos + 1]

    def _at_literal(self) -> bool:
        return self._pos == len(self._text) and self._index + 1 < len(self._segments)

    def _take_literal(self) -> Literal | None:
        if not self._at_literal():
            return None
        literal = self._segments[self._index + 1]
        assert isinstance(literal, Literal)
        self._index += 2
        self._pos = 0
        return literal

    def _match(self, pattern: re.Pattern[bytes]) -> re.Match[bytes] | None:
        match = pattern.match(self._text, self._pos)
        if match is not None:
            self._pos = match.end()
        return match

    def _require(self, pattern: re.Pattern[bytes], what: str) -> bytes:
        match = self._match(pattern)
        if match is None:
            raise ParseError(f"expected {what}")
        return match.group(0)

    # -- public primitives ------------------------------------------------

    def peek_char(self) -> bytes:
        """The next octet; b"" at the end, b"{" where a literal comes next."""
        if self._at_literal():
            return b"{"
        return self._peek()

    def at_end(self) -> bool:
        """True when only (tolerated) trailing spaces remain."""
        return (
            self._index == len(self._segments) - 1
            and not self._text[self._pos:].strip(b" ")
        )

    def end(self) -> None:
        if not self.at_end():
            raise ParseError("unexpected trailing data")

    def accept(self, token: bytes) -> bool:
        """Consume ``token`` (exact, case-sensitive) if it comes next."""
        if self._text.startswith(token, self._pos):
            self._pos += len(token)
            return True
        return False

    def expect(self, token: bytes) -> None:
        if not self.accept(token):
            raise ParseError(f"expected {token.decode('ascii')}")

    def sp(self) -> None:
        """Exactly one SP: a doubled space is an error, not a separator."""
        if not self.accept(b" "):
            raise ParseError("expected SP")
        if self._peek() == b" ":
            raise ParseError("unexpected extra space")

    # -- tokens -----------------------------------------------------------

    def tag(self) -> bytes:
        return self._require(_TAG, "tag")

    def command_name(self) -> str:
        """Upper-cased command atom; call twice for "UID FETCH" etc."""
        return self._require(_ATOM, "command name").decode("ascii").upper()

    def atom(self) -> bytes:
        return self._require(_ATOM, "atom")

    def number(self) -> int:
        """RFC 3501 ``number``; leading zeros are tolerated."""
        return _bounded_int(self._require(_DIGITS, "number"), MAX_NUMBER)

    def number64(self) -> int:
        """RFC 9051 ``number64`` (MODSEQ, CHANGEDSINCE, LARGER/SMALLER)."""
        return _bounded_int(self._require(_DIGITS, "number"), MAX_NUMBER64)

    def nz_number(self) -> int:
        number = self.number()
        if number == 0:
            raise ParseError("expected non-zero number")
        return number

    def _quoted(self) -> bytes:
        match = self._match(_QUOTED)
        if match is None:
            raise ParseError("invalid quoted string")
        return _QUOTED_ESCAPE.sub(rb"\1", match.group(1))

    def string_or_literal(self) -> bytes | Literal:
        """``string`` keeping a literal as its `Literal` (APPEND's message)."""
        literal = self._take_literal()
        if literal is not None:
            return literal
        if self._peek() == b'"':
            return self._quoted()
        raise ParseError("expected string")

    def string(self) -> bytes:
        value = self.string_or_literal()
        return value.read() if isinstance(value, Literal) else value

    def astring(self) -> bytes:
        if self._at_literal() or self._peek() == b'"':
            return self.string()
        return self._require(_ASTRING, "string")

    def nstring(self) -> bytes | None:
        if self._at_literal() or self._peek() == b'"':
            return self.string()
        if self.atom().upper() != b"NIL":
            raise ParseError("expected string or NIL")
        return None

    # -- mailboxes --------------------------------------------------------

    def _decode_mailbox(self, raw: bytes) -> str:
        if not self._utf8_mailboxes:
            return _normalise_inbox(decode_mailbox_name(raw))
        try:
            return _normalise_inbox(raw.decode("utf-8"))
        except UnicodeDecodeError:
            raise ParseError("mailbox name is not valid UTF-8") from None

    def mailbox(self) -> str:
        """Mailbox name; exactly "INBOX" in any case becomes "INBOX".

        Children such as "inbox/Sub" are left alone: only the bare name is
        case-insensitive in RFC 3501.
        """
        return self._decode_mailbox(self.astring())

    def list_mailbox(self) -> str:
        """LIST/LSUB pattern: like `mailbox` but "%" and "*" are allowed."""
        if self._at_literal() or self._peek() == b'"':
            raw = self.string()
        else:
            raw = self._require(_LIST_CHARS, "mailbox pattern")
        return self._decode_mailbox(raw)

    # -- lists and flags --------------------------------------------------

    def paren_list(self, item: Callable[[], T]) -> list[T]:
        """``"(" [item *(SP item)] ")"``; emptiness is the caller's call."""
        self.expect(b"(")
        items: list[T] = []
        if self.accept(b")"):
            return items
        while True:
            items.append(item())
            if self.accept(b")"):
                return items
            self.sp()

    def flag(self) -> str:
        """A system flag (canonical case) or a keyword atom (as sent).

        Unknown backslash flags are refused like Dovecot does; \\Recent is
        returned so the caller can reject it with a precise message.
        """
        if self.accept(b"\\"):
            name = self._require(_ATOM, "flag").decode("ascii")
            canonical = _SYSTEM_FLAGS.get(name.lower())
            if canonical is None:
                raise ParseError(f"unknown system flag \\{name}")
            return canonical
        return self._require(_ATOM, "flag").decode("ascii")

    def flag_list(self) -> list[str]:
        """``flag-list``, or STORE's unparenthesised ``flag *(SP flag)``.

        The bare form runs to the end of the command, which is where STORE
        puts it.
        """
        if self._peek() == b"(":
            return self.paren_list(self.flag)
        flags = [self.flag()]
        while not self.at_end():
            self.sp()
            flags.append(self.flag())
        return flags

    # -- sequence sets ----------------------------------------------------

    def _seq_number(self) -> int | None:
        if self.accept(b"*"):
            return None
        if self._peek() == b"$":
            raise ParseError("$ (SEARCHRES) is not supported")
        return self.nz_number()

    def sequence_set(self) -> SequenceSet:
        parts: list[tuple[int | None, int | None]] = []
        while True:
            first = self._seq_number()
            last = self._seq_number() if self.accept(b":") else first
            parts.append((first, last))
            if not self.accept(b","):
                return SequenceSet(tuple(parts))

    # -- dates ------------------------------------------------------------

    def date(self) -> datetime.date:
        """SEARCH date ``d-Mon-yyyy``, bare or quoted."""
        match = _DATE.fullmatch(self.astring())
        if match is None:
            raise ParseError("invalid date")
        day, month, year = match.groups()
        return _build(datetime.date, int(year), _month(month), int(day))

    def date_time(self) -> datetime.datetime:
        """APPEND's ``"dd-Mon-yyyy hh:mm:ss +zzzz"`` as an aware datetime.

        The day may be space-padded (the RFC form) or, tolerantly, a single
        digit.
        """
        match = _DATE_TIME.fullmatch(self.string())
        if match is None:
            raise ParseError("invalid date-time")
        day, month, year, hour, minute, second, sign, zone_h, zone_m = match.groups()
        if int(zone_m) >= 60:
            raise ParseError("invalid date")
        offset = datetime.timedelta(hours=int(zone_h), minutes=int(zone_m))
        zone = _build(datetime.timezone, -offset if sign == b"-" else offset)
        return _build(
            datetime.datetime, int(year), _month(month), int(day.strip()),
            int(hour), int(minute), int(second), tzinfo=zone,
        )

    # -- FETCH ------------------------------------------------------------

    def fetch_attributes(self) -> list[FetchAttribute]:
        """A macro, one attribute, or a non-empty parenthesised list."""
        if self._peek() == b"(":
            attributes = self.paren_list(self._fetch_attribute)
            if not attributes:
                raise ParseError("empty fetch attribute list")
            return attributes
        name = self._fetch_name()
        macro = _FETCH_MACROS.get(name)
        if macro is not None:
            return [FetchAttribute(item) for item in macro]
        return [self._fetch_attribute_named(name)]

    def _fetch_name(self) -> str:
        return self._require(_FETCH_NAME, "fetch attribute").decode("ascii").upper()

    def _fetch_attribute(self) -> FetchAttribute:
        return self._fetch_attribute_named(self._fetch_name())

    def _fetch_attribute_named(self, name: str) -> FetchAttribute:
        if name in _SIMPLE_FETCH:
            return FetchAttribute(name)
        if name in _FETCH_MACROS:
            raise ParseError(f"{name} is not allowed in a list")
        if name.startswith("BINARY"):
            raise ParseError("BINARY fetch is not supported")
        if name not in ("BODY", "BODY.PEEK"):
            raise ParseError(f"unknown fetch attribute {name}")
        peek = name == "BODY.PEEK"
        if self._peek() != b"[":
            if peek:
                raise ParseError("BODY.PEEK needs a section")
            return FetchAttribute("BODY")
        part, text, fields = self._section()
        return FetchAttribute(
            "BODY", has_section=True, peek=peek, part=part, text=text,
            fields=fields, partial=self._partial(),
        )

    def _section(self) -> tuple[tuple[int, ...], str | None, tuple[str, ...]]:
        """``"[" [section-spec] "]"``, parsed in place because it contains
        spaces and a parenthesised header-list."""
        self.expect(b"[")
        part: list[int] = []
        while self._peek().isdigit():
            part.append(self.nz_number())
            if not self.accept(b"."):
                self.expect(b"]")
                return tuple(part), None, ()
        if not part and self.accept(b"]"):
            return (), None, ()
        match = self._match(_SECTION_TEXT)
        text = match.group(0).decode("ascii").upper() if match else ""
        if text not in _SECTION_TEXTS:
            raise ParseError("invalid section")
        if text == "MIME" and not part:
            raise ParseError("MIME needs a part number")
        fields: tuple[str, ...] = ()
        if text.startswith("HEADER.FIELDS"):
            self.sp()
            fields = tuple(self.paren_list(self._header_field_name))
            if not fields:
                raise ParseError("empty header list")
        self.expect(b"]")
        return tuple(part), text, fields

    def _header_field_name(self) -> str:
        name = self.astring()
        if _HEADER_NAME.fullmatch(name) is None:
            raise ParseError("invalid header field name")
        return name.decode("ascii").upper()

    def _partial(self) -> tuple[int, int] | None:
        if not self.accept(b"<"):
            return None
        origin = self.number()
        self.expect(b".")
        length = self.nz_number()
        self.expect(b">")
        return origin, length

    # -- SEARCH -----------------------------------------------------------

    def search_program(self) -> tuple[str | None, SearchKey]:
        """Parse ``[CHARSET astring SP] search-key *(SP search-key)``.

        Call it positioned after "SEARCH " (and after any ESEARCH RETURN
        options); it consumes the rest of the command.  Returns (charset,
        key): charset upper-cased or None, several top-level keys wrapped in
        `And`.  Strings are decoded as UTF-8 with replacement whatever the
        charset says; the caller answers NO [BADCHARSET] for charsets other
        than UTF-8/US-ASCII.
        """
        charset = None
        if self._next_atom_is(b"CHARSET"):
            self.atom()
            self.sp()
            raw = self.astring()
            if not raw.isascii():
                raise ParseError("invalid charset")
            charset = raw.decode("ascii").upper()
            self.sp()
        keys = [self._search_key(0)]
        while not self.at_end():
            self.sp()
            keys.append(self._search_key(0))
        return charset, keys[0] if len(keys) == 1 else And(tuple(keys))

    def _next_atom_is(self, word: bytes) -> bool:
        match = _ATOM.match(self._text, self._pos)
        return match is not None and match.group(0).upper() == word

    def _search_text(self) -> str:
        return self.astring().decode("utf-8", "replace")

    def _search_key(self, depth: int) -> SearchKey:
        if depth > MAX_SEARCH_DEPTH:
            raise ParseError("search program nested too deeply")
        char = self._peek()
        if char == b"(":
            keys = self.paren_list(lambda: self._search_key(depth + 1))
            if not keys:
                raise ParseError("empty search key list")
            return keys[0] if len(keys) == 1 else And(tuple(keys))
        if char == b"*" or char == b"$" or char.isdigit():
            return SequenceKey(self.sequence_set(), uid=False)
        name = self._require(_ATOM, "search key").decode("ascii").upper()
        if name == "ALL":
            return All()
        if name == "NEW":
            return And((FlagKey("\\Recent", True), FlagKey("\\Seen", False)))
        if name in _FLAG_SEARCH:
            return FlagKey(*_FLAG_SEARCH[name])
        if name not in _ARGUMENT_SEARCH:
            raise ParseError(f"unknown search key {name}")
        self.sp()
        return self._search_key_argument(name, depth)

    def _search_key_argument(self, name: str, depth: int) -> SearchKey:
        if name in _HEADER_SEARCH:
            return HeaderKey(name, self._search_text())
        if name in _DATE_SEARCH:
            return DateKey(*_DATE_SEARCH[name], self.date())
        if name == "HEADER":
            field = self._search_text().upper()
            self.sp()
            return HeaderKey(field, self._search_text())
        if name == "BODY":
            return BodyKey(self._search_text())
        if name == "TEXT":
            return TextKey(self._search_text())
        if name in ("KEYWORD", "UNKEYWORD"):
            return FlagKey(self.atom().decode("ascii"), name == "KEYWORD")
        if name in ("LARGER", "SMALLER"):
            return SizeKey(name, self.number64())
        if name == "UID":
            return SequenceKey(self.sequence_set(), uid=True)
        if name == "NOT":
            return Not(self._search_key(depth + 1))
        if name == "OR":
            left = self._search_key(depth + 1)
            self.sp()
            return Or(left, self._search_key(depth + 1))
        return self._modseq_key()

    def _modseq_key(self) -> ModSeqKey:
        """RFC 7162: ``MODSEQ [SP entry-name SP entry-type-req] SP valzer``
        (the SP after MODSEQ is already consumed)."""
        if self._peek() != b'"':
            return ModSeqKey(self.number64())
        entry = self._quoted().decode("utf-8", "replace")
        if not entry.lower().startswith("/flags/") or len(entry) == len("/flags/"):
            raise ParseError("invalid MODSEQ entry name")
        self.sp()
        entry_type = self.atom().decode("ascii").lower()
        if entry_type not in ("priv", "shared", "all"):
            raise ParseError("invalid MODSEQ entry type")
        self.sp()
        return ModSeqKey(self.number64(), entry, entry_type)


# --------------------------------------------------------------------------
# helpers


def _checked_segments(segments: Sequence[bytes | Literal]) -> list[bytes | Literal]:
    """Enforce the text/Literal alternation; a violation is a protocol bug,
    hence TypeError rather than ParseError."""
    if len(segments) % 2 == 0:
        raise TypeError("segments must alternate text and Literal, text first and last")
    checked: list[bytes | Literal] = []
    for index, segment in enumerate(segments):
        if index % 2:
            if not isinstance(segment, Literal):
                raise TypeError(f"segment {index} must be a Literal")
            checked.append(segment)
        else:
            if not isinstance(segment, (bytes, bytearray, memoryview)):
                raise TypeError(f"segment {index} must be bytes")
            checked.append(bytes(segment))
    return checked


def _month(name: bytes) -> int:
    month = _MONTHS.get(name.lower())
    if month is None:
        raise ParseError("invalid month")
    return month


def _build(factory: Callable[..., T], *args: object, **kwargs: object) -> T:
    """Construct a date/time object, turning range errors into ParseError."""
    try:
        return factory(*args, **kwargs)
    except (ValueError, OverflowError):
        raise ParseError("invalid date") from None
