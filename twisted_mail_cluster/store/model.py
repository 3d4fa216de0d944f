"""Plain values that cross the store contract.

They are frozen dataclasses so that a session can keep them in its own state
without another coroutine changing them under it, and so that both backends
return exactly the same shapes to the protocols.
"""

from __future__ import annotations

import enum
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

SEEN = "\\Seen"
ANSWERED = "\\Answered"
FLAGGED = "\\Flagged"
DELETED = "\\Deleted"
DRAFT = "\\Draft"

#: System flags a client may store (RFC 3501 2.3.2); ``\Recent`` is per session
#: and never stored.
SYSTEM_FLAGS: tuple[str, ...] = (ANSWERED, FLAGGED, DELETED, SEEN, DRAFT)
_CANONICAL = {flag.lower(): flag for flag in SYSTEM_FLAGS}

#: SPECIAL-USE attributes (RFC 6154) of the mailboxes every new user gets.
DEFAULT_MAILBOXES: tuple[tuple[str, str | None], ...] = (
    ("INBOX", None),
    ("Sent", "\\Sent"),
    ("Drafts", "\\Drafts"),
    ("Trash", "\\Trash"),
    ("Junk", "\\Junk"),
)

#: The hierarchy delimiter of every mailbox name (as Dovecot's default).
HIERARCHY_DELIMITER = "/"


def canonical_flag(flag: str) -> str:
    """System flags compare case-insensitively, so store them in one spelling.

    Keywords keep the spelling the client first used; IMAP compares them
    case-insensitively too (see ``flag_key``).
    """
    return _CANONICAL.get(flag.lower(), flag)


def flag_key(flag: str) -> str:
    """The comparison key of a flag or keyword (RFC 3501: case-insensitive)."""
    return flag.lower()


def normalise_flags(flags: Iterable[str]) -> frozenset[str]:
    """Canonical system flags, keywords deduplicated case-insensitively."""
    seen: dict[str, str] = {}
    for flag in flags:
        canonical = canonical_flag(flag)
        seen.setdefault(flag_key(canonical), canonical)
    return frozenset(seen.values())


class FlagMode(enum.Enum):
    """How STORE combines the given flags with the stored ones."""

    REPLACE = "="
    ADD = "+"
    REMOVE = "-"

    def apply(self, current: frozenset[str], given: frozenset[str]) -> frozenset[str]:
        """Linear in the flags at hand (a STORE runs it once per message)."""
        if self is FlagMode.REPLACE:
            return given
        if self is FlagMode.ADD:
            return normalise_flags([*current, *given])
        given_keys = {flag_key(f) for f in given}
        return frozenset(f for f in current if flag_key(f) not in given_keys)


@dataclass(frozen=True)
class User:
    address: str
    password_hash: str


@dataclass(frozen=True)
class Mailbox:
    id: uuid.UUID
    owner: str
    name: str
    uidvalidity: int
    special_use: str | None = None


@dataclass(frozen=True)
class ImapEntry:
    """One message as the IMAP view knows it."""

    uid: int
    message_id: uuid.UUID
    flags: frozenset[str]
    modseq: int


@dataclass(frozen=True)
class MailboxSnapshot:
    """What SELECT loads: the whole UID map plus the counters (RFC 3501 6.3.1)."""

    mailbox: Mailbox
    uidnext: int
    highest_modseq: int
    entries: tuple[ImapEntry, ...]


@dataclass(frozen=True)
class ImapChanges:
    """What changed in a mailbox after a known MODSEQ.

    ``changed`` holds messages added or re-flagged after ``since``; ``expunged``
    the UIDs removed after it.  A session applies these to catch up with other
    sessions and other nodes, whether or not an event reached it.
    """

    uidnext: int
    highest_modseq: int
    changed: tuple[ImapEntry, ...]
    expunged: tuple[int, ...]


@dataclass(frozen=True)
class MailboxStatus:
    """The STATUS items (RFC 3501 6.3.10, RFC 7162 HIGHESTMODSEQ)."""

    messages: int
    recent: int
    uidnext: int
    uidvalidity: int
    unseen: int
    highest_modseq: int
    size: int = 0


@dataclass(frozen=True)
class MessageInfo:
    """Per-message facts FETCH and RETR need, without the content."""

    message_id: uuid.UUID
    blob_id: str
    size: int
    internal_date: float
    structure: str  # MessageStructure as JSON, computed once at delivery


@dataclass(frozen=True)
class Pop3Entry:
    message_id: uuid.UUID
    size: int


@dataclass(frozen=True)
class DeliveryTarget:
    mailbox_id: uuid.UUID
    flags: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Delivered:
    """One copy of a delivered (or appended, copied) message."""

    mailbox_id: uuid.UUID
    message_id: uuid.UUID
    uid: int | None
    modseq: int | None
    flags: frozenset[str] = field(default_factory=frozenset)


@dataclass(frozen=True)
class Removed:
    """One message taken out of a mailbox (both views)."""

    mailbox_id: uuid.UUID
    message_id: uuid.UUID
    uid: int | None
    modseq: int | None


@dataclass(frozen=True)
class Copied:
    source_uid: int
    delivered: Delivered


@dataclass(frozen=True)
class StoreResult:
    """STORE's outcome: rows that changed, and UIDs refused by UNCHANGEDSINCE."""

    updated: tuple[ImapEntry, ...]
    modified: tuple[int, ...] = ()
