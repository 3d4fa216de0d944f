"""The one place where mailbox changes are made: store first, then the event.

Protocols read from the store directly, but every change goes through here,
so that each one is followed by its event on the bus (DESIGN.md, "Flows")
and so that hierarchy rules (parents on CREATE, children on RENAME and
DELETE, the INBOX rename) are the same for IMAP, POP3, SMTP and the admin
tools whichever backend is underneath.

A failing bus never fails a change: the change is stored, and sessions that
missed the event catch up from the store at their next command.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone

import structlog
from twisted.internet.threads import deferToThread

from . import mime
from ._deferred import deferred
from .events.interfaces import IEventBus
from .events.model import (
    Added,
    Event,
    Expunged,
    FlagsUpdated,
    MailboxAdded,
    MailboxDeleted,
    MailboxRenamed,
)
from .names import INBOX, check_mailbox_name, is_inferior, parents
from .store.errors import AlreadyExists, InvalidName, NotFound
from .store.interfaces import IMailStore
from .store.model import (
    Copied,
    Delivered,
    DeliveryTarget,
    FlagMode,
    Mailbox,
    Removed,
    StoreResult,
)

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class PreparedMessage:
    """A message ready to store: CRLF line endings and its structure computed once."""

    content: bytes
    structure: str

    @property
    def size(self) -> int:
        return len(self.content)


def prepare_message_sync(raw: bytes) -> PreparedMessage:
    """Blocking (parses the whole message): run it in a thread."""
    content = mime.normalise_line_endings(raw)
    return PreparedMessage(content, mime.analyse(content).to_json())


class MailboxService:
    """Changes to mailboxes and messages, each followed by its event."""

    def __init__(self, store: IMailStore, bus: IEventBus) -> None:
        self.store = store
        self.bus = bus

    # -- messages -------------------------------------------------------------

    @deferred
    async def prepare(self, raw: bytes) -> PreparedMessage:
        return await deferToThread(prepare_message_sync, raw)

    @deferred
    async def deliver(
        self,
        message: PreparedMessage,
        targets: Sequence[tuple[Mailbox, frozenset[str]]],
        internal_date: datetime | None = None,
    ) -> list[Delivered]:
        """Store one message for several mailboxes at once (content written once)."""
        when = internal_date or datetime.now(timezone.utc)
        delivered = await self.store.deliver(
            message.content,
            message.structure,
            [DeliveryTarget(box.id, flags) for box, flags in targets],
            when,
        )
        owners = {box.id: box.owner for box, _ in targets}
        for copy in delivered:
            await self._publish(
                Added(
                    copy.mailbox_id, owners[copy.mailbox_id],
                    uids=(copy.uid,) if copy.uid is not None else (),
                    message_ids=(copy.message_id,), modseq=copy.modseq or 0,
                )
            )
        return delivered

    @deferred
    async def store_flags(
        self,
        mailbox: Mailbox,
        uids: Sequence[int],
        mode: FlagMode,
        flags: Iterable[str],
        unchanged_since: int | None = None,
    ) -> StoreResult:
        result = await self.store.imap_store(mailbox.id, uids, mode, flags, unchanged_since)
        if result.updated:
            await self._publish(
                FlagsUpdated(
                    mailbox.id, mailbox.owner,
                    updates=tuple(
                        (e.uid, tuple(sorted(e.flags)), e.modseq) for e in result.updated
                    ),
                )
            )
        return result

    @deferred
    async def expunge(self, mailbox: Mailbox, uids: Sequence[int] | None = None) -> list[Removed]:
        removed = await self.store.imap_expunge(mailbox.id, uids)
        await self._publish_removed(mailbox, removed)
        return removed

    @deferred
    async def pop3_remove(self, mailbox: Mailbox, message_ids: Iterable[uuid.UUID]) -> list[Removed]:
        removed = await self.store.pop3_remove(mailbox.id, list(message_ids))
        await self._publish_removed(mailbox, removed)
        return removed

    @deferred
    async def copy(self, source: Mailbox, uids: Sequence[int], target: Mailbox) -> list[Copied]:
        copied = await self.store.imap_copy(source.id, uids, target.id)
        await self._publish_copied(target, copied)
        return copied

    @deferred
    async def move(
        self, source: Mailbox, uids: Sequence[int], target: Mailbox
    ) -> tuple[list[Copied], list[Removed]]:
        copied, removed = await self.store.imap_move(source.id, uids, target.id)
        await self._publish_copied(target, copied)
        await self._publish_removed(source, removed)
        return copied, removed

    async def _publish_copied(self, target: Mailbox, copied: Sequence[Copied]) -> None:
        if copied:
            await self._publish(
                Added(
                    target.id, target.owner,
                    uids=tuple(c.delivered.uid for c in copied if c.delivered.uid is not None),
                    message_ids=tuple(c.delivered.message_id for c in copied),
                    modseq=max(c.delivered.modseq or 0 for c in copied),
                )
            )

    async def _publish_removed(self, mailbox: Mailbox, removed: Sequence[Removed]) -> None:
        if removed:
            await self._publish(
                Expunged(
                    mailbox.id, mailbox.owner,
                    uids=tuple(r.uid for r in removed if r.uid is not None),
                    message_ids=tuple(r.message_id for r in removed),
                    modseq=max(r.modseq or 0 for r in removed),
                )
            )

    # -- mailboxes --------------------------------------------------------------

    @deferred
    async def create_mailbox(
        self, owner: str, name: str, special_use: str | None = None
    ) -> Mailbox:
        """Create a mailbox and any missing superiors (RFC 3501 6.3.3 SHOULD)."""
        name = check_mailbox_name(name)
        for parent in parents(name):
            if await self.store.get_mailbox(owner, parent) is None:
                try:
                    await self._create_one(owner, parent, None)
                except AlreadyExists:
                    pass  # another session made it meanwhile: what we wanted
        return await self._create_one(owner, name, special_use)

    async def _create_one(self, owner: str, name: str, special_use: str | None) -> Mailbox:
        mailbox = await self.store.create_mailbox(owner, name, special_use)
        await self._publish(MailboxAdded(mailbox.id, owner, name=name))
        return mailbox

    @deferred
    async def ensure_mailbox(self, owner: str, name: str, special_use: str | None = None) -> Mailbox:
        """The mailbox, created if missing (INBOX must always exist for delivery)."""
        mailbox = await self.store.get_mailbox(owner, name)
        if mailbox is not None:
            return mailbox
        try:
            return await self._create_one(owner, name, special_use)
        except AlreadyExists:
            mailbox = await self.store.get_mailbox(owner, name)
            if mailbox is None:
                raise
            return mailbox

    @deferred
    async def delete_mailbox(self, owner: str, name: str) -> Mailbox:
        """Delete a mailbox with its messages.

        As Dovecot does, a mailbox with inferiors is refused rather than
        turned into a \\Noselect placeholder, and INBOX can never be deleted.
        """
        name = check_mailbox_name(name)
        if name == INBOX:
            raise InvalidName("INBOX cannot be deleted")
        mailbox = await self.store.get_mailbox(owner, name)
        if mailbox is None:
            raise NotFound(f"no mailbox {name}")
        if any(is_inferior(m.name, name) for m in await self.store.list_mailboxes(owner)):
            raise InvalidName(f"{name} has inferior mailboxes: delete them first")
        removed = await self.store.delete_mailbox(mailbox.id)
        await self._publish_removed(mailbox, removed)
        await self._publish(MailboxDeleted(mailbox.id, owner, name=name))
        return mailbox

    @deferred
    async def rename_mailbox(self, owner: str, old: str, new: str) -> list[Mailbox]:
        """Rename a mailbox and its inferiors (RFC 3501 6.3.5).

        Renaming INBOX moves its messages to a new mailbox and leaves INBOX
        empty; its inferiors stay where they are.
        """
        old, new = check_mailbox_name(old), check_mailbox_name(new)
        # INBOX may even move below itself (INBOX/old): RFC 3501 6.3.5 makes
        # its rename a move of its messages, not of the mailbox.
        if new == INBOX or new == old or (is_inferior(new, old) and old != INBOX):
            raise InvalidName(f"cannot rename {old} to {new}")
        if await self.store.get_mailbox(owner, new) is not None:
            raise AlreadyExists(f"mailbox {new} already exists")
        source = await self.store.get_mailbox(owner, old)
        if source is None:
            raise NotFound(f"no mailbox {old}")
        if old == INBOX:
            return [await self._rename_inbox(source, new)]
        boxes = await self.store.list_mailboxes(owner)
        moving = [source, *(m for m in boxes if is_inferior(m.name, old))]
        # All or nothing: check every new name before renaming anything, so
        # that a taken inferior name cannot leave the hierarchy half-renamed.
        taken = {m.name for m in boxes}
        for mailbox in moving:
            if new + mailbox.name[len(old):] in taken:
                raise AlreadyExists(f"mailbox {new + mailbox.name[len(old):]} already exists")
        for parent in parents(new):
            if await self.store.get_mailbox(owner, parent) is None:
                await self._create_one(owner, parent, None)
        renamed = []
        for mailbox in moving:
            new_name = new + mailbox.name[len(old):]
            result = await self.store.rename_mailbox(mailbox.id, new_name)
            await self._publish(
                MailboxRenamed(mailbox.id, owner, old_name=mailbox.name, new_name=new_name)
            )
            renamed.append(result)
        return renamed

    async def _rename_inbox(self, inbox: Mailbox, new: str) -> Mailbox:
        target = await self.create_mailbox(inbox.owner, new)
        snapshot = await self.store.imap_snapshot(inbox.id)
        if snapshot.entries:
            await self.move(inbox, [e.uid for e in snapshot.entries], target)
        return target

    # -- events -------------------------------------------------------------------

    async def _publish(self, event: Event) -> None:
        try:
            await self.bus.dispatch(event)
        except Exception as e:  # the store holds the truth; the bus only hurries sessions
            log.warning("event.dispatch_failed", event_type=event.kind, error=str(e))
