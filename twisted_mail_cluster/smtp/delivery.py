"""Who may receive mail here, and storing one message for all of its recipients.

Kept apart from the protocol so that the rules (local domains only, unknown
users refused at RCPT, one stored copy per message) read in one place and do
not depend on how the SMTP conversation got there.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from twisted.internet.defer import FirstError, gatherResults

from .._deferred import deferred
from ..node import Node
from ..store.model import Delivered, Mailbox


class Recipient(enum.Enum):
    LOCAL = "local user"
    UNKNOWN_USER = "unknown user"
    NOT_LOCAL = "not a local domain"


def domain_of(address: str) -> str:
    return address.rpartition("@")[2]


class LocalDelivery:
    """Final delivery into the node's store: the only kind of delivery there is for now."""

    def __init__(self, node: Node) -> None:
        self._node = node

    @deferred
    async def classify(self, address: str) -> tuple[Recipient, str]:
        """Where ``address`` (already normalised) stands, and the mailbox owner it means.

        The domain is asked first so that a relay attempt never costs a user
        lookup, and so that the answer for a foreign domain does not depend
        on whether a user of that name happens to exist.  Postmaster (RFC
        5321 4.5.1) is a user where one exists, else ``smtp.postmaster``.
        """
        local_part, _, domain = address.rpartition("@")
        domain = domain.rstrip(".")
        store = self._node.store
        is_postmaster = local_part == "postmaster"
        if is_postmaster and domain == self._node.config.hostname.lower():
            domain_is_local = True  # "RCPT TO:<Postmaster>": Twisted adds our host name
        else:
            domain_is_local = bool(domain) and await store.domain_exists(domain)
        if not domain_is_local:
            return Recipient.NOT_LOCAL, address
        owner = f"{local_part}@{domain}"
        if await store.get_user(owner) is not None:
            return Recipient.LOCAL, owner
        fallback = self._node.config.smtp.postmaster
        if is_postmaster and fallback is not None and await store.get_user(fallback) is not None:
            return Recipient.LOCAL, fallback
        return Recipient.UNKNOWN_USER, address

    @deferred
    async def deliver(self, content: bytes, recipients: Sequence[str]) -> list[Delivered]:
        """Store ``content`` once, in every recipient's INBOX, in one store call.

        When this fires the message is durable for every recipient; when it
        fails, the store guarantees nobody sees any part of it.
        """
        prepared = await self._node.mailboxes.prepare(content)
        inboxes = await self._inboxes(recipients)
        return await self._node.mailboxes.deliver(
            prepared, [(inbox, frozenset()) for inbox in inboxes]
        )

    async def _inboxes(self, recipients: Sequence[str]) -> list[Mailbox]:
        """All INBOXes at once: one round trip of latency, not one per recipient."""
        try:
            return await gatherResults(
                [self._node.accounts.inbox(address) for address in recipients],
                consumeErrors=True,
            )
        except FirstError as e:
            e.subFailure.raiseException()
            raise  # not reached: raiseException always raises
