"""The trace header fields a final-delivery SMTP server adds (RFC 5321 4.4).

Everything that goes into them is client-supplied except our host name, so
each piece is reduced to characters that cannot break the header: a HELO
argument with a bare LF in it must not become a forged header line.
"""

from __future__ import annotations

import ipaddress
import re
import secrets
from collections.abc import Sequence
from datetime import datetime
from email.utils import format_datetime

#: A header field's first line (RFC 5322 2.2: printable ASCII except ":", then ":").
_HEADER_FIELD = re.compile(rb"^[\x21-\x39\x3b-\x7e]+:")
#: What may stand in a HELO name or an address literal.
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]]")
#: Characters an envelope address may carry into a header.
_ADDRESS_UNSAFE = re.compile(r"[^\x21-\x7e]")
_MAX_HELO = 255


def transaction_id() -> str:
    """A short id naming one transaction in the Received field, the 250 reply and the log."""
    return secrets.token_hex(6).upper()


def starts_with_header(first_line: bytes | None) -> bool:
    """Whether a message's first line begins its header section.

    When it does not (a body with no header, or mbox's ``From `` line), a
    blank line must follow our trace fields, or the body's first line would
    read as a broken header.  An empty first line already is that blank line.
    """
    return first_line is None or first_line == b"" or bool(_HEADER_FIELD.match(first_line))


def clean_helo(helo: bytes | str | None) -> str:
    text = helo.decode("ascii", "replace") if isinstance(helo, bytes) else (helo or "")
    text = _HELO_UNSAFE.sub("_", text.strip())[:_MAX_HELO]
    return text or "unknown"


def clean_address(address: str) -> str:
    return _ADDRESS_UNSAFE.sub("_", address)


def address_literal(ip: str) -> str:
    """``[192.0.2.1]`` or ``[IPv6:2001:db8::1]`` (RFC 5321 4.1.3)."""
    try:
        parsed = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return "[" + clean_helo(ip) + "]"
    if isinstance(parsed, ipaddress.IPv6Address):
        if parsed.ipv4_mapped is not None:
            return f"[{parsed.ipv4_mapped}]"
        return f"[IPv6:{parsed.compressed}]"
    return f"[{parsed}]"


def trace_fields(
    *,
    sender: str,
    helo: bytes | str | None,
    peer_ip: str,
    hostname: str,
    with_protocol: str,
    transaction: str,
    tls: str | None = None,
    recipients: Sequence[str],
    when: datetime,
) -> bytes:
    """``Return-Path`` and ``Received``, CRLF-terminated, to go before the message.

    The reverse DNS name of the peer is not looked up: a resolver round trip
    per message for a comment nobody trusts is not worth it, and RFC 5321
    4.4 allows the bare address literal.  ``for`` names the recipient only
    when there is exactly one, so a message does not show its Bcc list to
    every recipient.
    """
    received = f"Received: from {clean_helo(helo)} ({address_literal(peer_ip)})\r\n"
    if tls is not None:
        received += f"\t(using {tls})\r\n"
    received += f"\tby {hostname} (twisted-mail-cluster) with {with_protocol} id {transaction}"
    if len(recipients) == 1:
        received += f"\r\n\tfor <{clean_address(recipients[0])}>"
    received += f"; {format_datetime(when)}\r\n"
    return f"Return-Path: <{clean_address(sender)}>\r\n{received}".encode("ascii")
