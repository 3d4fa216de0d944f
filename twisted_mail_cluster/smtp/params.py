"""MAIL FROM and RCPT TO parameters (RFC 5321 4.1.2 ``esmtp-param``).

Twisted's regular expressions capture the parameters and then drop them
(``smtp.py`` ``do_MAIL``), so ``SIZE=999999999`` was accepted and the limit
only hit after the whole message had been sent.  Here each parameter is
checked against what EHLO advertised, and anything else is refused, as RFC
5321 4.1.1.11 says (555).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .replies import Reply

_PARAM = re.compile(rb"^([A-Za-z0-9][A-Za-z0-9-]*)(?:=([\x21-\x3c\x3e-\x7e]+))?$")
_DIGITS = re.compile(rb"^[0-9]{1,20}$")
_BODY_TYPES = (b"7BIT", b"8BITMIME")


class ParameterError(Exception):
    """A parameter the transaction cannot go on with; carries the reply to send."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply.text)
        self.reply = reply


@dataclass(frozen=True)
class MailParameters:
    size: int | None = None
    body: bytes = b"7BIT"


def parse_mail_parameters(text: bytes | None, max_size: int) -> MailParameters:
    """The parameters of MAIL FROM, or ParameterError.

    ``AUTH=`` (RFC 4954 5) is accepted and ignored: a server that offers AUTH
    must accept it, and the identity it names only matters for relaying,
    which this server never does.
    """
    size: int | None = None
    body = b"7BIT"
    seen: set[bytes] = set()
    for param in (text or b"").split():
        match = _PARAM.match(param)
        if match is None:
            raise ParameterError(Reply(501, "5.5.4", "Syntax error in parameters"))
        keyword, value = match.group(1).upper(), match.group(2)
        if keyword in seen:
            raise ParameterError(
                Reply(501, "5.5.4", f"Duplicate parameter {keyword.decode()}")
            )
        seen.add(keyword)
        if keyword == b"SIZE":
            if value is None or not _DIGITS.match(value):
                raise ParameterError(Reply(501, "5.5.4", "Bad SIZE parameter"))
            size = int(value)
            if size > max_size:
                raise ParameterError(
                    Reply(552, "5.3.4", f"Message size exceeds fixed limit of {max_size} bytes")
                )
        elif keyword == b"BODY":
            if value is None or value.upper() not in _BODY_TYPES:
                raise ParameterError(Reply(501, "5.5.4", "Bad BODY parameter"))
            body = value.upper()
        elif keyword == b"AUTH":
            if value is None:
                raise ParameterError(Reply(501, "5.5.4", "Bad AUTH parameter"))
        else:
            raise ParameterError(_unsupported(keyword))
    return MailParameters(size, body)


def check_rcpt_parameters(text: bytes | None) -> None:
    """RCPT TO takes no parameters here (no DSN is advertised): refuse any."""
    for param in (text or b"").split():
        match = _PARAM.match(param)
        if match is None:
            raise ParameterError(Reply(501, "5.5.4", "Syntax error in parameters"))
        raise ParameterError(_unsupported(match.group(1).upper()))


def _unsupported(keyword: bytes) -> Reply:
    return Reply(555, "5.5.4", f"Unsupported option: {keyword.decode('ascii', 'replace')}")
