"""Trace fields: exact shape, and nothing a client sends can break out of them."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from twisted_mail_cluster.smtp.headers import (
    address_literal,
    clean_helo,
    starts_with_header,
    trace_fields,
)

WHEN = datetime(2024, 5, 14, 10, 0, 0, tzinfo=timezone(timedelta(hours=2)))


def test_trace_fields_for_one_recipient() -> None:
    fields = trace_fields(
        sender="a@remote.test", helo=b"client.example", peer_ip="192.0.2.7",
        hostname="mx.example.test", with_protocol="ESMTPA", transaction="0123456789AB",
        recipients=["alice@example.test"], when=WHEN,
    )
    assert fields == (
        b"Return-Path: <a@remote.test>\r\n"
        b"Received: from client.example ([192.0.2.7])\r\n"
        b"\tby mx.example.test (twisted-mail-cluster) with ESMTPA id 0123456789AB\r\n"
        b"\tfor <alice@example.test>; Tue, 14 May 2024 10:00:00 +0200\r\n"
    )


def test_trace_fields_name_no_recipient_when_there_are_several() -> None:
    fields = trace_fields(
        sender="", helo=None, peer_ip="::1", hostname="mx.example.test", with_protocol="SMTP",
        transaction="X", recipients=["a@example.test", "b@example.test"], when=WHEN,
    )
    assert fields == (
        b"Return-Path: <>\r\n"
        b"Received: from unknown ([IPv6:::1])\r\n"
        b"\tby mx.example.test (twisted-mail-cluster) with SMTP id X; Tue, 14 May 2024 10:00:00 +0200\r\n"
    )


@pytest.mark.parametrize(
    ("ip", "literal"),
    [
        ("192.0.2.1", "[192.0.2.1]"),
        ("2001:db8::1", "[IPv6:2001:db8::1]"),
        ("::ffff:192.0.2.1", "[192.0.2.1]"),
        ("fe80::1%eth0", "[IPv6:fe80::1]"),
    ],
)
def test_address_literal(ip: str, literal: str) -> None:
    assert address_literal(ip) == literal


@pytest.mark.parametrize(
    ("helo", "cleaned"),
    [
        (b"mail.example.org", "mail.example.org"),
        (b"[192.0.2.1]", "[192.0.2.1]"),
        (b"evil\nBcc: x@y", "evil_Bcc:_x_y"),  # no line break survives
        (b"a (comment) b", "a__comment__b"),
        (b"\xff\xfe", "__"),
        (b"", "unknown"),
        (b"x" * 300, "x" * 255),
    ],
)
def test_clean_helo(helo: bytes, cleaned: str) -> None:
    assert clean_helo(helo) == cleaned


@pytest.mark.parametrize(
    ("first_line", "header"),
    [
        (None, True),
        (b"", True),
        (b"Subject: x", True),
        (b"X-Odd-But-Valid:", True),
        (b"From sender@remote.test Tue May 14 10:00:00 2024", False),
        (b" continuation", False),
        (b"just text", False),
    ],
)
def test_starts_with_header(first_line: bytes | None, header: bool) -> None:
    assert starts_with_header(first_line) is header
