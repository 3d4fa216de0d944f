"""Tests for the MIME structure computed at delivery (twisted_mail_cluster.mime).

Messages are written here with LF line ends for readability and normalised to
CRLF, exactly as the store does before analysing.  Expected IMAP strings are
spelled out in full; sizes and line counts were worked out by hand (or taken
from RFC 3501 and Dovecot's own test suite).
"""

from __future__ import annotations

import base64
import json
import logging
import random
import re
import time

import pytest

from twisted_mail_cluster import mime
from twisted_mail_cluster.mime import (
    MAX_DEPTH,
    MAX_PARTS,
    MessageStructure,
    Part,
    SectionNotFound,
    analyse,
    header_fields,
    header_values,
    normalise_line_endings,
)


_FLAT_STRUCTURE = mime._flat_structure


@pytest.fixture(autouse=True)
def no_silent_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """analyse() hides analyser bugs behind a flat fallback; here they must fail loudly."""

    def fail(content: bytes) -> MessageStructure:
        raise AssertionError("the analyser failed and analyse() fell back to a flat structure")

    monkeypatch.setattr(mime, "_flat_structure", fail)


def crlf(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return normalise_line_endings(raw)


def section(structure: MessageStructure, content: bytes, part: tuple[int, ...], text: str | None = None) -> bytes:
    start, end = structure.section_range(part, text)
    return content[start:end]


# ---------------------------------------------------------------------------
# A small IMAP reader, to check that the generated strings are well formed
# ---------------------------------------------------------------------------

_ATOM = re.compile(rb"[^\s()\"{}]+")


def parse_imap(value: bytes) -> list:
    """Parse one parenthesised IMAP value into nested lists of bytes/None."""
    items, pos = _parse_list(value, 0)
    assert pos == len(value), f"trailing data at {pos}: {value[pos:pos + 40]!r}"
    return items


def _parse_list(value: bytes, pos: int) -> tuple[list, int]:
    assert value[pos:pos + 1] == b"(", f"expected ( at {pos}: {value[pos:pos + 40]!r}"
    pos += 1
    items: list = []
    while True:
        char = value[pos:pos + 1]
        if char == b")":
            return items, pos + 1
        if items:
            # Lists may follow each other without a space: (...)(...)
            if char == b" ":
                pos += 1
                char = value[pos:pos + 1]
            else:
                assert char == b"(" and value[pos - 1:pos] == b")", f"missing space at {pos}"
        if char == b"(":
            item, pos = _parse_list(value, pos)
        elif char == b'"':
            item, pos = _parse_quoted(value, pos + 1)
        elif char == b"{":
            close = value.index(b"}\r\n", pos)
            length = int(value[pos + 1:close])
            item, pos = value[close + 3:close + 3 + length], close + 3 + length
        else:
            match = _ATOM.match(value, pos)
            assert match is not None, f"unexpected {value[pos:pos + 40]!r}"
            item, pos = (None if match.group() == b"NIL" else int(match.group())), match.end()
        items.append(item)


_QUOTED = re.compile(rb'((?:[^"\\\r\n\x00]|\\["\\])*)"')


def _parse_quoted(value: bytes, pos: int) -> tuple[bytes, int]:
    match = _QUOTED.match(value, pos)
    assert match is not None, f"bad quoted string at {pos}: {value[pos:pos + 40]!r}"
    return re.sub(rb'\\(["\\])', rb"\1", match.group(1)), match.end()


def walk(part: Part):
    yield part
    for child in part.children:
        yield from walk(child)
    if part.message is not None:
        yield from walk(part.message)


def numbered(node: Part, prefix: tuple[int, ...] = ()):
    """(section number, Part) for every part, numbered as RFC 3501 / Dovecot do."""
    if node.is_multipart:
        for number, child in enumerate(node.children, 1):
            yield prefix + (number,), child
            if child.message is not None:
                yield from numbered(child.message, prefix + (number,))
    else:
        yield prefix + (1,), node
        if node.message is not None:
            yield from numbered(node.message, prefix + (1,))


def check_body_matches_parts(body: list, part: Part) -> None:
    """Every BODY entry describes the Part at the same position, size included."""
    if part.is_multipart:
        assert isinstance(body[-1], bytes)  # subtype
        entries = body[:-1]
        assert len(entries) == max(1, len(part.children))
        for entry, child in zip(entries, part.children):
            check_body_matches_parts(entry, child)
        return
    assert body[6] == part.size
    if part.message is not None:
        assert len(body[7]) == 10  # envelope
        check_body_matches_parts(body[8], part.message)


def check_invariants(structure: MessageStructure, content: bytes) -> None:
    """What the IMAP layer relies on, for any input whatsoever."""
    root = structure.root
    assert structure.size == len(content)
    assert (root.header_start, root.end) == (0, len(content))
    for part in walk(root):
        assert part.header_start <= part.body_start <= part.end <= len(content)
        previous_end = part.body_start
        for child in part.children:
            assert previous_end <= child.header_start and child.end <= part.end
            previous_end = child.end
        if part.message is not None:
            assert part.message.header_start == part.body_start
            assert part.message.end == part.end
    assert len(parse_imap(structure.envelope)) == 10
    check_body_matches_parts(parse_imap(structure.body), root)
    parse_imap(structure.bodystructure)
    assert MessageStructure.from_json(structure.to_json()) == structure
    assert structure.section_range((), "HEADER") == (0, root.body_start)
    assert structure.section_range((), "TEXT") == (root.body_start, root.end)
    for path, part in numbered(root):
        assert structure.part_at(path) is part
        assert structure.section_range(path, None) == (part.body_start, part.end)
        assert structure.section_range(path, "MIME") == (part.header_start, part.body_start)
        if part.message is not None:
            assert structure.section_range(path, "TEXT") == (part.message.body_start, part.end)
        else:
            with pytest.raises(SectionNotFound):
                structure.section_range(path, "HEADER")


# ---------------------------------------------------------------------------
# Line endings
# ---------------------------------------------------------------------------


def test_bare_lf_and_bare_cr_become_crlf_and_crlf_is_kept() -> None:
    assert normalise_line_endings(b"a\nb\rc\r\nd\r\r\ne\n\rf") == b"a\r\nb\r\nc\r\nd\r\n\r\ne\r\n\r\nf"


def test_canonical_and_break_free_input_is_unchanged() -> None:
    assert normalise_line_endings(b"a\r\nb\r\n\r\n") == b"a\r\nb\r\n\r\n"
    assert normalise_line_endings(b"no breaks") == b"no breaks"
    assert normalise_line_endings(b"") == b""
    assert normalise_line_endings(b"\n\n") == b"\r\n\r\n"


def test_normalising_50_mib_is_fast() -> None:
    line = base64.encodebytes(bytes(range(256)) * 3)  # LF-terminated lines
    data = line * (50 * 2**20 // len(line))
    data = data[: len(data) // 2] + data[len(data) // 2:].replace(b"\n", b"\r\n") + b"tail\r"
    started = time.perf_counter()
    result = normalise_line_endings(data)
    elapsed = time.perf_counter() - started
    assert result.count(b"\n") == result.count(b"\r\n") == result.count(b"\r") == data.count(b"\n") + 1
    assert elapsed < 1.5  # measured ~0.35 s; a per-byte Python loop would take many seconds


# ---------------------------------------------------------------------------
# A simple text message (RFC 3501 6.3.11's APPEND example)
# ---------------------------------------------------------------------------

SIMPLE = crlf(
    "Date: Mon, 7 Feb 1994 21:52:25 -0800 (PST)\n"
    "From: Fred Foobar <foobar@Blurdybloop.example>\n"
    "Subject: afternoon meeting\n"
    "To: mooch@owatagu.siam.edu.example\n"
    "Message-Id: <B27397-0100000@Blurdybloop.example>\n"
    "MIME-Version: 1.0\n"
    "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n"
    "\n"
    "Hello Joe, do you think we can meet at 3:30 tomorrow?\n"
)
SIMPLE_BODY = b"Hello Joe, do you think we can meet at 3:30 tomorrow?\r\n"


def test_simple_message_envelope_body_and_bodystructure() -> None:
    structure = analyse(SIMPLE)
    assert structure.envelope == (
        b'("Mon, 7 Feb 1994 21:52:25 -0800 (PST)" "afternoon meeting" '
        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
        b'(("Fred Foobar" NIL "foobar" "Blurdybloop.example")) '
        b'((NIL NIL "mooch" "owatagu.siam.edu.example")) NIL NIL NIL '
        b'"<B27397-0100000@Blurdybloop.example>")'
    )
    assert structure.body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1)'
    assert structure.bodystructure == (
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1 NIL NIL NIL NIL)'
    )
    assert structure.size == len(SIMPLE)


def test_simple_message_sections() -> None:
    structure = analyse(SIMPLE)
    header = SIMPLE[: SIMPLE.index(b"\r\n\r\n") + 4]
    assert section(structure, SIMPLE, ()) == SIMPLE
    assert section(structure, SIMPLE, (), "HEADER") == header
    assert section(structure, SIMPLE, (), "TEXT") == SIMPLE_BODY
    # A non-multipart message has exactly one part: its body (RFC 3501 6.4.5).
    assert section(structure, SIMPLE, (1,)) == SIMPLE_BODY
    # Dovecot: the "MIME header" of that part is the message header.
    assert section(structure, SIMPLE, (1,), "MIME") == header
    assert structure.root == Part(0, len(header), len(SIMPLE), charset="US-ASCII")


@pytest.mark.parametrize(
    ("part", "text"),
    [((2,), None), ((1, 1), None), ((1,), "HEADER"), ((1,), "TEXT"), ((0,), None), ((2,), "MIME")],
)
def test_sections_a_simple_message_does_not_have(part: tuple[int, ...], text: str | None) -> None:
    with pytest.raises(SectionNotFound):
        analyse(SIMPLE).section_range(part, text)


@pytest.mark.parametrize("text", ["MIME", "HEADER.FIELDS", "BOGUS"])
def test_impossible_section_specifiers_are_value_errors(text: str) -> None:
    with pytest.raises(ValueError):
        analyse(SIMPLE).section_range((), text)


def test_section_text_is_case_insensitive() -> None:
    structure = analyse(SIMPLE)
    assert structure.section_range((), "text") == structure.section_range((), "TEXT")


def test_section_not_found_is_a_lookup_error() -> None:
    assert issubclass(SectionNotFound, LookupError)


# ---------------------------------------------------------------------------
# RFC 3501 examples
# ---------------------------------------------------------------------------


def test_rfc3501_fetch_example_envelope_and_body() -> None:
    # RFC 3501 7.4.2: "* 12 FETCH (... ENVELOPE (...) BODY (...))".
    body = ("x" * 31 + "\n") * 91 + "y" * 23 + "\n"  # 3028 octets, 92 lines in CRLF
    message = crlf(
        "Date: Wed, 17 Jul 1996 02:23:25 -0700 (PDT)\n"
        "From: Terry Gray <gray@cac.washington.edu>\n"
        "Subject: IMAP4rev1 WG mtg summary and minutes\n"
        "To: imap@cac.washington.edu\n"
        "cc: minutes@CNRI.Reston.VA.US, John Klensin <KLENSIN@MIT.EDU>\n"
        "Message-Id: <B27397-0100000@cac.washington.edu>\n"
        "MIME-Version: 1.0\n"
        "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII\n"
        "\n" + body
    )
    structure = analyse(message)
    assert structure.envelope == (
        b'("Wed, 17 Jul 1996 02:23:25 -0700 (PDT)" '
        b'"IMAP4rev1 WG mtg summary and minutes" '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'(("Terry Gray" NIL "gray" "cac.washington.edu")) '
        b'((NIL NIL "imap" "cac.washington.edu")) '
        b'((NIL NIL "minutes" "CNRI.Reston.VA.US")("John Klensin" NIL "KLENSIN" "MIT.EDU")) NIL NIL '
        b'"<B27397-0100000@cac.washington.edu>")'
    )
    assert structure.body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 3028 92)'


def test_rfc3501_multipart_body_example() -> None:
    # RFC 3501 7.4.2, BODYSTRUCTURE example (shown there in its BODY form).
    first = ("a" * 48 + "\n") * 22 + "b" * 50 + "\n"  # 1152 octets, 23 lines
    second = ("A" * 60 + "\n") * 72 + "B" * 88 + "\n"  # 4554 octets, 73 lines
    message = crlf(
        "MIME-Version: 1.0\n"
        'Content-Type: MULTIPART/MIXED; BOUNDARY="=_x"\n'
        "\n"
        "--=_x\n"
        "\n" + first + "\n"
        "--=_x\n"
        "Content-Type: TEXT/PLAIN; CHARSET=US-ASCII; NAME=cc.diff\n"
        "Content-ID: <960723163407.20117h@cac.washington.edu>\n"
        "Content-Description: Compiler diff\n"
        "Content-Transfer-Encoding: BASE64\n"
        "\n" + second + "\n"
        "--=_x--\n"
    )
    structure = analyse(message)
    assert structure.body == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73) "MIXED")'
    )
    assert structure.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1152 23 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII" "NAME" "cc.diff") '
        b'"<960723163407.20117h@cac.washington.edu>" "Compiler diff" "BASE64" 4554 73 NIL NIL NIL NIL) '
        b'"MIXED" ("BOUNDARY" "=_x") NIL NIL NIL)'
    )
    assert section(structure, message, (1,)) == crlf(first)
    assert section(structure, message, (2,)) == crlf(second)


# The part layout of RFC 3501 6.4.5's section example, with recognisable bodies.
RFC3501_SECTIONS = crlf(
    "Subject: sections\n"
    "MIME-Version: 1.0\n"
    'Content-Type: MULTIPART/MIXED; boundary="outer"\n'
    "\n"
    "--outer\n"
    "Content-Type: TEXT/PLAIN\n"
    "\n"
    "part 1\n"
    "--outer\n"
    "Content-Type: APPLICATION/OCTET-STREAM\n"
    "\n"
    "part 2\n"
    "--outer\n"
    "Content-Type: MESSAGE/RFC822\n"
    "\n"
    "Subject: part 3\n"
    'Content-Type: MULTIPART/MIXED; boundary="m3"\n'
    "\n"
    "--m3\n"
    "\n"
    "part 3.1\n"
    "--m3\n"
    "Content-Type: APPLICATION/OCTET-STREAM\n"
    "\n"
    "part 3.2\n"
    "--m3--\n"
    "--outer\n"
    'Content-Type: MULTIPART/MIXED; boundary="m4"\n'
    "\n"
    "--m4\n"
    "Content-Type: IMAGE/GIF\n"
    "\n"
    "part 4.1\n"
    "--m4\n"
    "Content-Type: MESSAGE/RFC822\n"
    "\n"
    "Subject: part 4.2\n"
    'Content-Type: MULTIPART/MIXED; boundary="m42"\n'
    "\n"
    "--m42\n"
    "\n"
    "part 4.2.1\n"
    "--m42\n"
    'Content-Type: MULTIPART/ALTERNATIVE; boundary="m422"\n'
    "\n"
    "--m422\n"
    "\n"
    "part 4.2.2.1\n"
    "--m422\n"
    "Content-Type: TEXT/RICHTEXT\n"
    "\n"
    "part 4.2.2.2\n"
    "--m422--\n"
    "--m42--\n"
    "--m4--\n"
    "--outer--\n"
)

_M3 = 'Subject: part 3\nContent-Type: MULTIPART/MIXED; boundary="m3"\n\n'
# A multipart keeps the CRLF after its close delimiter (its empty epilogue),
# even when an outer boundary follows at once: Dovecot counts it the same way.
_M3_TEXT = "--m3\n\npart 3.1\n--m3\nContent-Type: APPLICATION/OCTET-STREAM\n\npart 3.2\n--m3--\n"
_M42 = 'Subject: part 4.2\nContent-Type: MULTIPART/MIXED; boundary="m42"\n\n'
_M422_BODY = "--m422\n\npart 4.2.2.1\n--m422\nContent-Type: TEXT/RICHTEXT\n\npart 4.2.2.2\n--m422--\n"
_M42_TEXT = (
    '--m42\n\npart 4.2.1\n--m42\nContent-Type: MULTIPART/ALTERNATIVE; boundary="m422"\n\n'
    + _M422_BODY + "--m42--\n"
)


@pytest.mark.parametrize(
    ("part", "text", "expected"),
    [
        ((), "HEADER", 'Subject: sections\nMIME-Version: 1.0\nContent-Type: MULTIPART/MIXED; boundary="outer"\n\n'),
        ((1,), None, "part 1"),
        ((1,), "MIME", "Content-Type: TEXT/PLAIN\n\n"),
        ((2,), None, "part 2"),
        ((3,), None, _M3 + _M3_TEXT),
        ((3,), "HEADER", _M3),
        ((3,), "TEXT", _M3_TEXT),
        ((3,), "MIME", "Content-Type: MESSAGE/RFC822\n\n"),
        ((3, 1), None, "part 3.1"),
        ((3, 1), "MIME", "\n"),
        ((3, 2), None, "part 3.2"),
        ((4,), None, "--m4\nContent-Type: IMAGE/GIF\n\npart 4.1\n--m4\nContent-Type: MESSAGE/RFC822\n\n"
         + _M42 + _M42_TEXT + "--m4--\n"),
        ((4, 1), None, "part 4.1"),
        ((4, 1), "MIME", "Content-Type: IMAGE/GIF\n\n"),
        ((4, 2), None, _M42 + _M42_TEXT),
        ((4, 2), "HEADER", _M42),
        ((4, 2), "TEXT", _M42_TEXT),
        ((4, 2, 1), None, "part 4.2.1"),
        ((4, 2, 2), None, _M422_BODY),
        ((4, 2, 2, 1), None, "part 4.2.2.1"),
        ((4, 2, 2, 2), None, "part 4.2.2.2"),
        ((4, 2, 2, 2), "MIME", "Content-Type: TEXT/RICHTEXT\n\n"),
    ],
)
def test_rfc3501_section_example(part: tuple[int, ...], text: str | None, expected: str) -> None:
    structure = analyse(RFC3501_SECTIONS)
    assert section(structure, RFC3501_SECTIONS, part, text) == crlf(expected)


def test_rfc3501_section_example_text_and_types() -> None:
    structure = analyse(RFC3501_SECTIONS)
    text = section(structure, RFC3501_SECTIONS, (), "TEXT")
    assert text.startswith(b"--outer\r\nContent-Type: TEXT/PLAIN\r\n") and text.endswith(b"--outer--\r\n")
    types = {
        (3,): "message/rfc822", (3, 1): "text/plain", (3, 2): "application/octet-stream",
        (4,): "multipart/mixed", (4, 1): "image/gif", (4, 2): "message/rfc822",
        (4, 2, 1): "text/plain", (4, 2, 2): "multipart/alternative", (4, 2, 2, 2): "text/richtext",
    }
    for numbers, content_type in types.items():
        assert structure.part_at(numbers).content_type == content_type
    for missing in [(5,), (3, 3), (4, 2, 3), (4, 2, 2, 3), (1, 2), (4, 1, 2), (1, 1, 1)]:
        with pytest.raises(SectionNotFound):
            structure.section_range(missing, None)
    # As in Dovecot, a non-multipart part's only sub-part "1" is the part itself.
    assert structure.section_range((4, 1, 1), None) == structure.section_range((4, 1), None)
    with pytest.raises(SectionNotFound):
        structure.section_range((4, 1), "HEADER")  # image/gif is not a message


def test_rfc3501_section_example_body() -> None:
    structure = analyse(RFC3501_SECTIONS)
    text_plain = b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" %d 0)'
    assert structure.body == (
        b"("
        + text_plain % 6
        + b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "7BIT" 6)'
        + b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 149 (NIL "part 3" NIL NIL NIL NIL NIL NIL NIL NIL) ('
        + text_plain % 8
        + b'("APPLICATION" "OCTET-STREAM" NIL NIL NIL "7BIT" 8) "MIXED") 11)'
        + b"("
        + b'("IMAGE" "GIF" NIL NIL NIL "7BIT" 8)'
        + b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 248 (NIL "part 4.2" NIL NIL NIL NIL NIL NIL NIL NIL) ('
        + text_plain % 10
        + b"("
        + text_plain % 12
        + b'("TEXT" "RICHTEXT" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 12 0) "ALTERNATIVE")'
        + b' "MIXED") 18)'
        + b' "MIXED")'
        + b' "MIXED")'
    )
    assert len(crlf(_M3 + _M3_TEXT)) == 149 and len(crlf(_M42 + _M42_TEXT)) == 248
    check_invariants(structure, RFC3501_SECTIONS)


# ---------------------------------------------------------------------------
# Typical multipart messages
# ---------------------------------------------------------------------------

PDF = base64.encodebytes(b"%PDF-1.4 pretend" * 10).decode()  # 216 characters in 3 lines
MIXED = crlf(
    "From: Alice <alice@example.org>\n"
    "To: bob@example.org\n"
    "Subject: report\n"
    "MIME-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="------------A1B2"\n'
    "\n"
    "This is a multi-part message in MIME format.\n"
    "--------------A1B2\n"
    "Content-Type: text/plain; charset=UTF-8; format=flowed\n"
    "Content-Transfer-Encoding: 7bit\n"
    "\n"
    "See attached.\n"
    "\n"
    "--------------A1B2\n"
    'Content-Type: application/pdf; name="report.pdf"\n'
    "Content-Disposition: attachment;\n"
    ' filename="report.pdf"\n'
    "Content-Transfer-Encoding: base64\n"
    "\n" + PDF + "\n"
    "--------------A1B2--\n"
)


def test_multipart_mixed_with_attachment() -> None:
    structure = analyse(MIXED)
    assert structure.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "UTF-8" "FORMAT" "flowed") NIL NIL "7BIT" 15 1 NIL NIL NIL NIL)'
        b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 222 NIL '
        b'("ATTACHMENT" ("FILENAME" "report.pdf")) NIL NIL) '
        b'"MIXED" ("BOUNDARY" "------------A1B2") NIL NIL NIL)'
    )
    assert structure.body == (
        b'(("TEXT" "PLAIN" ("CHARSET" "UTF-8" "FORMAT" "flowed") NIL NIL "7BIT" 15 1)'
        b'("APPLICATION" "PDF" ("NAME" "report.pdf") NIL NIL "BASE64" 222) "MIXED")'
    )
    assert section(structure, MIXED, (1,)) == b"See attached.\r\n"
    assert section(structure, MIXED, (2,)) == crlf(PDF)
    assert base64.b64decode(section(structure, MIXED, (2,))) == b"%PDF-1.4 pretend" * 10
    assert section(structure, MIXED, (2,), "MIME") == crlf(
        'Content-Type: application/pdf; name="report.pdf"\n'
        "Content-Disposition: attachment;\n"
        ' filename="report.pdf"\n'
        "Content-Transfer-Encoding: base64\n\n"
    )
    assert section(structure, MIXED, (), "TEXT").startswith(b"This is a multi-part message")
    assert structure.part_at((2,)) == Part(
        header_start=MIXED.index(b"Content-Type: application/pdf"),
        body_start=MIXED.index(b"JVBER"),
        end=MIXED.index(b"\r\n--------------A1B2--"),
        content_type="application/pdf",
        encoding="base64",
    )


ALTERNATIVE = crlf(
    "From: a@example.org\n"
    "Subject: alt\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed; boundary=outer\n"
    "\n"
    "--outer\n"
    "Content-Type: multipart/alternative; boundary=inner\n"
    "\n"
    "--inner\n"
    "Content-Type: text/plain; charset=us-ascii\n"
    "\n"
    "plain text\n"
    "--inner\n"
    "Content-Type: text/html; charset=us-ascii\n"
    "\n"
    "<p>html</p>\n"
    "--inner--\n"
    "\n"
    "--outer\n"
    "Content-Type: image/png\n"
    "Content-Transfer-Encoding: base64\n"
    "Content-Disposition: inline\n"
    "Content-ID: <img1@example.org>\n"
    "\n"
    "iVBORw0KGgo=\n"
    "--outer--\n"
)


def test_alternative_inside_mixed() -> None:
    structure = analyse(ALTERNATIVE)
    assert structure.bodystructure == (
        b'((("TEXT" "PLAIN" ("CHARSET" "us-ascii") NIL NIL "7BIT" 10 0 NIL NIL NIL NIL)'
        b'("TEXT" "HTML" ("CHARSET" "us-ascii") NIL NIL "7BIT" 11 0 NIL NIL NIL NIL) '
        b'"ALTERNATIVE" ("BOUNDARY" "inner") NIL NIL NIL)'
        b'("IMAGE" "PNG" NIL "<img1@example.org>" NIL "BASE64" 12 NIL ("INLINE" NIL) NIL NIL) '
        b'"MIXED" ("BOUNDARY" "outer") NIL NIL NIL)'
    )
    assert section(structure, ALTERNATIVE, (1, 1)) == b"plain text"
    assert section(structure, ALTERNATIVE, (1, 2)) == b"<p>html</p>"
    assert section(structure, ALTERNATIVE, (1, 2), "MIME") == b"Content-Type: text/html; charset=us-ascii\r\n\r\n"
    # The multipart's body includes its epilogue (here an empty line).
    assert section(structure, ALTERNATIVE, (1,)) == crlf(
        "--inner\nContent-Type: text/plain; charset=us-ascii\n\nplain text\n"
        "--inner\nContent-Type: text/html; charset=us-ascii\n\n<p>html</p>\n--inner--\n"
    )
    assert section(structure, ALTERNATIVE, (2,)) == b"iVBORw0KGgo="
    with pytest.raises(SectionNotFound):
        structure.section_range((1,), "HEADER")
    with pytest.raises(SectionNotFound):
        structure.section_range((1, 3), None)


FORWARDED = crlf(
    "From: Carol <carol@example.org>\n"
    "To: dave@example.org\n"
    "Subject: Fwd: lunch\n"
    "MIME-Version: 1.0\n"
    "Content-Type: multipart/mixed; boundary=fwd\n"
    "\n"
    "--fwd\n"
    "Content-Type: text/plain\n"
    "\n"
    "see below\n"
    "--fwd\n"
    "Content-Type: message/rfc822\n"
    "Content-Description: forwarded message\n"
    "\n"
    "From: Eve <eve@example.org>\n"
    "To: carol@example.org\n"
    "Subject: lunch\n"
    "Message-ID: <lunch@example.org>\n"
    "\n"
    "Noon?\n"
    "--fwd--\n"
)
FORWARDED_HEADER = crlf(
    "From: Eve <eve@example.org>\n"
    "To: carol@example.org\n"
    "Subject: lunch\n"
    "Message-ID: <lunch@example.org>\n"
    "\n"
)


def test_message_rfc822_attachment_sections() -> None:
    structure = analyse(FORWARDED)
    assert section(structure, FORWARDED, (2,)) == FORWARDED_HEADER + b"Noon?"
    assert section(structure, FORWARDED, (2,), "HEADER") == FORWARDED_HEADER
    assert section(structure, FORWARDED, (2,), "TEXT") == b"Noon?"
    # The encapsulated message is not multipart: its part 1 is its body.
    assert section(structure, FORWARDED, (2, 1)) == b"Noon?"
    assert section(structure, FORWARDED, (2,), "MIME") == crlf(
        "Content-Type: message/rfc822\nContent-Description: forwarded message\n\n"
    )
    assert section(structure, FORWARDED, (2, 1), "MIME") == FORWARDED_HEADER
    for missing in [(2, 2), (2, 1, 1), (3,)]:
        with pytest.raises(SectionNotFound):
            structure.section_range(missing, None)


def test_message_rfc822_attachment_bodystructure() -> None:
    structure = analyse(FORWARDED)
    envelope = (
        b'(NIL "lunch" (("Eve" NIL "eve" "example.org")) (("Eve" NIL "eve" "example.org")) '
        b'(("Eve" NIL "eve" "example.org")) ((NIL NIL "carol" "example.org")) NIL NIL NIL "<lunch@example.org>")'
    )
    assert structure.bodystructure == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 9 0 NIL NIL NIL NIL)'
        b'("MESSAGE" "RFC822" NIL NIL "forwarded message" "7BIT" 108 ' + envelope
        + b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 0 NIL NIL NIL NIL) 5 NIL NIL NIL NIL) '
        b'"MIXED" ("BOUNDARY" "fwd") NIL NIL NIL)'
    )
    assert structure.body == (
        b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 9 0)'
        b'("MESSAGE" "RFC822" NIL NIL "forwarded message" "7BIT" 108 ' + envelope
        + b' ("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 0) 5) "MIXED")'
    )
    assert len(FORWARDED_HEADER + b"Noon?") == 108


# Dovecot's src/lib-imap/test-imap-bodystructure.c message, with the values
# its test expects (our spelling is upper case; the numbers are Dovecot's).
DOVECOT = crlf(
    "From: user@domain.org\n"
    "Date: Sat, 24 Mar 2007 23:00:00 +0200\n"
    "Mime-Version: 1.0\n"
    'Content-Type: multipart/mixed; boundary="foo\n'
    ' bar"\n'
    "\n"
    "Root MIME prologue\n"
    "\n"
    "--foo bar\n"
    'Content-Type: text/x-myown; charset=us-ascii; foo="quoted\\"string"\n'
    "Content-ID: <foo@example.com>\n"
    "Content-MD5: Q2hlY2sgSW50ZWdyaXR5IQ==\n"
    "Content-Disposition: inline; foo=bar\n"
    "Content-Description: hellodescription\n"
    "Content-Language: en, fi, se\n"
    "Content-Location: http://example.com/test.txt\n"
    "\n"
    "hello\n"
    "\n"
    "--foo bar\n"
    "Content-Type: message/rfc822\n"
    "\n"
    "From: sub@domain.org\n"
    "To: sub-to1@domain.org, sub-to2@domain.org\n"
    "Date: Sun, 12 Aug 2012 12:34:56 +0300\n"
    "Subject: submsg\n"
    'Content-Type: multipart/alternative; boundary="sub1"\n'
    "\n"
    "Sub MIME prologue\n"
    "--sub1\n"
    "Content-Type: text/html\n"
    "Content-Transfer-Encoding: 8bit\n"
    "\n"
    "<p>Hello world</p>\n"
    "\n"
    "--sub1\n"
    "Content-Type: text/plain\n"
    "Content-Transfer-Encoding: ?invalid\n"
    "\n"
    "Hello another world\n"
    "\n"
    "--sub1--\n"
    "Sub MIME epilogue\n"
    "\n"
    "--foo bar--\n"
    "Root MIME epilogue\n"
)


def test_matches_dovecot_bodystructure_test() -> None:
    structure = analyse(DOVECOT)
    assert structure.bodystructure == (
        b'(("TEXT" "X-MYOWN" ("CHARSET" "us-ascii" "FOO" "quoted\\"string") "<foo@example.com>" '
        b'"hellodescription" "7BIT" 7 1 "Q2hlY2sgSW50ZWdyaXR5IQ==" ("INLINE" ("FOO" "bar")) '
        b'("en" "fi" "se") "http://example.com/test.txt")'
        b'("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 412 ("Sun, 12 Aug 2012 12:34:56 +0300" "submsg" '
        b'((NIL NIL "sub" "domain.org")) ((NIL NIL "sub" "domain.org")) ((NIL NIL "sub" "domain.org")) '
        b'((NIL NIL "sub-to1" "domain.org")(NIL NIL "sub-to2" "domain.org")) NIL NIL NIL NIL) '
        b'(("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL "8BIT" 20 1 NIL NIL NIL NIL)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 21 1 NIL NIL NIL NIL) '
        b'"ALTERNATIVE" ("BOUNDARY" "sub1") NIL NIL NIL) 21 NIL NIL NIL NIL) '
        b'"MIXED" ("BOUNDARY" "foo bar") NIL NIL NIL)'
    )
    assert section(structure, DOVECOT, (2, 1)) == b"<p>Hello world</p>\r\n"
    assert section(structure, DOVECOT, (2, 2)) == b"Hello another world\r\n"
    assert section(structure, DOVECOT, (2,), "TEXT").endswith(b"--sub1--\r\nSub MIME epilogue\r\n")


def test_multipart_digest_parts_default_to_message_rfc822() -> None:
    message = crlf(
        "MIME-Version: 1.0\n"
        "Content-Type: multipart/digest; boundary=d\n"
        "\n"
        "--d\n"
        "\n"
        "Subject: one\n"
        "\n"
        "first\n"
        "--d\n"
        "Content-Type: text/plain\n"
        "\n"
        "not a message\n"
        "--d--\n"
    )
    structure = analyse(message)
    assert structure.body == (
        b'(("MESSAGE" "RFC822" NIL NIL NIL "7BIT" 21 (NIL "one" NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 5 0) 2)'
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 13 0) "DIGEST")'
    )
    assert section(structure, message, (1,), "TEXT") == b"first"
    assert section(structure, message, (1, 1)) == b"first"


def test_message_global_is_encapsulated_like_rfc822() -> None:
    message = crlf(
        "MIME-Version: 1.0\n"
        "Content-Type: message/global\n"
        "\n"
        "Subject: Grüße\n"
        "\n"
        "Hallo\n"
    )
    structure = analyse(message)
    assert structure.body == (
        b'("MESSAGE" "GLOBAL" NIL NIL NIL "7BIT" 27 (NIL "Gr\xc3\xbc\xc3\x9fe" NIL NIL NIL NIL NIL NIL NIL NIL) '
        b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 7 1) 3)'
    )
    assert section(structure, message, (1,), "HEADER") == crlf("Subject: Grüße\n\n")
    assert section(structure, message, (1, 1)) == b"Hallo\r\n"


def test_rfc2231_parameters_are_decoded_and_keep_their_order() -> None:
    message = crlf(
        "MIME-Version: 1.0\n"
        "Content-Type: application/pdf; name*0*=utf-8''%E2%82%AC; name*1=\"uro rates.pdf\"; x=1\n"
        "Content-Disposition: attachment; filename*=iso-8859-1''%E9t%E9.txt; size=12\n"
        "\n"
        "xx"
    )
    assert analyse(message).bodystructure == (
        b'("APPLICATION" "PDF" ("NAME" "\xe2\x82\xacuro rates.pdf" "X" "1") NIL NIL "7BIT" 2 NIL '
        b'("ATTACHMENT" ("FILENAME" "\xc3\xa9t\xc3\xa9.txt" "SIZE" "12")) NIL NIL)'
    )


def test_content_type_comments_and_invalid_types() -> None:
    commented = analyse(crlf("Content-Type: text/html (fancy); charset=utf-8\n\n<p>\n"))
    assert commented.body == b'("TEXT" "HTML" ("CHARSET" "utf-8") NIL NIL "7BIT" 5 1)'
    invalid = analyse(crlf("Content-Type: garbage; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nx"))
    assert invalid.body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "8BIT" 1 0)'


def test_content_headers_of_a_non_mime_message_are_ignored() -> None:
    # Dovecot: without MIME-Version or Content-Type, Content-* mean nothing.
    plain = crlf("Content-Transfer-Encoding: base64\nContent-Description: x\n\naGk=\n")
    assert analyse(plain).body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 6 1)'
    mime_version = crlf("MIME-Version: 1.0\nContent-Transfer-Encoding: base64\nContent-Description: x\n\naGk=\n")
    assert analyse(mime_version).body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL "x" "BASE64" 6 1)'


def test_first_content_type_wins() -> None:
    message = crlf("MIME-Version: 1.0\nContent-Type: text/html\nContent-Type: image/gif\n\nx")
    assert analyse(message).body == b'("TEXT" "HTML" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 1 0)'


# ---------------------------------------------------------------------------
# Envelope: addresses and quoting
# ---------------------------------------------------------------------------


def envelope_of(header: str | bytes) -> list:
    raw = header.encode("utf-8") if isinstance(header, str) else header
    return parse_imap(analyse(crlf(raw + b"\n\nbody\n")).envelope)


def test_group_syntax() -> None:
    structure = analyse(crlf(
        "From: a@example.org\n"
        "To: undisclosed-recipients:;\n"
        'Cc: Friends: Alice <alice@example.org>, bob@example.org;, "Doe, John" <john@example.org>\n'
        "\n"
    ))
    assert structure.envelope == (
        b'(NIL NIL ((NIL NIL "a" "example.org")) ((NIL NIL "a" "example.org")) ((NIL NIL "a" "example.org")) '
        b'((NIL NIL "undisclosed-recipients" NIL)(NIL NIL NIL NIL)) '
        b'((NIL NIL "Friends" NIL)("Alice" NIL "alice" "example.org")(NIL NIL "bob" "example.org")'
        b'(NIL NIL NIL NIL)("Doe, John" NIL "john" "example.org")) NIL NIL NIL)'
    )


def test_unterminated_group_is_closed() -> None:
    cc = envelope_of("Cc: team: x@example.org")[6]
    assert cc == [[None, None, b"team", None], [None, None, b"x", b"example.org"], [None, None, None, None]]


def test_sender_and_reply_to_default_to_from_only_when_absent_or_empty() -> None:
    fields = envelope_of("From: A <a@example.org>\nSender:\nReply-To: R <r@example.org>")
    assert fields[2] == fields[3] == [[b"A", None, b"a", b"example.org"]]
    assert fields[4] == [[b"R", None, b"r", b"example.org"]]


def test_address_oddities() -> None:
    fields = envelope_of(
        'From: "Fred \\"Dude\\" Foobar" <f@example.org>\n'
        "To: localuser, x@y (Comment Name), \"john doe\"@example.org, (only a comment)\n"
        "Cc: =?utf-8?q?J=C3=B6rg?= <joerg@example.org>\n"
        "Bcc: \n"
    )
    assert fields[2] == [[b'Fred "Dude" Foobar', None, b"f", b"example.org"]]
    assert fields[5] == [
        [None, None, b"localuser", b"MISSING_DOMAIN"],
        [b"Comment Name", None, b"x", b"y"],
        [None, None, b"john doe", b"example.org"],
    ]
    # Encoded-words stay encoded in the envelope: clients decode them.
    assert fields[6] == [[b"=?utf-8?q?J=C3=B6rg?=", None, b"joerg", b"example.org"]]
    assert fields[7] is None


def test_envelope_strings_are_raw_unfolded_and_escaped() -> None:
    structure = analyse(crlf(
        'Subject: He said "hi" \\o/\n'
        "  and =?utf-8?q?more?=\n"
        "Date:   Mon, 1 Jan 2024 00:00:00 +0000\n"
        "In-Reply-To:\n"
        " <parent@example.org>\n"
        "Message-ID: <a@b>\n"
        "Subject: second subject is ignored\n"
        "\n"
    ))
    assert structure.envelope == (
        b'("Mon, 1 Jan 2024 00:00:00 +0000" "He said \\"hi\\" \\\\o/  and =?utf-8?q?more?=" '
        b'NIL NIL NIL NIL NIL NIL "<parent@example.org>" "<a@b>")'
    )


def test_utf8_header_stays_quoted_latin1_becomes_a_literal_and_nul_is_replaced() -> None:
    structure = analyse(crlf(
        b"Subject: Gr\xfc\xdfe\n"
        b"In-Reply-To: Gr\xc3\xbc\xc3\x9fe\n"
        b"Message-ID: a\x00b\n"
        b"\n"
    ))
    assert structure.envelope == (
        b"(NIL {5}\r\nGr\xfc\xdfe NIL NIL NIL NIL NIL NIL "
        b'"Gr\xc3\xbc\xc3\x9fe" "a\xef\xbf\xbdb")'
    )
    assert parse_imap(structure.envelope)[1] == b"Gr\xfc\xdfe"


def test_empty_subject_is_an_empty_string_not_nil() -> None:
    assert envelope_of("Subject:")[1] == b""


# ---------------------------------------------------------------------------
# HEADER.FIELDS and SEARCH helpers
# ---------------------------------------------------------------------------

HEADER = (
    b"Received: from a\r\n"
    b"\tby b\r\n"
    b"Subject: hello\r\n"
    b" world\r\n"
    b"FROM: x@example.org\r\n"
    b"X-Empty:\r\n"
    b"not a field\r\n"
    b"To: z@example.org\r\n"
    b"subject: again\r\n"
    b"\r\n"
)


def test_header_fields_selects_in_order_with_continuations() -> None:
    assert header_fields(HEADER, ["Subject", "from"]) == (
        b"Subject: hello\r\n world\r\nFROM: x@example.org\r\nsubject: again\r\n\r\n"
    )


def test_header_fields_not() -> None:
    assert header_fields(HEADER, ["SUBJECT", "From"], exclude=True) == (
        b"Received: from a\r\n\tby b\r\nX-Empty:\r\nnot a field\r\nTo: z@example.org\r\n\r\n"
    )


def test_header_fields_always_end_with_the_blank_line() -> None:
    assert header_fields(HEADER, ["X-Missing"]) == b"\r\n"
    assert header_fields(b"", ["Subject"]) == b"\r\n"
    assert header_fields(b"Subject: no newline", ["subject"]) == b"Subject: no newline\r\n\r\n"


def test_header_fields_on_a_section_range() -> None:
    structure = analyse(FORWARDED)
    start, end = structure.section_range((2,), "HEADER")
    assert header_fields(FORWARDED[start:end], ["subject", "message-id"]) == (
        b"Subject: lunch\r\nMessage-ID: <lunch@example.org>\r\n\r\n"
    )


def test_header_values_decodes_encoded_words() -> None:
    header = (
        b"Subject: =?iso-8859-1?q?p=F6stal?=\r\n"
        b"Subject: =?utf-8?b?w6TDtsO8?= =?utf-8?q?_und_?=\r\n =?UTF-8?Q?mehr?=\r\n"
        b"Subject: Re: =?utf-8?q?caf=C3=A9?= time\r\n"
        b"Subject: =?x-unknown?q?abc?= =?utf-8?b?Q===?=\r\n"
        b"From: =?utf-8?q?J=C3=B6rg?= <j@example.org>\r\n"
        b"\r\n"
    )
    assert header_values(header, "subject") == [
        "p\u00f6stal",
        "\u00e4\u00f6\u00fc und mehr",
        "Re: caf\u00e9 time",
        "abc=?utf-8?b?Q===?=",
    ]
    assert header_values(header, "FROM") == ["J\u00f6rg <j@example.org>"]
    assert header_values(header, "cc") == []


def test_header_values_raw_8bit_and_folding() -> None:
    header = b"Subject: Gr\xc3\xbc\xc3\x9fe\r\nSubject: Gr\xfc\xdfe\r\nSubject: a\r\n b\r\n\tc\r\n\r\n"
    assert header_values(header, "Subject") == ["Gr\u00fc\u00dfe", "Gr\u00fc\u00dfe", "a b\tc"]


# ---------------------------------------------------------------------------
# Garbage
# ---------------------------------------------------------------------------


def test_empty_message() -> None:
    structure = analyse(b"")
    assert structure.root == Part(0, 0, 0)
    assert structure.envelope == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert structure.body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0)'
    assert structure.section_range((), "TEXT") == (0, 0)


def test_no_header_at_all() -> None:
    message = b"\r\nbody only\r\n"
    structure = analyse(message)
    assert structure.root == Part(0, 2, 13)
    assert section(structure, message, (), "HEADER") == b"\r\n"
    assert section(structure, message, (), "TEXT") == b"body only\r\n"
    assert structure.envelope == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"


def test_no_blank_line_means_all_header() -> None:
    message = b"Subject: x\r\nFrom: a@example.org\r\nwhatever"
    structure = analyse(message)
    assert structure.root == Part(0, len(message), len(message))
    assert section(structure, message, (), "HEADER") == message
    assert section(structure, message, (), "TEXT") == b""
    assert parse_imap(structure.envelope)[1] == b"x"


@pytest.mark.parametrize(
    "content_type",
    ["multipart/mixed", "multipart/mixed; boundary=never-used", 'multipart/mixed; boundary=""'],
)
def test_multipart_without_usable_boundary_is_an_empty_multipart(content_type: str) -> None:
    message = crlf(f"MIME-Version: 1.0\nContent-Type: {content_type}\n\nsome text\n--other\n")
    structure = analyse(message)
    # Dovecot shows one empty text/plain part; fetching part 1 gives "".
    assert structure.body == b'(("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 0 0) "MIXED")'
    assert section(structure, message, (), "TEXT") == b"some text\r\n--other\r\n"
    with pytest.raises(SectionNotFound):
        structure.section_range((1,), None)
    check_invariants(structure, message)


def test_missing_closing_boundary() -> None:
    message = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--b\n\ntwo\n")
    structure = analyse(message)
    assert section(structure, message, (1,)) == b"one"
    assert section(structure, message, (2,)) == b"two\r\n"
    check_invariants(structure, message)


def test_outer_boundary_ends_an_unclosed_inner_multipart() -> None:
    message = crlf(
        "Content-Type: multipart/mixed; boundary=outer\n\n"
        "--outer\nContent-Type: multipart/mixed; boundary=inner\n\n"
        "--inner\n\nin\n"
        "--outer\n\nafter\n"
        "--outer--\n"
    )
    structure = analyse(message)
    assert section(structure, message, (1, 1)) == b"in"
    assert section(structure, message, (1,)) == b"--inner\r\n\r\nin"
    assert section(structure, message, (2,)) == b"after"
    check_invariants(structure, message)


def test_boundary_lines_allow_trailing_white_space_but_not_other_text() -> None:
    message = crlf(
        "Content-Type: multipart/mixed; boundary=b\n\n"
        "--b \t\n\none\n--bx\n--b and more\n"
        "--b\n\ntwo\n"
        "--b--\t\nepilogue\n"
    )
    structure = analyse(message)
    assert section(structure, message, (1,)) == crlf("one\n--bx\n--b and more")
    assert section(structure, message, (2,)) == b"two"
    assert len(structure.root.children) == 2


def test_nested_multipart_reusing_the_parent_boundary_owns_it_until_closed() -> None:
    # RFC 2046 forbids it, but it happens; as in Dovecot the innermost multipart wins.
    message = crlf(
        "Content-Type: multipart/mixed; boundary=x\n\n"
        "--x\nContent-Type: multipart/alternative; boundary=x\n\n"
        "--x\n\ninner 1\n--x\n\ninner 2\n--x--\n"
        "--x\n\nouter 2\n--x--\n"
    )
    structure = analyse(message)
    assert [len(structure.root.children), len(structure.root.children[0].children)] == [2, 2]
    assert section(structure, message, (1, 2)) == b"inner 2"
    assert section(structure, message, (2,)) == b"outer 2"


def test_boundary_that_extends_the_parent_boundary() -> None:
    message = crlf(
        "Content-Type: multipart/mixed; boundary=a\n\n"
        "--a\nContent-Type: multipart/alternative; boundary=ab\n\n"
        "--ab\n\ninner\n--ab--\n"
        "--a\n\nouter\n--a--\n"
    )
    structure = analyse(message)
    assert section(structure, message, (1, 1)) == b"inner"
    assert section(structure, message, (2,)) == b"outer"


def test_boundary_line_inside_a_part_header_ends_the_part() -> None:
    message = crlf("Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/html\n--b\n\ntwo\n--b--\n")
    structure = analyse(message)
    assert section(structure, message, (1,), "MIME") == b"Content-Type: text/html"
    assert section(structure, message, (1,)) == b""
    assert section(structure, message, (2,)) == b"two"
    check_invariants(structure, message)


def test_deep_multipart_nesting_is_capped() -> None:
    levels = MAX_DEPTH + 50
    head = "".join(f"Content-Type: multipart/mixed; boundary=b{i}\n\n--b{i}\n" for i in range(levels))
    tail = "".join(f"\n--b{i}--" for i in reversed(range(levels)))
    message = crlf(head + "\ninnermost" + tail + "\n")
    structure = analyse(message)
    assert structure.part_at((1,) * (MAX_DEPTH - 1)).content_type == "multipart/mixed"
    assert structure.part_at((1,) * MAX_DEPTH).content_type == "application/octet-stream"
    with pytest.raises(SectionNotFound):
        structure.part_at((1,) * MAX_DEPTH + (2,))
    check_invariants(structure, message)


def test_deep_message_nesting_is_capped() -> None:
    levels = MAX_DEPTH + 50
    message = crlf("Content-Type: message/rfc822\n\n" * levels + "Subject: bottom\n\nbottom\n")
    structure = analyse(message)
    depth = 0
    part = structure.root
    while part.message is not None:
        part, depth = part.message, depth + 1
    assert depth == MAX_DEPTH
    assert part.content_type == "application/octet-stream"
    check_invariants(structure, message)


def test_part_count_is_capped() -> None:
    message = crlf("Content-Type: multipart/mixed; boundary=b\n\n" + "--b\n\nx\n" * (MAX_PARTS + 50) + "--b--\n")
    structure = analyse(message)
    assert len(structure.root.children) == MAX_PARTS - 1
    check_invariants(structure, message)


def test_huge_header_lines() -> None:
    message = crlf(
        "Subject: " + "s" * 2_000_000 + "\n"
        "Content-Type: text/plain; " + "; ".join(f"p{i}=\"v;{i}\"" for i in range(100_000)) + "\n"
        "To: " + ", ".join(f"user{i}@example.org" for i in range(100_000)) + "\n"
        "\nbody\n"
    )
    started = time.perf_counter()
    structure = analyse(message)
    assert time.perf_counter() - started < 5.0
    envelope = parse_imap(structure.envelope)
    assert envelope[1] == b"s" * 2_000_000
    assert envelope[5][0] == [None, None, b"user0", b"example.org"]
    assert section(structure, message, (), "TEXT") == b"body\r\n"
    check_invariants(structure, message)


def test_nul_bytes() -> None:
    message = b"Subject: a\x00b\r\nContent-Type: text/plain; name=\"n\x00\"\r\n\r\nbo\x00dy\r\n"
    structure = analyse(message)
    assert parse_imap(structure.envelope)[1] == b"a\xef\xbf\xbdb"
    assert structure.body == b'("TEXT" "PLAIN" ("NAME" "n\xef\xbf\xbd" "CHARSET" "US-ASCII") NIL NIL "7BIT" 7 1)'


def test_invalid_charsets_and_raw_8bit_parameters() -> None:
    message = crlf(
        b"MIME-Version: 1.0\n"
        b"Content-Type: text/plain; charset=bogus-charset\n"
        b"Content-Disposition: attachment; filename=\"Gr\xc3\xbc\xc3\x9fe.txt\"; x*=x-unknown''%E2%82%AC;"
        b" y*=utf-8''%FF\n"
        b"\n"
        b"text\n"
    )
    assert analyse(message).bodystructure == (
        b'("TEXT" "PLAIN" ("CHARSET" "bogus-charset") NIL NIL "7BIT" 6 1 NIL '
        b'("ATTACHMENT" ("FILENAME" "Gr\xc3\xbc\xc3\x9fe.txt" "X" "\xe2\x82\xac" "Y" "\xef\xbf\xbd")) NIL NIL)'
    )


def test_bare_lf_input_does_not_break_the_analyser() -> None:
    # The store normalises first, but analyse() must cope with anything.
    message = b"Content-Type: multipart/mixed; boundary=b\n\n--b\n\none\n--b--\n"
    structure = analyse(message)
    assert section(structure, message, (1,)) == b"one"
    check_invariants(structure, message)


def test_analyser_failure_falls_back_to_a_flat_structure(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    def explode(self: object) -> MessageStructure:
        raise RuntimeError("bug")

    monkeypatch.setattr(mime._Analyser, "run", explode)
    monkeypatch.setattr(mime, "_flat_structure", _FLAT_STRUCTURE)
    with caplog.at_level(logging.ERROR, logger="twisted_mail_cluster.mime"):
        structure = analyse(SIMPLE)
    assert structure.root == Part(0, len(SIMPLE) - len(SIMPLE_BODY), len(SIMPLE))
    assert structure.body == b'("TEXT" "PLAIN" ("CHARSET" "US-ASCII") NIL NIL "7BIT" 55 1)'
    assert structure.envelope == b"(NIL NIL NIL NIL NIL NIL NIL NIL NIL NIL)"
    assert "MIME analysis failed" in caplog.text


SAMPLES = [SIMPLE, MIXED, ALTERNATIVE, FORWARDED, DOVECOT, RFC3501_SECTIONS]
TOKENS = [
    b"\r\n", b"\r\n\r\n", b"\n", b"\r", b"--", b"--b", b"--b--", b"--outer\r\n", b"boundary=b", b"boundary=\"",
    b"Content-Type: multipart/mixed; boundary=b\r\n", b"Content-Type: message/rfc822\r\n",
    b"Content-Type: multipart/digest; boundary=outer\r\n", b"From: ", b"To: a:b,c;", b"\"", b"(", b")", b"<",
    b">", b"@", b",", b";", b":", b"=?utf-8?q?", b"?=", b"*0*=", b"''%", b"\x00", b"\xff", b"\xc3", b" ", b"\t",
]


def random_message(rng: random.Random) -> bytes:
    if rng.random() < 0.5:
        return bytes(rng.getrandbits(8) for _ in range(rng.randrange(200)))
    return b"".join(rng.choice(TOKENS) if rng.random() < 0.7 else b"x" * rng.randrange(5)
                    for _ in range(rng.randrange(80)))


def mutate(rng: random.Random, data: bytes) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randrange(1, 8)):
        pos = rng.randrange(len(buffer) + 1)
        action = rng.randrange(4)
        if action == 0:
            del buffer[pos:pos + rng.randrange(1, 20)]
        elif action == 1:
            buffer[pos:pos] = rng.choice(TOKENS)
        elif action == 2:
            start = rng.randrange(len(buffer) + 1)
            buffer[pos:pos] = buffer[start:start + rng.randrange(1, 200)]
        else:
            del buffer[pos:]
    return bytes(buffer)


def test_fuzz_random_input_never_raises_and_keeps_invariants() -> None:
    rng = random.Random(20240611)
    for _ in range(400):
        data = random_message(rng)
        check_invariants(analyse(data), data)


def test_fuzz_mutated_messages_never_raise_and_keep_invariants() -> None:
    rng = random.Random(31337)
    for _ in range(600):
        data = mutate(rng, rng.choice(SAMPLES))
        check_invariants(analyse(data), data)


def test_every_truncation_of_a_nested_message_is_consistent() -> None:
    for cut in range(0, len(DOVECOT), 7):
        data = DOVECOT[:cut]
        check_invariants(analyse(data), data)


# ---------------------------------------------------------------------------
# JSON and performance
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("message", SAMPLES + [crlf(b"Subject: Gr\xfc\xdfe\n\nx")])
def test_json_round_trip_is_exact(message: bytes) -> None:
    structure = analyse(message)
    text = structure.to_json()
    assert text.isascii()
    assert MessageStructure.from_json(text) == structure


def test_json_format() -> None:
    structure = analyse(crlf(b"Subject: Gr\xfc\xdfe\nContent-Type: text/plain; charset=latin1\n\nx"))
    assert json.loads(structure.to_json()) == {
        "v": 1,
        "size": 61,
        "root": {"h": 0, "b": 60, "e": 61, "t": "text/plain", "x": "7bit", "cs": "latin1"},
        "envelope": "(NIL {5}\r\nGr\u00fc\u00dfe NIL NIL NIL NIL NIL NIL NIL NIL)",
        "body": '("TEXT" "PLAIN" ("CHARSET" "latin1") NIL NIL "7BIT" 1 0)',
        "bodystructure": '("TEXT" "PLAIN" ("CHARSET" "latin1") NIL NIL "7BIT" 1 0 NIL NIL NIL NIL)',
    }


@pytest.mark.parametrize(
    "text",
    [
        "",
        "[]",
        '{"v": 2}',
        '{"v": 1, "size": 1}',
        '{"v":1,"size":-1,"root":{},"envelope":"","body":"","bodystructure":""}',
        '{"v":1,"size":1,"root":{"h":0,"b":0,"e":0,"t":"x","x":"y"},"envelope":"\\u0100","body":"","bodystructure":""}',
    ],
)
def test_from_json_rejects_malformed_input(text: str) -> None:
    with pytest.raises(ValueError):
        MessageStructure.from_json(text)


def test_25_mib_message_with_attachments_is_fast() -> None:
    chunk = base64.encodebytes(bytes(range(256)) * 4).replace(b"\n", b"\r\n")
    attachment = chunk * (9 * 2**20 // len(chunk))
    parts = [
        b"--==_b\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n" + b"a line of text\r\n" * 20_000,
    ] + [
        b"--==_b\r\nContent-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n"
        b'Content-Disposition: attachment; filename="f%d.bin"\r\n\r\n' % i + attachment
        for i in range(3)
    ]
    message = (
        b"From: a@example.org\r\nSubject: big\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/mixed; boundary="==_b"\r\n\r\n' + b"".join(parts) + b"--==_b--\r\n"
    )
    assert len(message) > 25 * 2**20
    started = time.perf_counter()
    structure = analyse(message)
    elapsed = time.perf_counter() - started
    assert [child.size for child in structure.root.children] == [319_998] + [len(attachment) - 2] * 3
    assert elapsed < 1.0
