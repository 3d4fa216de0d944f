"""MIME structure of a stored message, computed once at delivery.

The store keeps every message once, as CRLF bytes in a chunked blob store.
IMAP FETCH must never parse a message again, so at delivery :func:`analyse`
records, for every MIME part, the byte offsets of its MIME header and body,
plus the finished IMAP ENVELOPE, BODY and BODYSTRUCTURE strings.  Every
``BODY[section]`` is then a byte range of the blob (:meth:`MessageStructure.
section_range`), which lets large bodies be streamed from storage.

Conventions the IMAP layer relies on
------------------------------------
* ``envelope``, ``body`` and ``bodystructure`` are complete wire values,
  outer parentheses included: write ``b"ENVELOPE " + s.envelope``.
* Strings inside them are quoted (``\\`` and ``"`` escaped); valid UTF-8 stays
  quoted (RFC 9051, and what Dovecot does for UTF-8 headers).  A value that
  still holds CR/LF or is 8-bit but not UTF-8 becomes a literal
  ``{n}\\r\\n...``; NUL becomes U+FFFD.  So the strings may contain literals
  and must be sent verbatim, never re-quoted.
* Where the RFCs leave a choice, Dovecot is followed (boundary handling,
  part numbering of non-multipart parts, ``BODY[n.MIME]`` of a message/rfc822
  part, empty multiparts, MISSING_DOMAIN, first Content-* header wins).  One
  deliberate difference: media type, subtype, encoding, disposition type and
  parameter names are upper-cased as in the RFC 3501 examples
  (``"TEXT" "PLAIN" ("CHARSET" "US-ASCII")``); Dovecot keeps the case of the
  message.  IMAP clients compare these case-insensitively.
* RFC 2231 parameters (continuations, charsets) are decoded to UTF-8 and
  reported under the plain name (``"FILENAME" "€.pdf"``), as RFC 9051 7.5.2
  says servers SHOULD.
* :class:`SectionNotFound` means "no such part".  Dovecot answers that with an
  empty string, so the IMAP layer should send ``BODY[1.9] ""`` (an empty
  literal), not NO/BAD.  A syntactically impossible section (``MIME`` without a
  part number, an unknown specifier) raises :class:`ValueError`: that is a BAD.
* Garbage never raises.  Nesting deeper than :data:`MAX_DEPTH` or more than
  :data:`MAX_PARTS` parts turns the excess containers into opaque
  ``APPLICATION/OCTET-STREAM`` leaves (as Dovecot does), so the work per
  message stays bounded.  For the same reason an address field longer than
  1 MiB is cut at its last comma before that point, only 4 MiB of address
  text per message is parsed (later address fields become NIL), and only the
  first 64 KiB of a Content-Type or Content-Disposition value is read.

JSON form (:meth:`MessageStructure.to_json`)
--------------------------------------------
``{"v": 1, "size": int, "root": PART, "envelope": str, "body": str,
"bodystructure": str}`` where the three wire strings are the bytes decoded as
latin-1 (a lossless byte-to-code-point mapping; ``json`` escapes anything
non-ASCII), and ``PART`` is ``{"h": header_start, "b": body_start, "e": end,
"t": content_type, "x": encoding, ["cs": charset,] ["c": [PART, ...],]
["m": PART]}``.
"""

from __future__ import annotations

import binascii
import email.base64mime
import email.quoprimime
import email.utils
import json
import logging
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, NamedTuple

__all__ = [
    "MAX_DEPTH",
    "MAX_PARTS",
    "MessageStructure",
    "Part",
    "SectionNotFound",
    "analyse",
    "header_fields",
    "header_values",
    "normalise_line_endings",
]

log = logging.getLogger(__name__)

#: Containers (multipart, message/rfc822) nested deeper than this are opaque leaves.
MAX_DEPTH = 100
#: After this many parts no new part is created (Dovecot's default limit too).
MAX_PARTS = 10_000

# Python's parameter and address parsers are slow (and partly quadratic) on
# hostile input; these caps keep one delivery from burning seconds of CPU.
_PARAM_VALUE_CAP = 64 * 1024
_ADDRESS_VALUE_CAP = 1024 * 1024
_ADDRESS_BUDGET = 4 * 1024 * 1024

_NIL = b"NIL"
_REPLACEMENT = "\ufffd".encode()
_DEFAULT_CHARSET = ("charset", "US-ASCII")
_EMPTY_BODY = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
_EMPTY_BODYSTRUCTURE = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0 NIL NIL NIL NIL)'
_EMPTY_ENVELOPE = b"(" + b" ".join([_NIL] * 10) + b")"

_ENVELOPE_FIELDS = (
    "date", "subject", "from", "sender", "reply-to",
    "to", "cc", "bcc", "in-reply-to", "message-id",
)
_CONTENT_FIELDS = (
    "content-type", "content-transfer-encoding", "content-id", "content-description",
    "content-md5", "content-disposition", "content-language", "content-location",
)
_WANTED_FIELDS = frozenset(_ENVELOPE_FIELDS + _CONTENT_FIELDS + ("mime-version",))


# --------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------


class SectionNotFound(LookupError):
    """The section names a part the message does not have.

    Dovecot answers such a FETCH with an empty string rather than an error
    (clients probe for parts), so callers should send an empty literal.
    """


@dataclass(frozen=True)
class Part:
    """Byte offsets of one MIME part within the stored message.

    ``content_type``/``charset``/``encoding`` are kept so BINARY[] and SEARCH
    can decode a part without reading its header again.
    """

    header_start: int
    body_start: int
    end: int
    children: tuple[Part, ...] = ()
    message: Part | None = None
    content_type: str = "text/plain"  # effective type, lower case
    charset: str | None = None  # the charset parameter as written, if any
    encoding: str = "7bit"  # Content-Transfer-Encoding, lower case

    @property
    def size(self) -> int:
        """Octets of the body, as reported in BODYSTRUCTURE."""
        return self.end - self.body_start

    @property
    def is_multipart(self) -> bool:
        """True for multipart/* even without children: numbering depends on it."""
        return self.content_type.startswith("multipart/")


@dataclass(frozen=True)
class MessageStructure:
    """Everything IMAP needs about a message without reading it again."""

    size: int
    root: Part
    envelope: bytes
    body: bytes
    bodystructure: bytes

    def to_json(self) -> str:
        """Serialise losslessly (see the module docstring for the format)."""
        return json.dumps(
            {
                "v": 1,
                "size": self.size,
                "root": _part_to_obj(self.root),
                "envelope": self.envelope.decode("latin-1"),
                "body": self.body.decode("latin-1"),
                "bodystructure": self.bodystructure.decode("latin-1"),
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str) -> MessageStructure:
        """Inverse of :meth:`to_json`; ValueError on anything malformed."""
        try:
            obj = json.loads(text)
            if not isinstance(obj, dict) or obj.get("v") != 1:
                raise ValueError("unsupported message structure version")
            return cls(
                size=_int(obj["size"]),
                root=_part_from_obj(obj["root"]),
                envelope=_str(obj["envelope"]).encode("latin-1"),
                body=_str(obj["body"]).encode("latin-1"),
                bodystructure=_str(obj["bodystructure"]).encode("latin-1"),
            )
        except (KeyError, TypeError, RecursionError) as exc:
            raise ValueError(f"malformed message structure: {exc!r}") from exc

    def part_at(self, part: tuple[int, ...]) -> Part:
        """The Part a section number refers to, numbered the way Dovecot does.

        A non-multipart entity has exactly one part, "1", which is the entity
        itself; numbers continue into a message/rfc822 part's encapsulated
        message.  ``()`` is the root.
        """
        node = self.root
        last = len(part) - 1
        for i, number in enumerate(part):
            if number < 1:
                raise SectionNotFound(part)
            if node.is_multipart:
                if number > len(node.children):
                    raise SectionNotFound(part)
                node = node.children[number - 1]
            elif number != 1 or (i < last and node.message is None):
                raise SectionNotFound(part)
            if i < last and node.message is not None:
                node = node.message
        return node

    def section_range(self, part: tuple[int, ...], text: str | None) -> tuple[int, int]:
        """Byte range ``[start, end)`` of an IMAP section (RFC 3501 6.4.5).

        ``part=()`` is the message: None -> all of it, HEADER -> header with
        its blank line, TEXT -> body.  With a part number: None -> the part's
        body (for a non-multipart message part 1 is its body; a message/rfc822
        part's body is the whole encapsulated message); MIME -> the part's MIME
        header with its blank line (for a message/rfc822 part that is its own
        MIME header, as Dovecot does); HEADER/TEXT -> header/body of the
        encapsulated message of a message/rfc822 part.  HEADER.FIELDS[.NOT] is
        the HEADER range filtered with :func:`header_fields`.

        Raises SectionNotFound for a part that does not exist or HEADER/TEXT
        on a part that is not message/rfc822 (send an empty string), and
        ValueError for MIME without a part number or an unknown specifier.
        """
        spec = None if text is None else text.upper()
        if spec not in (None, "HEADER", "TEXT", "MIME"):
            raise ValueError(f"unknown section text {text!r}")
        if not part:
            if spec == "MIME":
                raise ValueError("MIME needs a part number")
            if spec is None:
                return 0, self.size
            return _header_or_text(self.root, spec)
        node = self.part_at(part)
        if spec is None:
            return node.body_start, node.end
        if spec == "MIME":
            return node.header_start, node.body_start
        if node.message is None:
            raise SectionNotFound(part)
        return _header_or_text(node.message, spec)


def _header_or_text(node: Part, spec: str) -> tuple[int, int]:
    if spec == "HEADER":
        return node.header_start, node.body_start
    return node.body_start, node.end


def _int(value: Any) -> int:
    if type(value) is not int or value < 0:
        raise ValueError(f"expected a non-negative integer, got {value!r}")
    return value


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {value!r}")
    return value


def _part_to_obj(part: Part) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "h": part.header_start,
        "b": part.body_start,
        "e": part.end,
        "t": part.content_type,
        "x": part.encoding,
    }
    if part.charset is not None:
        obj["cs"] = part.charset
    if part.children:
        obj["c"] = [_part_to_obj(child) for child in part.children]
    if part.message is not None:
        obj["m"] = _part_to_obj(part.message)
    return obj


def _part_from_obj(obj: Any) -> Part:
    if not isinstance(obj, dict):
        raise ValueError(f"expected a part object, got {obj!r}")
    charset = obj.get("cs")
    children = obj.get("c", [])
    message = obj.get("m")
    if not isinstance(children, list):
        raise ValueError("part children must be a list")
    return Part(
        header_start=_int(obj["h"]),
        body_start=_int(obj["b"]),
        end=_int(obj["e"]),
        children=tuple(_part_from_obj(child) for child in children),
        message=None if message is None else _part_from_obj(message),
        content_type=_str(obj["t"]),
        charset=None if charset is None else _str(charset),
        encoding=_str(obj["x"]),
    )


# --------------------------------------------------------------------------
# Line endings
# --------------------------------------------------------------------------


def normalise_line_endings(data: bytes) -> bytes:
    """Return ``data`` with bare LF and bare CR turned into CRLF.

    Byte offsets in the structure are offsets into the stored blob, so the
    blob must be canonical before :func:`analyse` sees it.  Only C-level
    ``bytes`` operations are used: this runs on every delivered message.
    """
    lf = data.count(b"\n")
    cr = data.count(b"\r")
    if cr == 0:
        return data.replace(b"\n", b"\r\n") if lf else data
    if lf == cr == data.count(b"\r\n"):
        return data
    return data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")


# --------------------------------------------------------------------------
# Header fields
# --------------------------------------------------------------------------

_FIELD_NAME = re.compile(rb"[!-9;-~]+")  # RFC 5322 ftext
_FOLD = re.compile(rb"(?:\r\n|\r|\n)(?=[ \t])")
_STRAY_BREAK = re.compile(rb"\r\n|\r|\n")


def _iter_fields(header: bytes) -> Iterator[tuple[str | None, bytes]]:
    """Yield ``(lower-case name or None, raw field)`` up to the first empty line.

    The raw field keeps its continuation lines and line endings, because
    HEADER.FIELDS must return the header bytes exactly as stored.  Lines that
    are not ``name:`` fields get the name None, so HEADER.FIELDS never matches
    them and HEADER.FIELDS.NOT keeps them.
    """
    pos = 0
    size = len(header)
    start = -1
    name: str | None = None
    while pos < size:
        newline = header.find(b"\n", pos)
        end = size if newline < 0 else newline + 1
        if end - pos <= 2 and header[pos:end] in (b"\r\n", b"\n", b"\r"):
            break
        if start >= 0 and header[pos] in b" \t":
            pos = end
            continue
        if start >= 0:
            yield name, header[start:pos]
        start = pos
        name = _field_name(header, pos, end)
        pos = end
    if start >= 0:
        yield name, header[start:pos]


def _field_name(header: bytes, pos: int, end: int) -> str | None:
    colon = header.find(b":", pos, end)
    if colon < 0:
        return None
    name = header[pos:colon].rstrip(b" \t")
    if not _FIELD_NAME.fullmatch(name):
        return None
    return name.decode("ascii").lower()


def _field_value(raw: bytes) -> bytes:
    """The unfolded value of a raw field, leading white space removed.

    Folding CRLFs go (RFC 5322 2.2.3); a stray line break elsewhere becomes a
    space, as Dovecot's ``imap_append_nstring_nolf`` does, so the value never
    needs a literal just for that.
    """
    value = raw[raw.find(b":") + 1:]
    if value.endswith(b"\n"):
        value = value[:-1]
    if value.endswith(b"\r"):
        value = value[:-1]
    value = _FOLD.sub(b"", value)
    value = _STRAY_BREAK.sub(b" ", value)
    return value.lstrip(b" \t")


def _collect_fields(header: bytes) -> dict[str, bytes]:
    """First occurrence of every field the structure needs.

    First wins for all of them: that is what Dovecot does for Content-*, and
    for duplicated envelope fields it is what MUAs display.
    """
    found: dict[str, bytes] = {}
    for name, raw in _iter_fields(header):
        if name in _WANTED_FIELDS and name not in found:
            found[name] = _field_value(raw)
    return found


def header_fields(header: bytes, names: Iterable[str], exclude: bool = False) -> bytes:
    """Serve BODY[HEADER.FIELDS (..)] and BODY[HEADER.FIELDS.NOT (..)].

    ``header`` is the HEADER range of the message or part.  Matching fields
    (names compared case-insensitively) are returned byte for byte with their
    continuation lines, in message order, followed by the blank line RFC 3501
    requires even when nothing matched.
    """
    wanted = {name.strip().lower() for name in names}
    out = []
    for name, raw in _iter_fields(header):
        if (name in wanted) != exclude:
            out.append(raw if raw.endswith(b"\n") else raw + b"\r\n")
    out.append(b"\r\n")
    return b"".join(out)


def header_values(header: bytes, name: str) -> list[str]:
    """Decoded, unfolded values of every ``name`` field, for IMAP SEARCH.

    RFC 2047 encoded-words are decoded whatever their charset; unknown
    charsets and broken encodings fall back to showing the text as it is.
    Raw 8-bit text is read as UTF-8, or as latin-1 when it is not UTF-8.
    """
    wanted = name.strip().lower()
    return [
        _decode_encoded_words(_bytes_to_text(_field_value(raw)))
        for field_name, raw in _iter_fields(header)
        if field_name == wanted
    ]


# --------------------------------------------------------------------------
# Text decoding
# --------------------------------------------------------------------------

_ENCODED_WORD = re.compile(r"=\?([^?\s]*)\?([QqBb])\?(.*?)\?=")


def _bytes_to_text(raw: bytes) -> str:
    """Best-effort text for search: UTF-8 if it is UTF-8, else latin-1."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    return text.replace("\x00", "\ufffd")


def _decode_charset(raw: bytes, charset: str) -> str:
    """Decode with a charset named by the sender, which may be anything."""
    try:
        return raw.decode(charset, "replace")
    except (LookupError, ValueError, TypeError):
        return _bytes_to_text(raw)


def _decode_encoded_words(text: str) -> str:
    """Decode RFC 2047 encoded-words, dropping white space between adjacent ones.

    Written on top of email's quoted-printable and base64 helpers rather than
    ``email.header.decode_header`` because the latter raises on bad base64 and
    round-trips unencoded text through ``raw-unicode-escape``, which mangles
    backslashes.
    """
    pieces = _ENCODED_WORD.split(text)
    if len(pieces) == 1:
        return text
    out = [pieces[0]]
    for i in range(1, len(pieces), 4):
        charset, encoding, payload, after = pieces[i:i + 4]
        if i > 1 and not out[-1].strip():
            out.pop()
        decoded = _decode_word(charset, encoding, payload)
        out.append(f"=?{charset}?{encoding}?{payload}?=" if decoded is None else decoded)
        out.append(after)
    return "".join(out)


def _decode_word(charset: str, encoding: str, payload: str) -> str | None:
    charset = charset.split("*", 1)[0]  # RFC 2231 language suffix
    try:
        if encoding in "Bb":
            raw = email.base64mime.decode(payload + "=" * (-len(payload) % 4))
        else:
            raw = email.quoprimime.header_decode(payload).encode("latin-1")
    except (ValueError, binascii.Error):
        return None
    return _decode_charset(raw, charset or "us-ascii")


def _to_text(raw: bytes) -> str:
    """Header bytes as str for the email package, reversibly (surrogateescape)."""
    return raw.decode("utf-8", "surrogateescape")


def _to_bytes(text: str) -> bytes:
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "replace")


# --------------------------------------------------------------------------
# IMAP string syntax
# --------------------------------------------------------------------------


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _quote(value: bytes | str) -> bytes:
    """An IMAP string: quoted when possible, a literal otherwise."""
    if isinstance(value, str):
        value = _to_bytes(value)
    if b"\x00" in value:
        value = value.replace(b"\x00", _REPLACEMENT)
    if b"\r" in value or b"\n" in value or not (value.isascii() or _is_utf8(value)):
        return b"{%d}\r\n" % len(value) + value
    return b'"' + value.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def _nstring(value: bytes | str | None) -> bytes:
    return _NIL if value is None else _quote(value)


# --------------------------------------------------------------------------
# Content-* headers
# --------------------------------------------------------------------------

_TOKEN = r"[!#$%&'*+\-.0-9A-Z^_`a-z{|}~]+"  # RFC 2045 token
_TOKEN_RE = re.compile(_TOKEN)
_MEDIA_TYPE = re.compile(rf"\s*({_TOKEN})\s*/\s*({_TOKEN})\s*")
_COMMENT = re.compile(r"\([^()]*\)")
_PARAM_SEGMENT = re.compile(r'(?:"(?:\\.|[^"\\])*"?|[^;"])+', re.S)
_ATOM = re.compile(rb"[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+")


@dataclass
class _ContentInfo:
    """What the Content-* headers of one part say, after defaulting."""

    type: str = "text"
    subtype: str = "plain"
    params: list[tuple[str, str]] = field(default_factory=list)
    encoding: str | None = None
    id: bytes | None = None
    description: bytes | None = None
    md5: bytes | None = None
    disposition: str | None = None
    disposition_params: list[tuple[str, str]] = field(default_factory=list)
    language: list[bytes] | None = None
    location: bytes | None = None

    @property
    def kind(self) -> str:
        if self.type == "multipart":
            return "multipart"
        if self.type == "message" and self.subtype in ("rfc822", "global"):
            return "message"
        return "leaf"

    def param(self, name: str) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return None

    @property
    def boundary(self) -> bytes | None:
        value = self.param("boundary")
        boundary = None if value is None else _to_bytes(value).rstrip(b" \t")
        return boundary or None


def _content_info(fields: dict[str, bytes], *, in_digest: bool, mime_part: bool) -> _ContentInfo:
    """Interpret a part's Content-* fields the way Dovecot does.

    A message (the root or an encapsulated one) that has neither MIME-Version
    nor Content-Type is not MIME, so its other Content-* fields mean nothing.
    A part without Content-Type is text/plain, or message/rfc822 directly
    inside multipart/digest (RFC 2046 5.1.5); an unparsable Content-Type
    means text/plain (RFC 2045 5.2).
    """
    info = _ContentInfo()
    if not (mime_part or "mime-version" in fields or "content-type" in fields):
        return info
    parsed = _parse_content_type(fields["content-type"]) if "content-type" in fields else None
    if parsed is not None:
        info.type, info.subtype, info.params = parsed
    elif "content-type" not in fields and in_digest:
        info.type, info.subtype = "message", "rfc822"
    info.encoding = _parse_token(fields.get("content-transfer-encoding"))
    info.id = fields.get("content-id")
    info.description = fields.get("content-description")
    info.md5 = fields.get("content-md5")
    info.location = fields.get("content-location")
    info.language = _parse_language(fields.get("content-language"))
    if "content-disposition" in fields:
        info.disposition, info.disposition_params = _parse_disposition(fields["content-disposition"])
    return info


def _parse_token(value: bytes | None) -> str | None:
    if value is None:
        return None
    token = value.strip(b" \t").decode("latin-1")
    return token.lower() if _TOKEN_RE.fullmatch(token) else None


def _parse_content_type(value: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    """type, subtype, params; None when invalid, which means text/plain (RFC 2045 5.2)."""
    segments = _PARAM_SEGMENT.findall(_to_text(value[:_PARAM_VALUE_CAP]))
    if not segments:
        return None
    media = _MEDIA_TYPE.fullmatch(_COMMENT.sub("", segments[0]))
    if media is None:
        return None
    return media.group(1).lower(), media.group(2).lower(), _parse_params(segments[1:])


def _parse_disposition(value: bytes) -> tuple[str | None, list[tuple[str, str]]]:
    segments = _PARAM_SEGMENT.findall(_to_text(value[:_PARAM_VALUE_CAP]))
    if not segments:
        return None, []
    kind = _COMMENT.sub("", segments[0]).strip()
    if not _TOKEN_RE.fullmatch(kind):
        return None, []
    return kind.lower(), _parse_params(segments[1:])


def _parse_params(segments: list[str]) -> list[tuple[str, str]]:
    """``name=value`` segments to decoded (lower-case name, value) pairs.

    The segments come from a linear regex split (``email.message._parseparam``
    is quadratic on hostile input); RFC 2231 continuations and charsets are
    then resolved by ``email.utils.decode_params``.
    """
    pairs: list[tuple[str, str]] = []
    for segment in segments:
        name, sep, value = segment.partition("=")
        name = name.strip().lower()
        if sep and name:
            pairs.append((name, value.strip()))
    decoded: list[tuple[str, Any]]
    try:
        decoded = email.utils.decode_params([("", "")] + pairs)[1:]
    except (ValueError, TypeError, IndexError):
        decoded = list(pairs)
    # decode_params appends RFC 2231 parameters last; restore the header's order.
    order: dict[str, int] = {}
    for index, (name, _value) in enumerate(pairs):
        order.setdefault(name.split("*", 1)[0], index)
    decoded.sort(key=lambda pair: order.get(pair[0], len(pairs)))
    return [(name, _param_value(value)) for name, value in decoded]


def _param_value(value: str | tuple[str | None, str | None, str]) -> str:
    if not isinstance(value, tuple):
        return email.utils.unquote(value)
    charset, _language, text = value
    text = email.utils.unquote(text)
    try:
        raw = text.encode("latin-1")  # decode_params leaves one char per octet
    except UnicodeEncodeError:
        raw = _to_bytes(text)
    return _decode_charset(raw, charset or "us-ascii")


def _parse_language(value: bytes | None) -> list[bytes] | None:
    if value is None:
        return None
    tags = []
    for item in value.split(b","):
        item = item.strip(b" \t")
        if not _ATOM.fullmatch(item):
            break
        tags.append(item)
    return tags or None


# --------------------------------------------------------------------------
# Addresses (ENVELOPE)
# --------------------------------------------------------------------------

_ADDRESS_SPECIAL = re.compile(r'["(\[<>,:;]')
_QUOTED_TAIL = re.compile(r'(?:\\.|[^"\\])*"?', re.S)
_LITERAL_TAIL = re.compile(r'(?:\\.|[^\]\\])*\]?', re.S)
_COMMENT_TOKEN = re.compile(r"[()\\]")

_Address = tuple[bytes | None, bytes | None, bytes | None, bytes | None]
_GROUP_END: _Address = (None, None, None, None)


def _skip(pattern: re.Pattern[str], text: str, pos: int) -> int:
    match = pattern.match(text, pos)
    return len(text) if match is None else match.end()


def _skip_comment(text: str, pos: int) -> int:
    """Index after the comment whose "(" is just before ``pos`` (comments nest)."""
    depth = 1
    while depth:
        match = _COMMENT_TOKEN.search(text, pos)
        if match is None:
            return len(text)
        pos = match.end()
        token = match.group()
        if token == "\\":
            pos += 1
        else:
            depth += 1 if token == "(" else -1
    return pos


def _split_address_list(text: str) -> list[tuple[str, str]]:
    """Split at top-level "," ":" ";" into ("addr"|"start"|"end", text) items.

    ``email.utils.getaddresses`` flattens groups, but RFC 3501 reports group
    boundaries, so groups are found here and each member is handed to
    getaddresses.  Quotes, comments, domain literals and <...> are skipped.
    """
    items: list[tuple[str, str]] = []
    start = pos = 0
    in_group = in_angle = False
    while True:
        match = _ADDRESS_SPECIAL.search(text, pos)
        if match is None:
            break
        char, pos = match.group(), match.end()
        if char == '"':
            pos = _skip(_QUOTED_TAIL, text, pos)
        elif char == "(":
            pos = _skip_comment(text, pos)
        elif char == "[":
            pos = _skip(_LITERAL_TAIL, text, pos)
        elif char in "<>":
            in_angle = char == "<"
        elif in_angle:
            continue
        elif char == ",":
            items.append(("addr", text[start:match.start()]))
            start = pos
        elif char == ":" and not in_group:
            items.append(("start", text[start:match.start()]))
            in_group, start = True, pos
        elif char == ";" and in_group:
            items.append(("addr", text[start:match.start()]))
            items.append(("end", ""))
            in_group, start = False, pos
    items.append(("addr", text[start:]))
    if in_group:
        items.append(("end", ""))
    return items


def _phrase(text: str) -> str:
    text = " ".join(_COMMENT.sub(" ", text).split())
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return email.utils.unquote(text)
    return text


def _mailbox(name: str, addr: str) -> _Address:
    """One (name adl mailbox host) entry; never a NIL host, which would mean a group."""
    local, at, host = addr.rpartition("@")
    if not at:
        local, host = addr, ""
    if len(local) >= 2 and local[0] == local[-1] == '"':
        local = email.utils.unquote(local)
    return (
        _to_bytes(name) if name else None,
        None,
        _to_bytes(local or "MISSING_MAILBOX"),
        _to_bytes(host or "MISSING_DOMAIN"),
    )


def _parse_addresses(value: bytes) -> list[_Address]:
    addresses: list[_Address] = []
    for kind, text in _split_address_list(_to_text(value)):
        if kind == "start":
            addresses.append((None, None, _to_bytes(_phrase(text)), None))
        elif kind == "end":
            addresses.append(_GROUP_END)
        elif text.strip():
            addresses.extend(
                _mailbox(name, addr)
                for name, addr in email.utils.getaddresses([text])
                if name or addr
            )
    return addresses


def _address_list(addresses: list[_Address]) -> bytes:
    if not addresses:
        return _NIL
    return b"(" + b"".join(
        b"(" + b" ".join(_nstring(item) for item in address) + b")" for address in addresses
    ) + b")"


# --------------------------------------------------------------------------
# The structure scanner
# --------------------------------------------------------------------------

_BLANK_LINE = re.compile(rb"\n\r?\n")


class _Hit(NamedTuple):
    """A boundary line: [start, end) including its line ending."""

    start: int
    end: int
    close: bool
    owner: int  # index of the multipart in the boundary stack


class _Boundary:
    """An active multipart boundary plus a cache of its next line.

    The cache makes the scan linear: positions only move forward, so a found
    line stays valid until consumed, and "none before X" stays valid because
    an outer boundary at X ends this multipart anyway.
    """

    __slots__ = ("pattern", "hit", "clear_from", "clear_to")

    def __init__(self, pattern: re.Pattern[bytes]) -> None:
        self.pattern = pattern
        self.hit: _Hit | None = None
        self.clear_from = sys.maxsize
        self.clear_to = -1


class _Built(NamedTuple):
    part: Part
    body: bytes
    bodystructure: bytes
    envelope: bytes | None  # for message roots only


class _Analyser:
    """One linear pass over a message.

    Boundary lines are found with one compiled regex per active boundary,
    searched forward only and bounded by the nearest outer boundary line; the
    innermost multipart wins when the same line matches several.  As RFC 2046
    and Dovecot have it, the CRLF before a boundary line belongs to the
    boundary, and an outer boundary ends every part nested inside it.  As in
    Dovecot, the line end after a close delimiter stays in the multipart (it
    opens the epilogue), even when an outer boundary line follows at once.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.stack: list[_Boundary] = []
        self.patterns: dict[bytes, re.Pattern[bytes]] = {}
        self.parts = 0
        self.address_budget = _ADDRESS_BUDGET

    def run(self) -> MessageStructure:
        built, _ = self.entity(0, depth=0, in_digest=False, message_root=True)
        assert built.envelope is not None
        return MessageStructure(
            size=self.size,
            root=built.part,
            envelope=built.envelope,
            body=built.body,
            bodystructure=built.bodystructure,
        )

    # -- boundary lines ----------------------------------------------------

    def pattern(self, boundary: bytes) -> re.Pattern[bytes]:
        pattern = self.patterns.get(boundary)
        if pattern is None:
            pattern = re.compile(b"\\n--" + re.escape(boundary) + rb"(--)?[ \t]*(?:\r?\n|\r?\Z)")
            self.patterns[boundary] = pattern
        return pattern

    def next_hit(self, pos: int) -> _Hit | None:
        """The first boundary line of any active multipart starting at or after ``pos``.

        ``pos`` is always the start of a line, so the regex may begin at the
        LF before it.
        """
        best: _Hit | None = None
        search_from = pos - 1 if pos > 0 else 0
        for owner, entry in enumerate(self.stack):
            limit = self.size if best is None else best.end
            hit = entry.hit
            fresh = (hit is not None and hit.start >= pos) or (
                hit is None and entry.clear_from <= pos and entry.clear_to >= limit
            )
            if not fresh:
                match = entry.pattern.search(self.data, search_from, limit)
                if match is None:
                    hit, entry.clear_from, entry.clear_to = None, pos, limit
                else:
                    hit = _Hit(match.start() + 1, match.end(), match.group(1) is not None, owner)
                entry.hit = hit
            if hit is not None and (best is None or hit.start <= best.start):
                best = hit
        return best

    def cut(self, hit: _Hit | None, floor: int) -> int:
        """Where a body ends before ``hit``: without the CRLF that belongs to the boundary."""
        if hit is None:
            return self.size
        start = hit.start
        if start - 1 < floor:
            return start
        if start - 2 >= floor and self.data[start - 2] == 0x0D:
            return start - 2
        return start - 1

    def header_end(self, start: int, limit: int) -> tuple[int, bool]:
        """Offset after the blank line ending the header, and whether there was one."""
        data = self.data
        if data.startswith(b"\r\n", start, limit):
            return start + 2, True
        if data.startswith(b"\n", start, limit):
            return start + 1, True
        match = _BLANK_LINE.search(data, start, limit)
        if match is None:
            return limit, False
        return match.end(), True

    # -- entities ----------------------------------------------------------

    def entity(
        self, start: int, *, depth: int, in_digest: bool, message_root: bool,
    ) -> tuple[_Built, _Hit | None]:
        """Parse the entity whose header starts at ``start``; return it and the line that ended it."""
        self.parts += 1
        hit = self.next_hit(start)
        body_start, terminated = self.header_end(start, self.size if hit is None else hit.start)
        if not terminated:
            # Everything up to the boundary (or EOF) is header; the body is empty.
            body_start = self.cut(hit, start)
        fields = _collect_fields(self.data[start:body_start])
        info = _content_info(fields, in_digest=in_digest, mime_part=not message_root)
        envelope = self.envelope(fields) if message_root else None
        kind = info.kind
        if kind != "leaf" and (depth >= MAX_DEPTH or self.parts >= MAX_PARTS):
            info.type, info.subtype, kind = "application", "octet-stream", "leaf"
        if kind == "multipart":
            return self.multipart(start, body_start, terminated, hit, info, depth, envelope)
        if kind == "message":
            return self.message(start, body_start, terminated, hit, info, depth, envelope)
        end = self.cut(hit, body_start) if terminated else body_start
        part = self.part(start, body_start, end, info)
        body, bodystructure = _single_part_strings(info, part.size, self.lines(part), None)
        return _Built(part, body, bodystructure, envelope), hit

    def multipart(
        self, start: int, body_start: int, terminated: bool, hit: _Hit | None,
        info: _ContentInfo, depth: int, envelope: bytes | None,
    ) -> tuple[_Built, _Hit | None]:
        boundary = info.boundary
        children: list[_Built] = []
        if not terminated:
            end = body_start
        elif boundary is None:
            end = self.cut(hit, body_start)  # Dovecot: a multipart without parts
        else:
            children, hit, end = self.multipart_body(body_start, boundary, depth, info.subtype == "digest")
        part = self.part(start, body_start, end, info, children=tuple(child.part for child in children))
        body, bodystructure = _multipart_strings(info, children)
        return _Built(part, body, bodystructure, envelope), hit

    def multipart_body(
        self, body_start: int, boundary: bytes, depth: int, digest: bool,
    ) -> tuple[list[_Built], _Hit | None, int]:
        """Children of a multipart; returns them, the line that ended it, and its end."""
        self.stack.append(_Boundary(self.pattern(boundary)))
        own = len(self.stack) - 1
        children: list[_Built] = []
        try:
            hit = self.next_hit(body_start)
            segment_start = body_start
            while hit is not None and hit.owner == own:
                if hit.close or self.parts >= MAX_PARTS:
                    # Retire the boundary: what follows is epilogue up to an outer boundary.
                    del self.stack[own:]
                    segment_start = hit.end
                    hit = self.next_hit(segment_start)
                    break
                child, hit = self.entity(hit.end, depth=depth + 1, in_digest=digest, message_root=False)
                children.append(child)
                if hit is None or hit.owner != own:
                    # An outer boundary (or EOF) ended the child and with it this multipart.
                    return children, hit, child.part.end
            return children, hit, self.cut(hit, segment_start)
        finally:
            del self.stack[own:]

    def message(
        self, start: int, body_start: int, terminated: bool, hit: _Hit | None,
        info: _ContentInfo, depth: int, envelope: bytes | None,
    ) -> tuple[_Built, _Hit | None]:
        if terminated:
            inner, hit = self.entity(body_start, depth=depth + 1, in_digest=False, message_root=True)
        else:
            inner = self.empty_message(body_start)
        part = self.part(start, body_start, inner.part.end, info, message=inner.part)
        body, bodystructure = _single_part_strings(info, part.size, self.lines(part), inner)
        return _Built(part, body, bodystructure, envelope), hit

    def empty_message(self, pos: int) -> _Built:
        self.parts += 1
        return _Built(Part(pos, pos, pos), _EMPTY_BODY, _EMPTY_BODYSTRUCTURE, _EMPTY_ENVELOPE)

    def part(
        self, start: int, body_start: int, end: int, info: _ContentInfo,
        children: tuple[Part, ...] = (), message: Part | None = None,
    ) -> Part:
        return Part(
            header_start=start,
            body_start=body_start,
            end=end,
            children=children,
            message=message,
            content_type=f"{info.type}/{info.subtype}",
            charset=info.param("charset"),
            encoding=info.encoding or "7bit",
        )

    def lines(self, part: Part) -> int:
        return self.data.count(b"\n", part.body_start, part.end)

    # -- envelope ----------------------------------------------------------

    def addresses(self, value: bytes | None) -> list[_Address]:
        """Parse an address field within the per-message parsing budget."""
        if value is None or self.address_budget <= 0:
            return []
        if len(value) > _ADDRESS_VALUE_CAP:
            value = value[:value.rfind(b",", 0, _ADDRESS_VALUE_CAP) + 1 or _ADDRESS_VALUE_CAP]
        self.address_budget -= len(value)
        return _parse_addresses(value)

    def envelope(self, fields: dict[str, bytes]) -> bytes:
        """RFC 3501 7.4.2 ENVELOPE; Sender and Reply-To default to From."""
        from_ = self.addresses(fields.get("from"))
        items = [
            _nstring(fields.get("date")),
            _nstring(fields.get("subject")),
            _address_list(from_),
            _address_list(self.addresses(fields.get("sender")) or from_),
            _address_list(self.addresses(fields.get("reply-to")) or from_),
            _address_list(self.addresses(fields.get("to"))),
            _address_list(self.addresses(fields.get("cc"))),
            _address_list(self.addresses(fields.get("bcc"))),
            _nstring(fields.get("in-reply-to")),
            _nstring(fields.get("message-id")),
        ]
        return b"(" + b" ".join(items) + b")"


# --------------------------------------------------------------------------
# BODY / BODYSTRUCTURE
# --------------------------------------------------------------------------


def _param_list(params: list[tuple[str, str]]) -> bytes:
    if not params:
        return _NIL
    return b"(" + b" ".join(_quote(name.upper()) + b" " + _quote(value) for name, value in params) + b")"


def _extension_tail(info: _ContentInfo) -> bytes:
    """disposition, language, location: common to both kinds of extension data."""
    if info.disposition is None:
        disposition = _NIL
    else:
        disposition = b"(%s %s)" % (_quote(info.disposition.upper()), _param_list(info.disposition_params))
    if info.language is None:
        language = _NIL
    else:
        language = b"(" + b" ".join(_quote(tag) for tag in info.language) + b")"
    return disposition + b" " + language + b" " + _nstring(info.location)


def _single_part_strings(
    info: _ContentInfo, size: int, lines: int, inner: _Built | None,
) -> tuple[bytes, bytes]:
    """BODY and BODYSTRUCTURE of a non-multipart part."""
    params = info.params
    if info.type == "text" and info.param("charset") is None:
        params = params + [_DEFAULT_CHARSET]
    basic = b" ".join([
        _quote(info.type.upper()),
        _quote(info.subtype.upper()),
        _param_list(params),
        _nstring(info.id),
        _nstring(info.description),
        _quote((info.encoding or "7bit").upper()),
        b"%d" % size,
    ])
    if inner is not None:
        assert inner.envelope is not None
        body_tail = b" %s %s %d" % (inner.envelope, inner.body, lines)
        structure_tail = b" %s %s %d" % (inner.envelope, inner.bodystructure, lines)
    elif info.type == "text":
        body_tail = structure_tail = b" %d" % lines
    else:
        body_tail = structure_tail = b""
    extension = _nstring(info.md5) + b" " + _extension_tail(info)
    return (
        b"(" + basic + body_tail + b")",
        b"(" + basic + structure_tail + b" " + extension + b")",
    )


def _multipart_strings(info: _ContentInfo, children: list[_Built]) -> tuple[bytes, bytes]:
    """A multipart without parts is shown with one empty text/plain part, as Dovecot does."""
    if children:
        bodies = b"".join(child.body for child in children)
        structures = b"".join(child.bodystructure for child in children)
    else:
        bodies, structures = _EMPTY_BODY, _EMPTY_BODYSTRUCTURE
    subtype = _quote(info.subtype.upper())
    extension = _param_list(info.params) + b" " + _extension_tail(info)
    return (
        b"(" + bodies + b" " + subtype + b")",
        b"(" + structures + b" " + subtype + b" " + extension + b")",
    )


# --------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------


def analyse(content: bytes) -> MessageStructure:
    """Compute the structure of a whole message (already CRLF-normalised).

    Never raises: a mail server must store whatever it accepted.  Should the
    analyser itself fail, the message is described as one text/plain part so
    delivery still succeeds, and the failure is logged.
    """
    content = bytes(content)
    try:
        return _Analyser(content).run()
    except Exception:  # noqa: BLE001 - a parser bug must not lose mail
        log.exception("MIME analysis failed; storing a flat structure for %d bytes", len(content))
        return _flat_structure(content)


def _flat_structure(content: bytes) -> MessageStructure:
    match = _BLANK_LINE.search(content)
    if content.startswith(b"\r\n"):
        body_start = 2
    elif content.startswith(b"\n"):
        body_start = 1
    else:
        body_start = len(content) if match is None else match.end()
    root = Part(0, body_start, len(content))
    lines = content.count(b"\n", body_start)
    body, bodystructure = _single_part_strings(_ContentInfo(), root.size, lines, None)
    return MessageStructure(len(content), root, _EMPTY_ENVELOPE, body, bodystructure)
