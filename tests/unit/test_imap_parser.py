"""Tests for the IMAP grammar layer (twisted_mail_cluster.imap.parser)."""

from __future__ import annotations

import datetime
import io
import random
import tempfile
import time
from collections.abc import Callable

import pytest

from twisted_mail_cluster.imap.parser import (
    MAX_LINE,
    All,
    And,
    BodyKey,
    CommandReader,
    DateKey,
    FetchAttribute,
    FlagKey,
    HeaderKey,
    Literal,
    ModSeqKey,
    Not,
    Or,
    ParseError,
    SequenceKey,
    SequenceSet,
    SizeKey,
    TextKey,
    decode_mailbox_name,
    encode_mailbox,
    format_uid_set,
    literal_announcement,
    split_literal_announcement,
)


def reader(*segments: bytes | Literal, utf8: bool = False) -> CommandReader:
    return CommandReader(list(segments), utf8_mailboxes=utf8)


def parse(method: str, text: bytes, *rest: bytes) -> object:
    """Run one reader method over a command and require that it consumed
    everything.  ``rest`` alternates literal value, text, literal value, ...
    (a missing final text segment is b"")."""
    segments: list[bytes | Literal] = [text]
    segments += [Literal(piece) if index % 2 == 0 else piece for index, piece in enumerate(rest)]
    if len(rest) % 2:
        segments.append(b"")
    r = CommandReader(segments)
    value = getattr(r, method)()
    r.end()
    return value


def seq(text: str) -> SequenceSet:
    return SequenceSet.parse(text)


# ---------------------------------------------------------------------------
# Framing


class TestLiteralAnnouncement:
    @pytest.mark.parametrize(
        ("line", "expected"),
        [
            (b"A1 LOGIN {5}", (5, False)),
            (b"A1 LOGIN {5}\r\n", (5, False)),
            (b"A1 APPEND INBOX {310+}", (310, True)),
            (b" {0}", (0, False)),
            (b"{007}", (7, False)),
            (b"A1 LOGIN fred {4294967295}", (4294967295, False)),
            (b"A1 NOOP", None),
            (b"A1 LOGIN fred pass}", None),  # "}" is an ATOM-CHAR
            (b'A1 LOGIN "{5}" x', None),
            (b"", None),
        ],
    )
    def test_announcement(self, line: bytes, expected: tuple[int, bool] | None) -> None:
        assert literal_announcement(line) == expected

    @pytest.mark.parametrize(
        "line",
        [
            b"A1 LOGIN {-5}",
            b"A1 LOGIN {abc}",
            b"A1 LOGIN {}",
            b"A1 LOGIN {+}",
            b"A1 LOGIN { 5}",
            b"A1 LOGIN {5 }",
            b"A1 LOGIN {5++}",
            b"A1 LOGIN {0x10}",
            b"A1 LOGIN {4294967296}",
            b"A1 LOGIN {" + b"9" * 5000 + b"}",
        ],
    )
    def test_bad_announcement(self, line: bytes) -> None:
        with pytest.raises(ParseError):
            literal_announcement(line)

    def test_split_keeps_the_space_before_the_marker(self) -> None:
        assert split_literal_announcement(b"A1 LOGIN {5}\r\n") == (b"A1 LOGIN ", 5, False)
        assert split_literal_announcement(b" {3+}") == (b" ", 3, True)
        assert split_literal_announcement(b"{3}") == (b"", 3, False)
        assert split_literal_announcement(b"A1 NOOP\r\n") is None

    def test_max_line_constant(self) -> None:
        assert MAX_LINE == 65536


class TestLiteral:
    def test_bytes_backed(self) -> None:
        literal = Literal(b"hello")
        assert literal.size == 5
        assert literal.read() == b"hello"
        assert literal.open().read() == b"hello"
        assert literal.open().read() == b"hello"  # a fresh stream each time
        assert repr(literal) == "Literal(b'hello')"

    def test_file_backed(self) -> None:
        spool = tempfile.SpooledTemporaryFile(max_size=10)
        spool.write(b"From: a\r\n\r\nbody that spills to disk\r\n")
        literal = Literal.from_file(spool)
        assert literal.size == 37
        assert literal.read() == b"From: a\r\n\r\nbody that spills to disk\r\n"
        stream = literal.open()
        assert stream.read(4) == b"From"
        assert literal.open().read(4) == b"From"  # rewound
        assert repr(literal) == "<Literal of 37 octets>"
        literal.close()
        assert spool.closed

    def test_file_backed_explicit_size(self) -> None:
        literal = Literal.from_file(io.BytesIO(b"abcdef"), size=3)
        assert literal.size == 3
        assert literal.read() == b"abc"


class TestSegments:
    def test_login_with_two_literals(self) -> None:
        # Wire: A1 LOGIN {5}\r\nfred {3}\r\nabc\r\n
        r = reader(b"A1 LOGIN ", Literal(b"fred "), b" ", Literal(b"abc"), b"")
        assert r.tag() == b"A1"
        r.sp()
        assert r.command_name() == "LOGIN"
        r.sp()
        assert r.peek_char() == b"{"
        assert r.astring() == b"fred "
        r.sp()
        assert r.astring() == b"abc"
        assert r.at_end()
        r.end()

    def test_literal_followed_by_more_text(self) -> None:
        # Wire: A1 LOGIN {4}\r\nfred secret\r\n
        r = reader(b"A1 LOGIN ", Literal(b"fred"), b" secret")
        r.tag(), r.sp(), r.command_name(), r.sp()
        assert r.astring() == b"fred"
        r.sp()
        assert r.astring() == b"secret"
        r.end()

    def test_back_to_back_literals_need_an_empty_text_segment(self) -> None:
        # Wire: A1 X {3}\r\nabc{3}\r\ndef\r\n - no SP between them, so the
        # grammar (which wants SP) must reject it.
        r = reader(b"A1 X ", Literal(b"abc"), b"", Literal(b"def"), b"")
        r.tag(), r.sp(), r.command_name(), r.sp()
        assert r.astring() == b"abc"
        assert r.peek_char() == b"{"
        assert not r.at_end()
        with pytest.raises(ParseError, match="expected SP"):
            r.sp()

    def test_literal_where_an_atom_is_expected(self) -> None:
        r = reader(b"A1 ", Literal(b"LOGIN"), b"")
        r.tag()
        r.sp()
        with pytest.raises(ParseError):
            r.command_name()

    def test_unconsumed_literal_is_trailing_data(self) -> None:
        r = reader(b"A1 NOOP ", Literal(b"x"), b"")
        r.tag(), r.sp(), r.command_name()
        with pytest.raises(ParseError, match="unexpected trailing data"):
            r.end()

    def test_marker_left_in_text_is_rejected(self) -> None:
        r = reader(b"A1 LOGIN {5}")
        r.tag(), r.sp(), r.command_name(), r.sp()
        with pytest.raises(ParseError):
            r.astring()

    @pytest.mark.parametrize(
        "segments",
        [
            [],
            [b"A1", Literal(b"x")],
            [Literal(b"x")],
            [b"A1", b"B", b"C"],
            [b"A1", Literal(b"x"), Literal(b"y")],
            ["A1 NOOP"],
        ],
    )
    def test_malformed_segment_lists_are_programming_errors(self, segments: list) -> None:
        with pytest.raises(TypeError):
            CommandReader(segments)

    def test_bytearray_text_is_accepted(self) -> None:
        tag = CommandReader([bytearray(b"A1 NOOP")]).tag()
        assert tag == b"A1"
        assert type(tag) is bytes


# ---------------------------------------------------------------------------
# Primitive tokens


class TestTokens:
    def test_tag_and_command(self) -> None:
        r = reader(b"a.b-c]9 uid fetch")
        assert r.tag() == b"a.b-c]9"
        r.sp()
        assert r.command_name() == "UID"
        r.sp()
        assert r.command_name() == "FETCH"
        r.end()

    @pytest.mark.parametrize("line", [b"+ NOOP", b"* NOOP", b" A1 NOOP", b"", b"(a NOOP"])
    def test_bad_tag(self, line: bytes) -> None:
        with pytest.raises(ParseError, match="expected tag"):
            reader(line).tag()

    def test_plus_ends_the_tag(self) -> None:
        r = reader(b"A+1 NOOP")
        assert r.tag() == b"A"
        with pytest.raises(ParseError):
            r.sp()

    def test_sp_is_exactly_one_space(self) -> None:
        r = reader(b"A1  NOOP")
        r.tag()
        with pytest.raises(ParseError, match="extra space"):
            r.sp()
        with pytest.raises(ParseError, match="expected SP"):
            reader(b"A1\tNOOP").sp()

    def test_trailing_spaces_are_tolerated(self) -> None:
        r = reader(b"A1 NOOP  ")
        r.tag(), r.sp(), r.command_name()
        assert r.at_end()
        r.end()

    def test_trailing_garbage(self) -> None:
        r = reader(b"A1 NOOP x")
        r.tag(), r.sp(), r.command_name()
        assert not r.at_end()
        with pytest.raises(ParseError, match="unexpected trailing data"):
            r.end()

    def test_peek_char(self) -> None:
        r = reader(b"ab")
        assert r.peek_char() == b"a"
        r.atom()
        assert r.peek_char() == b""

    def test_accept_and_expect(self) -> None:
        r = reader(b"(x")
        assert not r.accept(b")")
        assert r.accept(b"(")
        with pytest.raises(ParseError, match=r"expected \)"):
            r.expect(b")")

    @pytest.mark.parametrize(
        ("text", "atom"),
        [(b"FLAGS.SILENT", b"FLAGS.SILENT"), (b"+FLAGS", b"+FLAGS"), (b"a}b", b"a}b"),
         (b"abc(", b"abc"), (b"abc]", b"abc"), (b"abc%", b"abc"), (b'ab"', b"ab")],
    )
    def test_atom(self, text: bytes, atom: bytes) -> None:
        assert reader(text).atom() == atom

    @pytest.mark.parametrize("text", [b"", b"(", b")", b"{", b" ", b"%", b"*", b'"', b"\\", b"]",
                                      b"\x01", b"\x7f", b"\xc3\xa4"])
    def test_not_an_atom(self, text: bytes) -> None:
        with pytest.raises(ParseError, match="expected atom"):
            reader(text).atom()

    @pytest.mark.parametrize(
        ("text", "value"),
        [(b"0", 0), (b"42", 42), (b"007", 7), (b"4294967295", 4294967295),
         (b"00000000000000000001", 1)],
    )
    def test_number(self, text: bytes, value: int) -> None:
        assert parse("number", text) == value

    @pytest.mark.parametrize("text", [b"4294967296", b"9" * 5000, b"-1", b"x", b""])
    def test_bad_number(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("number", text)

    def test_number64(self) -> None:
        assert parse("number64", b"9223372036854775807") == 2**63 - 1
        with pytest.raises(ParseError, match="out of range"):
            parse("number64", b"9223372036854775808")

    def test_nz_number(self) -> None:
        assert parse("nz_number", b"1") == 1
        with pytest.raises(ParseError, match="non-zero"):
            parse("nz_number", b"0")


class TestStrings:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            (b'""', b""),
            (b'"hello world"', b"hello world"),
            (rb'"a\\b"', b"a\\b"),
            (rb'"say \"hi\""', b'say "hi"'),
            (rb'"\\\""', b'\\"'),
            (b'"tab\there"', b"tab\there"),
            ('"Grüße"'.encode(), "Grüße".encode()),
            (b'"(){%*]"', b"(){%*]"),
        ],
    )
    def test_quoted(self, text: bytes, value: bytes) -> None:
        assert parse("string", text) == value
        assert parse("astring", text) == value

    @pytest.mark.parametrize(
        "text",
        [b'"unterminated', rb'"bad \x escape"', b'"cr\rhere"', b'"lf\nhere"', b'"nul\x00"',
         rb'"ends in backslash\"', b'"'],
    )
    def test_bad_quoted(self, text: bytes) -> None:
        with pytest.raises(ParseError, match="invalid quoted string"):
            parse("astring", text)

    def test_quoted_stops_at_closing_quote(self) -> None:
        r = reader(b'"a" "b"')
        assert r.string() == b"a"
        r.sp()
        assert r.string() == b"b"
        r.end()

    @pytest.mark.parametrize(
        ("text", "value"),
        [(b"fred", b"fred"), (b"a]b", b"a]b"), (b"x+y}", b"x+y}")],
    )
    def test_astring_atom_form(self, text: bytes, value: bytes) -> None:
        assert parse("astring", text) == value

    @pytest.mark.parametrize("text", [b"", b"(", b"a%b", b"a*b", b"\xc3\xa4"])
    def test_bad_astring(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("astring", text)

    def test_literal_astring(self) -> None:
        assert parse("astring", b"", b'with "quotes" and\r\nCRLF') == b'with "quotes" and\r\nCRLF'
        assert parse("astring", b"", b"") == b""

    def test_string_refuses_atoms(self) -> None:
        with pytest.raises(ParseError, match="expected string"):
            parse("string", b"atom")

    def test_nstring(self) -> None:
        assert parse("nstring", b"NIL") is None
        assert parse("nstring", b"nil") is None
        assert parse("nstring", b'"NIL"') == b"NIL"
        assert parse("nstring", b"", b"x") == b"x"
        with pytest.raises(ParseError, match="string or NIL"):
            parse("nstring", b"NILS")

    def test_string_or_literal_keeps_the_literal_object(self) -> None:
        literal = Literal(b"From: a\r\n\r\nhi\r\n")
        r = reader(b"", literal, b"")
        assert r.string_or_literal() is literal
        r.end()
        assert parse("string_or_literal", b'"short"') == b"short"
        with pytest.raises(ParseError):
            parse("string_or_literal", b"atom")


# ---------------------------------------------------------------------------
# Mailboxes


class TestMailbox:
    @pytest.mark.parametrize(
        ("text", "name"),
        [
            (b"&AMQ-", "Ä"),
            (b"Entw&APw-rfe", "Entwürfe"),
            (b'"Entw&APw-rfe"', "Entwürfe"),
            (b"Sent", "Sent"),
            (b"&-", "&"),
            (b"Tom&-Jerry", "Tom&Jerry"),
            (b"&ZeVnLIqe-", "日本語"),
            (b"&U,BTFw-", "台北"),  # "," is the modified-base64 "/"
            (b"&2D3eAA-", "\U0001f600"),  # surrogate pair
            (b"a&AMQ-&AOQ-", "aÄä"),  # adjacent shifts decode fine
            (b'"with space"', "with space"),
            (b"Archive/2024", "Archive/2024"),
        ],
    )
    def test_modified_utf7(self, text: bytes, name: str) -> None:
        assert parse("mailbox", text) == name

    @pytest.mark.parametrize(
        "text",
        [
            b"&AMQ",  # unterminated
            b"&AGE-",  # printable ASCII "a" must not be encoded
            b"&AMR-",  # non-zero padding bits
            b"&AM-",  # odd number of UTF-16 octets
            b"&A-",  # impossible base64 length
            b"&2D0-",  # lone high surrogate
            b"&3gA-",  # lone low surrogate
            b"&AM*-",
            b'"&AMQ/-"',  # "/" is not modified base64
            b'"\xc3\x84"',  # raw 8-bit without UTF8=ACCEPT
            b'"tab\there"',
        ],
    )
    def test_invalid_modified_utf7(self, text: bytes) -> None:
        with pytest.raises(ParseError, match="modified UTF-7"):
            parse("mailbox", text)

    @pytest.mark.parametrize("text", [b"INBOX", b"inbox", b"InBoX", b'"iNbOx"'])
    def test_inbox_is_case_insensitive(self, text: bytes) -> None:
        assert parse("mailbox", text) == "INBOX"

    def test_encoded_ascii_cannot_spell_inbox(self) -> None:
        with pytest.raises(ParseError):
            parse("mailbox", b"INB&AE8-X")  # "O" in base64

    def test_inbox_from_a_literal(self) -> None:
        assert parse("mailbox", b"", b"Inbox") == "INBOX"

    def test_only_the_bare_inbox_is_normalised(self) -> None:
        assert parse("mailbox", b"inbox/Sub") == "inbox/Sub"
        assert parse("mailbox", b"inboxes") == "inboxes"

    def test_dotless_i_is_not_inbox(self) -> None:
        # "\u0131nbox".upper() == "INBOX" in Python; must not alias INBOX.
        wire = encode_mailbox("\u0131nbox")
        assert wire == b"&ATE-nbox"
        assert parse("mailbox", wire) == "\u0131nbox"

    @pytest.mark.parametrize("name", ["Ä", "Entwürfe", "Tom&Jerry", "日本語", "\U0001f600 x", "~/a.b"])
    def test_round_trip(self, name: str) -> None:
        assert decode_mailbox_name(encode_mailbox(name)) == name

    def test_utf8_mailboxes(self) -> None:
        r = reader('"Entwürfe"'.encode(), utf8=True)
        assert r.mailbox() == "Entwürfe"
        assert reader(b"Tom&Jerry", utf8=True).mailbox() == "Tom&Jerry"
        assert reader(b"inbox", utf8=True).mailbox() == "INBOX"
        assert encode_mailbox("Entwürfe", utf8=True) == "Entwürfe".encode()
        with pytest.raises(ParseError, match="UTF-8"):
            reader(b'"\xff"', utf8=True).mailbox()

    @pytest.mark.parametrize(
        ("text", "pattern"),
        [
            (b"*", "*"),
            (b"%", "%"),
            (b"INBOX.%", "INBOX.%"),
            (b"inbox", "INBOX"),
            (b"Entw&APw-rfe/*", "Entwürfe/*"),
            (b'"Archive/%"', "Archive/%"),
            (b'""', ""),
            (b"a]b", "a]b"),
        ],
    )
    def test_list_mailbox(self, text: bytes, pattern: str) -> None:
        assert parse("list_mailbox", text) == pattern

    def test_list_mailbox_from_literal(self) -> None:
        assert parse("list_mailbox", b"", b"Sent/%") == "Sent/%"

    @pytest.mark.parametrize("text", [b"", b"(", b"&AMQ*", b"a\\b"])
    def test_bad_list_mailbox(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("list_mailbox", text)

    def test_mailbox_refuses_wildcards(self) -> None:
        with pytest.raises(ParseError):
            parse("mailbox", b"foo*")

    def test_list_command(self) -> None:
        r = reader(b'A1 LIST "" "*"')
        r.tag(), r.sp(), r.command_name(), r.sp()
        assert r.mailbox() == ""
        r.sp()
        assert r.list_mailbox() == "*"
        r.end()


# ---------------------------------------------------------------------------
# Lists and flags


class TestLists:
    def test_paren_list(self) -> None:
        r = reader(b"()")
        assert r.paren_list(r.atom) == []
        r.end()
        r = reader(b"(a b c)")
        assert r.paren_list(r.atom) == [b"a", b"b", b"c"]
        r.end()
        r = reader(b'(1 "two" {3})')  # "{3}" is an atom-shaped mistake
        with pytest.raises(ParseError):
            r.paren_list(r.astring)

    @pytest.mark.parametrize("text", [b"(a b", b"(a  b)", b"( a)", b"(a )", b"a b)", b""])
    def test_bad_paren_list(self, text: bytes) -> None:
        r = reader(text)
        with pytest.raises(ParseError):
            r.paren_list(r.atom)

    def test_flag_list(self) -> None:
        assert parse("flag_list", rb"(\Seen \ANSWERED \flagged \Deleted \dRaFt $Forwarded Junk)") == [
            "\\Seen", "\\Answered", "\\Flagged", "\\Deleted", "\\Draft", "$Forwarded", "Junk",
        ]
        assert parse("flag_list", b"()") == []
        assert parse("flag_list", rb"(\Recent)") == ["\\Recent"]

    def test_bare_flags_for_store(self) -> None:
        r = reader(rb"A1 STORE 1 +FLAGS \Seen")
        r.tag(), r.sp(), r.command_name(), r.sp(), r.sequence_set(), r.sp()
        assert r.atom() == b"+FLAGS"
        r.sp()
        assert r.flag_list() == ["\\Seen"]
        r.end()
        assert parse("flag_list", rb"\Seen \Deleted $Label1") == ["\\Seen", "\\Deleted", "$Label1"]
        assert parse("flag_list", b"$Junk  ") == ["$Junk"]

    @pytest.mark.parametrize(
        "text",
        [rb"(\Foo)", rb"(\*)", rb"(\)", rb"(\Seen", b"(Seen%)", b"(a  b)", b"", b"(\\Seen\\Draft)",
         b'("quoted")', rb"\Seen  \Draft"],
    )
    def test_bad_flags(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("flag_list", text)


# ---------------------------------------------------------------------------
# Sequence sets


class TestSequenceSet:
    @pytest.mark.parametrize(
        ("text", "parts"),
        [
            (b"1", ((1, 1),)),
            (b"*", ((None, None),)),
            (b"1:*", ((1, None),)),
            (b"*:4", ((None, 4),)),
            (b"5:2", ((5, 2),)),
            (b"1,3:5,7:*", ((1, 1), (3, 5), (7, None))),
            (b"1:4294967295", ((1, 4294967295),)),
        ],
    )
    def test_parse(self, text: bytes, parts: tuple) -> None:
        value = parse("sequence_set", text)
        assert value == SequenceSet(parts)
        assert str(value) == text.decode()

    @pytest.mark.parametrize(
        "text", [b"", b"0", b"1:0", b"1:", b":1", b",1", b"1,", b"1,,2", b"**", b"1:2:3",
                 b"4294967296", b"$", b"1,$", b"a", b"-1"],
    )
    def test_bad(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("sequence_set", text)

    def test_searchres_message(self) -> None:
        with pytest.raises(ParseError, match="SEARCHRES"):
            parse("sequence_set", b"$")

    def test_resolve_merges_and_sorts(self) -> None:
        assert seq("1:3,4,6:7,10:*").resolve(8) == [(1, 4), (6, 10)]
        assert seq("9,2:3,1").resolve(20) == [(1, 3), (9, 9)]
        assert seq("5:2").resolve(10) == [(2, 5)]
        assert seq("*").resolve(17) == [(17, 17)]
        assert seq("*:4").resolve(2) == [(2, 4)]
        assert seq("1:*").resolve(0) == [(1, 1)]
        assert seq("*").resolve(0) == []
        assert seq("1:3,2:5,7").resolve(7) == [(1, 5), (7, 7)]

    def test_huge_range_is_not_materialised(self) -> None:
        huge = seq("1:4294967295,7,4294967295:1")
        started = time.perf_counter()
        assert huge.resolve(10) == [(1, 4294967295)]
        assert huge.contains(4294967295, 10)
        assert huge.contains(123456789, 10)
        assert not huge.contains(0, 10)
        assert time.perf_counter() - started < 0.5

    def test_contains(self) -> None:
        sequence = seq("2:4,10:*")
        assert [n for n in range(0, 14) if sequence.contains(n, 12)] == [2, 3, 4, 10, 11, 12]
        assert seq("10:*").contains(7, 7)  # "*" below the range still counts
        assert seq("5:2").contains(3, 100)

    def test_immutable_and_validated(self) -> None:
        sequence = seq("1:2")
        with pytest.raises(AttributeError):
            sequence.parts = ()  # type: ignore[misc]
        with pytest.raises(ValueError):
            SequenceSet(())
        with pytest.raises(ValueError):
            SequenceSet(((0, 1),))
        assert hash(seq("1:2")) == hash(SequenceSet(((1, 2),)))

    def test_str_single_number(self) -> None:
        assert str(seq("3:3")) == "3"

    @pytest.mark.parametrize(
        ("uids", "wire"),
        [
            ([1, 2, 3, 5], b"1:3,5"),
            ([7], b"7"),
            ([1, 3, 5], b"1,3,5"),
            ([10, 11, 12, 13], b"10:13"),
            ([3, 1, 2], b"3,1:2"),  # order kept: COPYUID pairs elementwise
            (iter([4, 5]), b"4:5"),
            (range(1, 100001), b"1:100000"),
            ([], b""),
        ],
    )
    def test_format_uid_set(self, uids: list[int], wire: bytes) -> None:
        assert format_uid_set(uids) == wire

    def test_format_uid_set_round_trips(self) -> None:
        uids = [1, 2, 3, 5, 8, 9, 4294967295]
        parsed = SequenceSet.parse(format_uid_set(uids))
        assert [n for n in uids if parsed.contains(n, 1)] == uids
        assert parsed.resolve(1) == [(1, 3), (5, 5), (8, 9), (4294967295, 4294967295)]

    @pytest.mark.parametrize("bad", [0, -1, 2**32])
    def test_format_uid_set_range(self, bad: int) -> None:
        with pytest.raises(ValueError):
            format_uid_set([1, bad])


# ---------------------------------------------------------------------------
# Dates


class TestDates:
    @pytest.mark.parametrize(
        ("text", "value"),
        [
            (b"1-Feb-1994", datetime.date(1994, 2, 1)),
            (b"01-feb-1994", datetime.date(1994, 2, 1)),
            (b'"31-DEC-2024"', datetime.date(2024, 12, 31)),
            (b"29-Feb-2024", datetime.date(2024, 2, 29)),
        ],
    )
    def test_date(self, text: bytes, value: datetime.date) -> None:
        assert parse("date", text) == value

    @pytest.mark.parametrize(
        "text",
        [b"30-Feb-2024", b"1-Foo-1994", b"1994-02-01", b"1-Feb-94", b"001-Feb-1994",
         b"0-Feb-1994", b'"1-Feb-1994', b"1-Feb-1994x", b'" 1-Feb-1994"', b""],
    )
    def test_bad_date(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("date", text)

    def test_date_time(self) -> None:
        value = parse("date_time", b'"17-Jul-1996 02:44:25 -0700"')
        assert value == datetime.datetime(
            1996, 7, 17, 2, 44, 25, tzinfo=datetime.timezone(-datetime.timedelta(hours=7))
        )
        assert value.utcoffset() == -datetime.timedelta(hours=7)

    def test_date_time_space_padded_and_half_hour_zone(self) -> None:
        value = parse("date_time", b'" 7-jul-1996 23:59:59 +0530"')
        assert value == datetime.datetime(
            1996, 7, 7, 23, 59, 59,
            tzinfo=datetime.timezone(datetime.timedelta(hours=5, minutes=30)),
        )
        assert parse("date_time", b'"7-Jul-1996 00:00:00 +0000"').day == 7

    @pytest.mark.parametrize(
        "text",
        [
            b"17-Jul-1996",
            b'"17-Jul-1996 02:44:25"',
            b'"17-Jul-1996 24:00:00 +0000"',
            b'"17-Jul-1996 02:61:00 +0000"',
            b'"17-Jul-1996 02:44:25 +2400"',
            b'"17-Jul-1996 02:44:25 +0060"',
            b'"17-Jul-1996 02:44:25 0700"',
            b'"31-Jun-1996 02:44:25 +0000"',
            b'"17-Jul-1996  02:44:25 +0000"',
            b'"  7-Jul-1996 02:44:25 +0000"',
        ],
    )
    def test_bad_date_time(self, text: bytes) -> None:
        with pytest.raises(ParseError):
            parse("date_time", text)


# ---------------------------------------------------------------------------
# FETCH


def body(**kwargs: object) -> FetchAttribute:
    return FetchAttribute("BODY", has_section=True, **kwargs)  # type: ignore[arg-type]


class TestFetch:
    @pytest.mark.parametrize(
        ("text", "names"),
        [
            (b"ALL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE"]),
            (b"fast", ["FLAGS", "INTERNALDATE", "RFC822.SIZE"]),
            (b"FULL", ["FLAGS", "INTERNALDATE", "RFC822.SIZE", "ENVELOPE", "BODY"]),
            (b"flags", ["FLAGS"]),
            (b"(UID RFC822.SIZE FLAGS BODYSTRUCTURE)", ["UID", "RFC822.SIZE", "FLAGS", "BODYSTRUCTURE"]),
            (b"(envelope internaldate rfc822 rfc822.header rfc822.text modseq body)",
             ["ENVELOPE", "INTERNALDATE", "RFC822", "RFC822.HEADER", "RFC822.TEXT", "MODSEQ", "BODY"]),
        ],
    )
    def test_simple(self, text: bytes, names: list[str]) -> None:
        attributes = parse("fetch_attributes", text)
        assert attributes == [FetchAttribute(name) for name in names]
        assert [a.response_name() for a in attributes] == [n.encode() for n in names]

    def test_thunderbird_header_fetch(self) -> None:
        r = reader(
            b"5 UID fetch 1:* (UID RFC822.SIZE FLAGS BODY.PEEK[HEADER.FIELDS "
            b"(From To Cc Bcc Subject Date Message-ID Priority X-Priority References "
            b"Newsgroups In-Reply-To Content-Type Reply-To)])"
        )
        assert r.tag() == b"5"
        r.sp()
        assert (r.command_name(), r.sp(), r.command_name()) == ("UID", None, "FETCH")
        r.sp()
        assert r.sequence_set() == seq("1:*")
        r.sp()
        attributes = r.fetch_attributes()
        r.end()
        fields = ("FROM", "TO", "CC", "BCC", "SUBJECT", "DATE", "MESSAGE-ID", "PRIORITY",
                  "X-PRIORITY", "REFERENCES", "NEWSGROUPS", "IN-REPLY-TO", "CONTENT-TYPE",
                  "REPLY-TO")
        assert attributes == [
            FetchAttribute("UID"),
            FetchAttribute("RFC822.SIZE"),
            FetchAttribute("FLAGS"),
            body(peek=True, text="HEADER.FIELDS", fields=fields),
        ]
        assert attributes[3].response_name() == b"BODY[HEADER.FIELDS (" + " ".join(fields).encode() + b")]"
        assert not attributes[3].marks_seen

    def test_brief_example(self) -> None:
        [attribute] = parse(
            "fetch_attributes",
            b"BODY.PEEK[HEADER.FIELDS (From To Subject Date Message-ID Content-Type)]",
        )
        assert attribute == body(
            peek=True, text="HEADER.FIELDS",
            fields=("FROM", "TO", "SUBJECT", "DATE", "MESSAGE-ID", "CONTENT-TYPE"),
        )
        assert attribute.response_name() == (
            b"BODY[HEADER.FIELDS (FROM TO SUBJECT DATE MESSAGE-ID CONTENT-TYPE)]"
        )

    @pytest.mark.parametrize(
        ("text", "expected", "echo"),
        [
            (b"BODY[]", body(), b"BODY[]"),
            (b"body.peek[]", body(peek=True), b"BODY[]"),
            (b"BODY[]<0.1024>", body(partial=(0, 1024)), b"BODY[]<0>"),
            (b"BODY.PEEK[TEXT]<512.100>", body(peek=True, text="TEXT", partial=(512, 100)), b"BODY[TEXT]<512>"),
            (b"BODY[HEADER]", body(text="HEADER"), b"BODY[HEADER]"),
            (b"BODY[1]", body(part=(1,)), b"BODY[1]"),
            (b"BODY[1.2.MIME]", body(part=(1, 2), text="MIME"), b"BODY[1.2.MIME]"),
            (b"BODY[1.2.3]", body(part=(1, 2, 3)), b"BODY[1.2.3]"),
            (b"BODY[2.HEADER]", body(part=(2,), text="HEADER"), b"BODY[2.HEADER]"),
            (b"BODY[3.text]", body(part=(3,), text="TEXT"), b"BODY[3.TEXT]"),
            (b"BODY[HEADER.FIELDS.NOT (Received)]",
             body(text="HEADER.FIELDS.NOT", fields=("RECEIVED",)), b"BODY[HEADER.FIELDS.NOT (RECEIVED)]"),
            (b"BODY[1.HEADER.FIELDS (Subject)]<0.10>",
             body(part=(1,), text="HEADER.FIELDS", fields=("SUBJECT",), partial=(0, 10)),
             b"BODY[1.HEADER.FIELDS (SUBJECT)]<0>"),
            (b'BODY[HEADER.FIELDS ("From" "X(Odd)")]',
             body(text="HEADER.FIELDS", fields=("FROM", "X(ODD)")), b'BODY[HEADER.FIELDS (FROM "X(ODD)")]'),
        ],
    )
    def test_sections(self, text: bytes, expected: FetchAttribute, echo: bytes) -> None:
        assert parse("fetch_attributes", text) == [expected]
        assert expected.response_name() == echo

    def test_header_field_name_as_literal(self) -> None:
        r = reader(b"(BODY[HEADER.FIELDS (", Literal(b"Subject"), b")] UID)")
        assert r.fetch_attributes() == [body(text="HEADER.FIELDS", fields=("SUBJECT",)), FetchAttribute("UID")]
        r.end()

    def test_marks_seen(self) -> None:
        def seen(text: bytes) -> bool:
            [attribute] = parse("fetch_attributes", text)
            return attribute.marks_seen

        assert seen(b"BODY[]") and seen(b"BODY[TEXT]") and seen(b"RFC822") and seen(b"RFC822.TEXT")
        assert not any(seen(t) for t in (b"BODY.PEEK[]", b"BODY", b"RFC822.HEADER", b"RFC822.SIZE", b"FLAGS"))

    def test_followed_by_modifiers(self) -> None:
        r = reader(b"(FLAGS) (CHANGEDSINCE 12345)")
        assert r.fetch_attributes() == [FetchAttribute("FLAGS")]
        r.sp()
        assert r.paren_list(lambda: (r.atom(), r.sp(), r.number64())) == [(b"CHANGEDSINCE", None, 12345)]
        r.end()

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (b"()", "empty fetch attribute list"),
            (b"(ALL)", "not allowed in a list"),
            (b"(FLAGS FAST)", "not allowed in a list"),
            (b"FOO", "unknown fetch attribute"),
            (b"PREVIEW", "unknown fetch attribute"),
            (b"BODY.PEEK", "needs a section"),
            (b"BINARY[1]", "BINARY"),
            (b"BINARY.PEEK[1]", "BINARY"),
            (b"BINARY.SIZE[1]", "BINARY"),
            (b"BODY[MIME]", "MIME needs a part"),
            (b"BODY[HEADER.FIELDS ()]", "empty header list"),
            (b"BODY[HEADER.FIELDS]", "expected SP"),
            (b"BODY[HEADER.FIELDS Subject]", r"expected \("),
            (b"BODY[HEADER.FIELDS (Subject:)]", "invalid header field name"),
            (b'BODY[HEADER.FIELDS ("")]', "invalid header field name"),
            (b'BODY[HEADER.FIELDS ("X Y")]', "invalid header field name"),
            (b"BODY[0]", "non-zero"),
            (b"BODY[1.0]", "non-zero"),
            (b"BODY[1.]", "invalid section"),
            (b"BODY[.1]", "invalid section"),
            (b"BODY[1.FOO]", "invalid section"),
            (b"BODY[1HEADER]", r"expected \]"),
            (b"BODY[FOO]", "invalid section"),
            (b"BODY[ HEADER]", "invalid section"),
            (b"BODY[HEADER ]", r"expected \]"),
            (b"BODY[TEXT", r"expected \]"),
            (b"BODY[]<0>", r"expected \."),
            (b"BODY[]<0.0>", "non-zero"),
            (b"BODY[]<.5>", "expected number"),
            (b"BODY[]<0.5", "expected >"),
            (b"BODY[]<4294967296.1>", "out of range"),
            (b"(FLAGS", r"expected SP"),
            (b"(FLAGS  UID)", "extra space"),
            (b"", "expected fetch attribute"),
            (b"[1]", "expected fetch attribute"),
        ],
    )
    def test_errors(self, text: bytes, message: str) -> None:
        with pytest.raises(ParseError, match=message):
            parse("fetch_attributes", text)

    def test_garbage_after_section_is_trailing_data(self) -> None:
        with pytest.raises(ParseError, match="trailing"):
            parse("fetch_attributes", b"BODY[]x")


# ---------------------------------------------------------------------------
# SEARCH


def search(text: bytes, *rest: bytes) -> tuple[str | None, object]:
    return parse("search_program", text, *rest)  # type: ignore[return-value]


def key(text: bytes, *rest: bytes) -> object:
    charset, result = search(text, *rest)
    assert charset is None
    return result


SEEN = FlagKey("\\Seen", True)


class TestSearch:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            (b"ALL", All()),
            (b"all", All()),
            (b"ANSWERED", FlagKey("\\Answered", True)),
            (b"UNANSWERED", FlagKey("\\Answered", False)),
            (b"DELETED", FlagKey("\\Deleted", True)),
            (b"UNDELETED", FlagKey("\\Deleted", False)),
            (b"DRAFT", FlagKey("\\Draft", True)),
            (b"UNDRAFT", FlagKey("\\Draft", False)),
            (b"FLAGGED", FlagKey("\\Flagged", True)),
            (b"unflagged", FlagKey("\\Flagged", False)),
            (b"SEEN", SEEN),
            (b"UNSEEN", FlagKey("\\Seen", False)),
            (b"RECENT", FlagKey("\\Recent", True)),
            (b"OLD", FlagKey("\\Recent", False)),
            (b"NEW", And((FlagKey("\\Recent", True), FlagKey("\\Seen", False)))),
            (b"KEYWORD $Forwarded", FlagKey("$Forwarded", True)),
            (b"UNKEYWORD Junk", FlagKey("Junk", False)),
            (b"FROM fred", HeaderKey("FROM", "fred")),
            (b'TO "a b"', HeaderKey("TO", "a b")),
            (b"CC x", HeaderKey("CC", "x")),
            (b"BCC x", HeaderKey("BCC", "x")),
            (b'SUBJECT ""', HeaderKey("SUBJECT", "")),
            (b"HEADER Message-ID <abc@example.com>", HeaderKey("MESSAGE-ID", "<abc@example.com>")),
            (b'header "X-Spam" ""', HeaderKey("X-SPAM", "")),
            (b"BODY hello", BodyKey("hello")),
            (b'TEXT "hello world"', TextKey("hello world")),
            (b"BEFORE 1-Feb-1994", DateKey("INTERNAL", "BEFORE", datetime.date(1994, 2, 1))),
            (b"ON 1-Feb-1994", DateKey("INTERNAL", "ON", datetime.date(1994, 2, 1))),
            (b'SINCE "1-Feb-1994"', DateKey("INTERNAL", "SINCE", datetime.date(1994, 2, 1))),
            (b"SENTBEFORE 1-Feb-1994", DateKey("SENT", "BEFORE", datetime.date(1994, 2, 1))),
            (b"SENTON 1-Feb-1994", DateKey("SENT", "ON", datetime.date(1994, 2, 1))),
            (b"SENTSINCE 1-Feb-1994", DateKey("SENT", "SINCE", datetime.date(1994, 2, 1))),
            (b"LARGER 1024", SizeKey("LARGER", 1024)),
            (b"SMALLER 5000000000", SizeKey("SMALLER", 5000000000)),
            (b"UID 1:*", SequenceKey(seq("1:*"), uid=True)),
            (b"2:4,7", SequenceKey(seq("2:4,7"), uid=False)),
            (b"*", SequenceKey(seq("*"), uid=False)),
            (b"MODSEQ 0", ModSeqKey(0)),
            (b"MODSEQ 620162338", ModSeqKey(620162338)),
            (rb'MODSEQ "/flags/\\draft" all 620162338', ModSeqKey(620162338, "/flags/\\draft", "all")),
            (b'MODSEQ "/flags/$Junk" PRIV 5', ModSeqKey(5, "/flags/$Junk", "priv")),
        ],
    )
    def test_keys(self, text: bytes, expected: object) -> None:
        assert key(text) == expected

    def test_implicit_and(self) -> None:
        assert key(b"UNDELETED FROM fred SINCE 1-Feb-1994") == And((
            FlagKey("\\Deleted", False),
            HeaderKey("FROM", "fred"),
            DateKey("INTERNAL", "SINCE", datetime.date(1994, 2, 1)),
        ))

    def test_nested(self) -> None:
        assert key(b"OR (FROM a NOT SEEN) OR TO b NOT (SUBJECT c BODY d)") == Or(
            And((HeaderKey("FROM", "a"), Not(SEEN))),
            Or(HeaderKey("TO", "b"), Not(And((HeaderKey("SUBJECT", "c"), BodyKey("d"))))),
        )
        assert key(b"NOT NOT SEEN") == Not(Not(SEEN))
        assert key(b"((SEEN))") == SEEN
        assert key(b"(SEEN) (1:2)") == And((SEEN, SequenceKey(seq("1:2"), uid=False)))
        assert key(b"or seen 1:3") == Or(SEEN, SequenceKey(seq("1:3"), uid=False))

    def test_real_clients(self) -> None:
        # K-9 / Outlook / Apple Mail shapes
        assert key(b"1:* NOT DELETED") == And((SequenceKey(seq("1:*"), uid=False), Not(FlagKey("\\Deleted", True))))
        assert key(b'OR OR SUBJECT "x" FROM "x" TO "x"') == Or(
            Or(HeaderKey("SUBJECT", "x"), HeaderKey("FROM", "x")), HeaderKey("TO", "x")
        )
        assert key(b"UID 100:* NOT DELETED  ") == And(
            (SequenceKey(seq("100:*"), uid=True), Not(FlagKey("\\Deleted", True)))
        )

    def test_charset(self) -> None:
        assert search(b'CHARSET utf-8 SUBJECT "caf\xc3\xa9"') == ("UTF-8", HeaderKey("SUBJECT", "café"))
        assert search(b'charset "US-ASCII" ALL') == ("US-ASCII", All())
        assert search(b"CHARSET ", b"UTF-8", b" TEXT x") == ("UTF-8", TextKey("x"))

    def test_charset_errors(self) -> None:
        with pytest.raises(ParseError):
            search(b"CHARSET UTF-8")
        with pytest.raises(ParseError):
            search(b"CHARSET")
        with pytest.raises(ParseError, match="invalid charset"):
            search(b'CHARSET "\xc3\xa9" ALL')
        with pytest.raises(ParseError):  # 8-bit text must be quoted or a literal
            search(b"CHARSET UTF-8 SUBJECT caf\xc3\xa9")
        with pytest.raises(ParseError, match="unknown search key CHARSET"):
            search(b"ALL CHARSET UTF-8")

    def test_literals(self) -> None:
        # Wire: A1 SEARCH CHARSET UTF-8 SUBJECT {5}\r\ncafé\r\n (5 octets)
        r = reader(b"A1 SEARCH CHARSET UTF-8 SUBJECT ", Literal("café".encode()), b"")
        r.tag(), r.sp(), r.command_name(), r.sp()
        assert r.search_program() == ("UTF-8", HeaderKey("SUBJECT", "café"))
        r.end()
        assert key(b"OR FROM ", b"a b", b" TEXT ", b"c)d", b"") == Or(HeaderKey("FROM", "a b"), TextKey("c)d"))
        assert key(b"HEADER ", b"X-Foo", b" ", b"bar") == HeaderKey("X-FOO", "bar")
        assert key(b"SINCE ", b"1-Feb-1994") == DateKey("INTERNAL", "SINCE", datetime.date(1994, 2, 1))

    def test_undecodable_utf8_is_replaced(self) -> None:
        assert key(b"SUBJECT ", b"caf\xe9") == HeaderKey("SUBJECT", "caf\ufffd")

    def test_quoted_escapes(self) -> None:
        assert key(rb'SUBJECT "say \"hi\" \\o/"') == HeaderKey("SUBJECT", 'say "hi" \\o/')

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            (b"", "expected search key"),
            (b"FOO", "unknown search key FOO"),
            (b"FROM", "expected SP"),
            (b"FROM ", "expected string"),
            (b"FROM  x", "extra space"),
            (b"OR SEEN", "expected SP"),
            (b"NOT", "expected SP"),
            (b"()", "empty search key list"),
            (b"(SEEN", "expected SP"),
            (b"SEEN)", "trailing|expected SP"),
            (b"(SEEN))", "trailing|expected SP"),
            (b"LARGER x", "expected number"),
            (b"LARGER -1", "expected number"),
            (b"SMALLER 99999999999999999999", "out of range"),
            (b"UID", "expected SP"),
            (b"UID x", "expected number"),
            (b"BEFORE 1994-02-01", "invalid date"),
            (b"KEYWORD \\Seen", "expected atom"),
            (b"HEADER Subject", "expected SP"),
            (b"MODSEQ x", "expected number"),
            (b'MODSEQ "/flags/\\\\Seen" 5', "invalid MODSEQ entry type"),
            (b'MODSEQ "/flags/\\\\Seen" all', "expected SP"),
            (b'MODSEQ "/flags/\\\\Seen" mine 5', "invalid MODSEQ entry type"),
            (b'MODSEQ "/foo" all 5', "invalid MODSEQ entry name"),
            (b'MODSEQ "/flags/" all 5', "invalid MODSEQ entry name"),
            (b"$", "SEARCHRES"),
            (b"0", "non-zero"),
            (b"SEEN  UNSEEN", "extra space"),
            (b"\xc3\xa9", "expected search key"),
        ],
    )
    def test_errors(self, text: bytes, message: str) -> None:
        with pytest.raises(ParseError, match=message):
            search(text)

    def test_nesting_is_bounded(self) -> None:
        depth_ok = b"NOT " * 60 + b"SEEN"
        assert isinstance(key(depth_ok), Not)
        for hostile in (b"NOT " * 10000 + b"SEEN", b"(" * 10000 + b"SEEN" + b")" * 10000,
                        b"OR " * 10000 + b"SEEN SEEN"):
            with pytest.raises(ParseError, match="nested too deeply"):
                search(hostile)

    def test_search_command_shape(self) -> None:
        r = reader(b"A282 UID SEARCH FLAGGED SINCE 1-Feb-1994 NOT FROM \"Smith\"")
        r.tag(), r.sp(), r.command_name(), r.sp()
        assert r.command_name() == "SEARCH"
        r.sp()
        charset, program = r.search_program()
        r.end()
        assert charset is None
        assert program == And((
            FlagKey("\\Flagged", True),
            DateKey("INTERNAL", "SINCE", datetime.date(1994, 2, 1)),
            Not(HeaderKey("FROM", "Smith")),
        ))


# ---------------------------------------------------------------------------
# Robustness: garbage in, ParseError (and only ParseError) out


_VOCABULARY = [
    b" ", b"  ", b"(", b")", b"[", b"]", b"<", b">", b".", b":", b",", b"*", b"%", b"$", b"\\",
    b'"', b"{", b"}", b"+", b"-", b"&", b"\r", b"\n", b"\x00", b"\xff", b"\xc3\xa4", b"0", b"1",
    b"7", b"4294967296", b"99999999999999999999", b"A1", b"NIL", b"INBOX", b"&AMQ-", b"&AMQ",
    b"BODY", b"BODY.PEEK", b"HEADER.FIELDS", b"MIME", b"TEXT", b"HEADER", b"FLAGS", b"UID",
    b"ALL", b"OR", b"NOT", b"SEEN", b"FROM", b"CHARSET", b"MODSEQ", b"SINCE", b"1-Feb-1994",
    b"17-Jul-1996 02:44:25 -0700", b"\\Seen", b"\\Recent", b"\\Foo", b"KEYWORD", b"LARGER",
    b"BINARY", b"RFC822.SIZE", b"/flags/", b"priv",
]

_OPERATIONS: list[Callable[[CommandReader], object]] = [
    CommandReader.tag, CommandReader.command_name, CommandReader.sp, CommandReader.at_end,
    CommandReader.end, CommandReader.peek_char, CommandReader.atom, CommandReader.number,
    CommandReader.number64, CommandReader.nz_number, CommandReader.astring,
    CommandReader.nstring, CommandReader.string, CommandReader.string_or_literal,
    CommandReader.mailbox, CommandReader.list_mailbox, CommandReader.flag,
    CommandReader.flag_list, CommandReader.sequence_set, CommandReader.date,
    CommandReader.date_time, CommandReader.fetch_attributes, CommandReader.search_program,
    lambda r: r.paren_list(r.astring),
    lambda r: r.paren_list(r.fetch_attributes),
]


def _garbage(rng: random.Random) -> list[bytes | Literal]:
    def text() -> bytes:
        if rng.random() < 0.2:
            return rng.randbytes(rng.randrange(0, 40))
        return b"".join(rng.choice(_VOCABULARY) for _ in range(rng.randrange(0, 25)))

    segments: list[bytes | Literal] = [text()]
    for _ in range(rng.choice([0, 0, 0, 1, 2])):
        segments += [Literal(text()), text()]
    return segments


def test_random_garbage_raises_only_parse_error() -> None:
    rng = random.Random(3501)
    outcomes = {"ok": 0, "error": 0}
    for _ in range(4000):
        segments = _garbage(rng)
        for operation in _OPERATIONS:
            r = CommandReader(segments)
            try:
                for _ in range(6):  # a few calls in a row, like a command parser
                    operation(r) if rng.random() < 0.5 else rng.choice(_OPERATIONS)(r)
            except ParseError as error:
                assert str(error)
                outcomes["error"] += 1
            else:
                outcomes["ok"] += 1
    # Make sure the generator exercised both paths.
    assert outcomes["ok"] > 200 and outcomes["error"] > 10000


def test_random_garbage_on_framing_helpers() -> None:
    rng = random.Random(7888)
    for _ in range(5000):
        line = b"".join(rng.choice(_VOCABULARY) for _ in range(rng.randrange(0, 10)))
        if rng.random() < 0.5:
            line += b"{" + b"".join(rng.choice(_VOCABULARY) for _ in range(rng.randrange(0, 3))) + b"}"
        try:
            result = literal_announcement(line)
        except ParseError:
            continue
        assert result is None or (0 <= result[0] <= 2**32 - 1 and isinstance(result[1], bool))
        try:
            decode_mailbox_name(line)
        except ParseError:
            pass


def test_long_hostile_inputs_are_fast() -> None:
    started = time.perf_counter()
    for text in (b"a" * MAX_LINE + b"\x01", b'"' + b"\\" * MAX_LINE, b"&" + b"A" * MAX_LINE,
                 b"(" * MAX_LINE, b"1," * (MAX_LINE // 2), b"{" * MAX_LINE + b"}"):
        for operation in (CommandReader.mailbox, CommandReader.search_program,
                          CommandReader.fetch_attributes, CommandReader.sequence_set):
            try:
                r = CommandReader([text])
                operation(r)
                r.end()
            except ParseError:
                pass
        try:
            literal_announcement(text)
        except ParseError:
            pass
    assert time.perf_counter() - started < 5
