"""Mailbox names and addresses: one set of rules for every protocol and backend.

Mailbox names are Unicode (IMAP's modified UTF-7 is decoded at the protocol
edge), with ``/`` as the only hierarchy delimiter.  ``INBOX`` is
case-insensitive (RFC 3501 5.1), so it is normalised wherever it starts a
name, including ``inbox/Sub``.
"""

from __future__ import annotations

import re
import unicodedata

from .store.errors import InvalidName
from .store.model import HIERARCHY_DELIMITER

INBOX = "INBOX"
MAX_NAME_LENGTH = 255
MAX_DEPTH = 16
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f%*]")
#: One DNS label (RFC 1123 2.1): letters, digits and inner hyphens, 1-63 long.
_LABEL = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_ADDRESS = re.compile(rf"[^@\s<>()\[\]\\,;:\"]+@{_LABEL}(?:\.{_LABEL})*")


def normalise_mailbox_name(name: str) -> str:
    """Canonical spelling: INBOX upper-cased wherever it is the first component."""
    head, sep, rest = name.partition(HIERARCHY_DELIMITER)
    if head.upper() == INBOX:
        return INBOX + sep + rest
    return name


def check_mailbox_name(name: str) -> str:
    """Return the canonical name, or raise InvalidName saying what is wrong."""
    name = unicodedata.normalize("NFC", name)
    if not name:
        raise InvalidName("the mailbox name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InvalidName(f"the mailbox name is longer than {MAX_NAME_LENGTH} characters")
    if _FORBIDDEN.search(name):
        raise InvalidName("the mailbox name has a control or wildcard character")
    parts = name.split(HIERARCHY_DELIMITER)
    if any(not part for part in parts):
        raise InvalidName("the mailbox name has an empty level")
    if len(parts) > MAX_DEPTH:
        raise InvalidName(f"the mailbox hierarchy is deeper than {MAX_DEPTH} levels")
    return normalise_mailbox_name(name)


def parents(name: str) -> list[str]:
    """The superior names of ``a/b/c``: ``["a", "a/b"]``."""
    parts = name.split(HIERARCHY_DELIMITER)
    return [HIERARCHY_DELIMITER.join(parts[:i]) for i in range(1, len(parts))]


def is_inferior(name: str, of: str) -> bool:
    return name.startswith(of + HIERARCHY_DELIMITER)


def list_pattern(reference: str, pattern: str) -> re.Pattern[str]:
    """The regular expression of a LIST reference + pattern (RFC 3501 6.3.8).

    ``*`` matches anything, ``%`` anything but the delimiter.  INBOX matches
    case-insensitively, the rest of a name case-sensitively.
    """
    full = normalise_mailbox_name(reference + pattern)
    regex = "".join(
        ".*" if ch == "*" else f"[^{re.escape(HIERARCHY_DELIMITER)}]*" if ch == "%" else re.escape(ch)
        for ch in full
    )
    return re.compile(f"^{regex}$", re.DOTALL)


def normalise_address(address: str) -> str:
    """Lower-cased address; addresses compare case-insensitively here, as in Postfix lookups."""
    return address.strip().lower()


def check_address(address: str) -> str:
    """Return the canonical address, or raise InvalidName."""
    address = normalise_address(address)
    if len(address) > 254 or not _ADDRESS.fullmatch(address):
        raise InvalidName(f"{address!r} is not a valid mail address")
    return address


def check_domain(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    if not _ADDRESS.fullmatch("x@" + domain) or len(domain) > 253:
        raise InvalidName(f"{domain!r} is not a valid domain name")
    return domain
