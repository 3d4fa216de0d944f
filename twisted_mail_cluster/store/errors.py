"""Errors of the store contract, shared by every backend.

Protocol code maps these to replies, so the split that matters is between
*permanent* problems (the request itself is wrong: no such mailbox, already
exists) and *temporary* ones (the database is slow or away: try again later,
SMTP 451, POP3 ``-ERR [SYS/TEMP]``, IMAP ``NO [UNAVAILABLE]``).
"""

from __future__ import annotations


class StoreError(Exception):
    """Base class of everything the store raises on purpose."""


class NotFound(StoreError):
    """The domain, user, mailbox or message named does not exist."""


class AlreadyExists(StoreError):
    """Creating something whose name is taken."""


class NotEmpty(StoreError):
    """Removing a domain that still has users."""


class InvalidName(StoreError):
    """A mailbox or address that the store refuses to hold."""


class TemporaryFailure(StoreError):
    """The backend could not answer now; the same request may succeed later."""


class ContentCorrupted(StoreError):
    """Stored content no longer matches its SHA-256 address.

    Never answered with the damaged bytes: the caller replies with an error
    and the event is logged for the operator.
    """


class ContentMissing(StoreError):
    """Metadata points at content that is not (or no longer) stored."""
