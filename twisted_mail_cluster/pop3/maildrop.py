"""One POP3 session's maildrop: the snapshot taken at login and the session's DELE marks.

There is no maildrop lock (RFC 1939 asks for an exclusive one).  The POP3
view is keyed by TimeUUID message ids, so a snapshot stays meaningful
whatever other sessions - on this node or any other - do meanwhile:

* numbers 1..n are this session's own, fixed at login (view order, oldest
  first), and never shift under the client;
* a message another session removed since the snapshot is simply not found
  when read (RETR answers -ERR) and is skipped by the store at UPDATE, since
  removals are idempotent;
* mail delivered after login appears at the next login, as with a lock.

A lock would have to live in the store and be taken with a lightweight
transaction on Cassandra, which the POP3 path is designed to never use
(DESIGN.md); a lost lock would also lock a user out until it expired.

The class also provides Twisted's ``IMailboxPOP3`` (0-based), so the same
avatar can be served by Twisted's own ``pop3.POP3``: the tests run some
checks against it to show what our server fixes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import IO, overload

from twisted.internet.defer import Deferred
from twisted.mail.pop3 import IMailbox
from zope.interface import implementer

from .._deferred import deferred
from ..mailbox_service import MailboxService
from ..store.interfaces import IMailStore
from ..store.model import Mailbox, MessageInfo, Pop3Entry, Removed


class NoSuchMessage(Exception):
    """The number is outside the snapshot, or names a message this session deleted."""


class MessageGone(Exception):
    """The message was removed by another session after this one's snapshot."""


@implementer(IMailbox)
class Maildrop:
    def __init__(
        self,
        address: str,
        inbox: Mailbox,
        entries: list[Pop3Entry],
        store: IMailStore,
        mailboxes: MailboxService,
    ) -> None:
        self.address = address
        self.inbox = inbox
        self._entries = list(entries)
        self._deleted: set[int] = set()
        self._store = store
        self._mailboxes = mailboxes

    # -- the session's view (numbers are 1-based, as on the wire) ------------

    def entry(self, number: int) -> Pop3Entry:
        """The message a client number names; NoSuchMessage if out of range or deleted."""
        if not 1 <= number <= len(self._entries) or number in self._deleted:
            raise NoSuchMessage(number)
        return self._entries[number - 1]

    def is_deleted(self, number: int) -> bool:
        return number in self._deleted

    def visible(self) -> Iterator[tuple[int, Pop3Entry]]:
        """(number, entry) of every message not marked deleted, numbers unchanged."""
        for index, entry in enumerate(self._entries):
            if index + 1 not in self._deleted:
                yield index + 1, entry

    def stat(self) -> tuple[int, int]:
        """(count, octets) of the messages not marked deleted."""
        count = octets = 0
        for _, entry in self.visible():
            count += 1
            octets += entry.size
        return count, octets

    def delete(self, number: int) -> None:
        self.entry(number)
        self._deleted.add(number)

    def reset(self) -> None:
        self._deleted.clear()

    def marked(self) -> list[uuid.UUID]:
        return [self._entries[number - 1].message_id for number in sorted(self._deleted)]

    @deferred
    async def open(self, number: int) -> tuple[MessageInfo, IO[bytes]]:
        """The message's facts and a file of its content (checked against its SHA-256).

        Fails with MessageGone if another session removed it, and with the
        store's ContentMissing or ContentCorrupted if its content is damaged.
        """
        entry = self.entry(number)
        infos = await self._store.message_info([entry.message_id])
        info = infos.get(entry.message_id)
        if info is None:
            raise MessageGone(number)
        return info, await self._store.open_content(info.blob_id)

    @deferred
    async def commit(self) -> list[Removed]:
        """UPDATE state: remove the marked messages (both views) and tell IMAP sessions."""
        marked = self.marked()
        if not marked:
            return []
        return await self._mailboxes.pop3_remove(self.inbox, marked)

    # -- twisted.mail.pop3.IMailbox (0-based) --------------------------------

    @overload
    def listMessages(self) -> list[int]: ...

    @overload
    def listMessages(self, i: int) -> int: ...

    def listMessages(self, i: int | None = None) -> int | list[int]:
        if i is None:
            return [0 if self.is_deleted(n + 1) else e.size for n, e in enumerate(self._entries)]
        if not 0 <= i < len(self._entries):
            raise ValueError(i)
        return 0 if self.is_deleted(i + 1) else self._entries[i].size

    def getMessage(self, i: int) -> Deferred[IO[bytes]]:
        return self.open(i + 1).addCallback(lambda result: result[1])

    def getUidl(self, i: int) -> bytes:
        if not 0 <= i < len(self._entries):
            raise ValueError(i)
        return str(self._entries[i].message_id).encode("ascii")

    def deleteMessage(self, i: int) -> None:
        self.delete(i + 1)

    def undeleteMessages(self) -> None:
        self.reset()

    def sync(self) -> Deferred[list[Removed]]:
        return self.commit()
