"""The store contract every backend implements (embedded SQLite, Cassandra).

Every method returns a Deferred: no backend may block the reactor thread.
Protocols never import a backend; they get an ``IMailStore`` and only the
values of ``store.model``.  The contract test suite (tests/contract) runs the
same behaviour against every backend.

Two views of a mailbox live behind it (see DESIGN.md):

* the IMAP view: UIDVALIDITY, strictly increasing UIDs and MODSEQs, flags;
* the POP3 view: TimeUUID message ids and sizes, written and removed without
  any coordination between nodes (no lightweight transaction on Cassandra).

Content is written once per delivery and shared by all of its recipients; it
is addressed by its SHA-256 and checked against it whenever it is read.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import IO

from twisted.internet.defer import Deferred
from zope.interface import Attribute, Interface

from .model import (
    Copied,
    Delivered,
    DeliveryTarget,
    FlagMode,
    ImapChanges,
    Mailbox,
    MailboxSnapshot,
    MailboxStatus,
    MessageInfo,
    Pop3Entry,
    Removed,
    StoreResult,
    User,
)


class IDirectory(Interface):
    """Domains and users: who may receive mail and who may log in."""

    def add_domain(name: str) -> Deferred[None]:
        """Add a local domain.  Fails with AlreadyExists."""

    def remove_domain(name: str) -> Deferred[None]:
        """Remove a domain.  Fails with NotFound, or NotEmpty while it has users."""

    def list_domains() -> Deferred[list[str]]:
        """Fire with a sorted list of local domain names."""

    def domain_exists(name: str) -> Deferred[bool]:
        """Fire with whether the domain is local."""

    def add_user(address: str, password_hash: str) -> Deferred[User]:
        """Add a user to an existing domain.

        Fails with NotFound if the domain is not local, AlreadyExists if taken.
        Creating the user's mailboxes is the caller's business, so that both
        backends provision the same way (see accounts.py).
        """

    def remove_user(address: str) -> Deferred[None]:
        """Remove a user with all of their mailboxes and messages."""

    def get_user(address: str) -> Deferred[User | None]:
        """Fire with the User, or None."""

    def list_users(domain: str | None = None) -> Deferred[list[User]]:
        """Fire with the users (of one domain, if given), sorted by address."""

    def set_password_hash(address: str, password_hash: str) -> Deferred[None]:
        """Replace a user's password hash.  Fails with NotFound."""


class IMailboxes(Interface):
    """Mailbox names, hierarchy and subscriptions of one owner."""

    def create_mailbox(owner: str, name: str, special_use: str | None = None) -> Deferred[Mailbox]:
        """Fire with the new Mailbox (fresh UIDVALIDITY).  Fails with AlreadyExists."""

    def get_mailbox(owner: str, name: str) -> Deferred[Mailbox | None]:
        """Fire with the Mailbox, or None."""

    def get_mailbox_by_id(mailbox_id: uuid.UUID) -> Deferred[Mailbox | None]:
        """Fire with the Mailbox, or None."""

    def list_mailboxes(owner: str) -> Deferred[list[Mailbox]]:
        """Fire with all of the owner's mailboxes, sorted by name."""

    def count_mailboxes(owner: str) -> Deferred[int]:
        """Fire with how many mailboxes the owner has (0 for an unknown owner).

        What the per-user mailbox cap is checked against, before every IMAP
        CREATE: cheaper than ``list_mailboxes``, which builds every Mailbox.
        """

    def delete_mailbox(mailbox_id: uuid.UUID) -> Deferred[list[Removed]]:
        """Remove a mailbox and every message in it; fire with the Removed list."""

    def rename_mailbox(mailbox_id: uuid.UUID, new_name: str) -> Deferred[Mailbox]:
        """Rename one mailbox (its id and UIDs stay).  Fails with AlreadyExists.

        Renaming the children of a hierarchy is the caller's loop, so that
        the rule lives in one place for every backend.
        """

    def subscribe(owner: str, name: str) -> Deferred[None]:
        """Add a subscription (the mailbox need not exist, RFC 3501 6.3.6)."""

    def unsubscribe(owner: str, name: str) -> Deferred[None]:
        """Remove a subscription.  Fails with NotFound if there was none."""

    def list_subscriptions(owner: str) -> Deferred[list[str]]:
        """Fire with the subscribed names, sorted."""


class IContent(Interface):
    """Message content, stored once and shared by every copy of a message."""

    def deliver(
        content: bytes, structure: str, targets: Sequence[DeliveryTarget], internal_date: datetime
    ) -> Deferred[list[Delivered]]:
        """Store one message for one or more mailboxes; fire with a Delivered list.

        ``content`` is the whole message (bytes, CRLF line endings),
        ``structure`` its MessageStructure JSON, ``targets`` DeliveryTargets.
        For each target this writes the message metadata and the POP3 view row
        and, where the IMAP view is enabled, allocates the UID and MODSEQ.
        When the Deferred fires, everything is durable; when it fails, no
        reader will ever see a part of it.
        """

    def message_info(message_ids: Iterable[uuid.UUID]) -> Deferred[dict[uuid.UUID, MessageInfo]]:
        """Fire with {message_id: MessageInfo} for the ids that still exist."""

    def open_content(blob_id: str, start: int = 0, end: int | None = None) -> Deferred[IO[bytes]]:
        """Fire with a readable binary file holding bytes [start, end) of a blob.

        Every chunk read is checked against its SHA-256 (ContentCorrupted
        otherwise); small ranges stay in memory, large ones are spooled to a
        temporary file so that no caller holds a large message in memory.
        """

    def collect_garbage() -> Deferred[int]:
        """Remove content no message refers to any more; fire with the count."""


class IImapView(Interface):
    """UID-based view: exact IMAP semantics (RFC 3501, 7162)."""

    imap_enabled = Attribute("Whether deliveries allocate UIDs (always true for embedded).")

    def imap_snapshot(mailbox_id: uuid.UUID) -> Deferred[MailboxSnapshot]:
        """Fire with the MailboxSnapshot SELECT needs."""

    def imap_changes(mailbox_id: uuid.UUID, since_modseq: int) -> Deferred[ImapChanges]:
        """Fire with ImapChanges after ``since_modseq``."""

    def imap_status(mailbox_id: uuid.UUID) -> Deferred[MailboxStatus]:
        """Fire with MailboxStatus."""

    def imap_claim_recent(mailbox_id: uuid.UUID) -> Deferred[int]:
        """Fire with the first UID that is \\Recent for the calling session.

        Messages from that UID on are recent to this session only; later
        sessions see them as not recent (RFC 3501 2.3.2).
        """

    def imap_store(
        mailbox_id: uuid.UUID,
        uids: Sequence[int],
        mode: FlagMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> Deferred[StoreResult]:
        """Change flags of the given UIDs; fire with a StoreResult.

        Only rows whose flags really change get a new MODSEQ.
        """

    def imap_expunge(mailbox_id: uuid.UUID, uids: Sequence[int] | None = None) -> Deferred[list[Removed]]:
        """Remove messages flagged \\Deleted (only among ``uids`` if given).

        Fire with the Removed list, in UID order.
        """

    def imap_copy(
        source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> Deferred[list[Copied]]:
        """Copy messages (content shared); fire with a Copied list in source UID order."""

    def imap_move(
        source_mailbox_id: uuid.UUID, uids: Sequence[int], target_mailbox_id: uuid.UUID
    ) -> Deferred[tuple[list[Copied], list[Removed]]]:
        """Move messages; fire with (Copied list, Removed list).

        A message is never in neither mailbox: backends add before removing.
        """


class IPop3View(Interface):
    """messageId-based view: no coordination, no lightweight transaction."""

    def pop3_list(mailbox_id: uuid.UUID) -> Deferred[list[Pop3Entry]]:
        """Fire with the Pop3Entry list of a mailbox, oldest first."""

    def pop3_remove(mailbox_id: uuid.UUID, message_ids: Iterable[uuid.UUID]) -> Deferred[list[Removed]]:
        """Remove messages from the mailbox (both views); fire with the Removed list.

        Ids that are already gone are skipped: another session may have
        removed them first, and that is not an error for POP3's UPDATE state.
        """


class IMailStore(IDirectory, IMailboxes, IContent, IImapView, IPop3View):
    """Everything a node needs from its storage."""

    def start() -> Deferred[None]:
        """Open connections and create or migrate the schema; fire when ready."""

    def close() -> Deferred[None]:
        """Release connections and threads; fire when done."""
