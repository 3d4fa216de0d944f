"""SASL PLAIN (RFC 4616) as POP3 carries it (RFC 5034).

Twisted's POP3 ``AUTH`` (twisted/mail/pop3.py:678-740) expects one line of
``"user response"`` - the CRAM-MD5 shape - so PLAIN cannot be offered
through it; the server handles AUTH itself and uses this decoder.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass


class SaslError(ValueError):
    """The client's response is not a well-formed PLAIN message."""


@dataclass(frozen=True)
class PlainCredentials:
    authzid: bytes
    authcid: bytes
    password: bytes


def decode_plain(response: bytes) -> PlainCredentials:
    """Decode ``base64(authzid NUL authcid NUL passwd)``; ``=`` is an empty response."""
    if response == b"=":
        raise SaslError("empty response")
    try:
        message = base64.b64decode(response, validate=True)
    except (binascii.Error, ValueError):
        raise SaslError("invalid base64") from None
    parts = message.split(b"\0")
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise SaslError("not authzid NUL authcid NUL passwd")
    return PlainCredentials(*parts)
