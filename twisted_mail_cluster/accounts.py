"""Domains, users and passwords: what ``mailcluster-admin`` and logins share.

Password hashing runs in a thread and checking on the Verifier's own pool,
with its cache of passwords found right a few minutes ago (verifier.py):
Argon2id is slow on purpose.
Provisioning a user creates the default mailboxes with their SPECIAL-USE
attributes; INBOX is also created on demand at login and delivery, so a
user whose provisioning was interrupted still works.
"""

from __future__ import annotations

import structlog
from twisted.internet.threads import deferToThread

from ._deferred import deferred
from .mailbox_service import MailboxService
from .names import INBOX, check_address, check_domain, normalise_address
from .passwords import hash_password
from .store.errors import AlreadyExists
from .store.model import DEFAULT_MAILBOXES, Mailbox, User
from .twisted_types import installed_reactor
from .verifier import Verifier

log = structlog.get_logger(__name__)


class Accounts:
    def __init__(self, mailboxes: MailboxService, verifier: Verifier | None = None) -> None:
        self.mailboxes = mailboxes
        self.store = mailboxes.store
        self.verifier = verifier if verifier is not None else Verifier(installed_reactor())

    @deferred
    async def add_domain(self, name: str) -> str:
        name = check_domain(name)
        await self.store.add_domain(name)
        log.info("domain.added", domain=name)
        return name

    @deferred
    async def remove_domain(self, name: str) -> None:
        await self.store.remove_domain(check_domain(name))
        log.info("domain.removed", domain=name)

    @deferred
    async def add_user(self, address: str, password: str) -> User:
        address = check_address(address)
        encoded = await deferToThread(hash_password, password)
        user = await self.store.add_user(address, encoded)
        await self.provision(address)
        log.info("user.added", user=address)
        return user

    @deferred
    async def provision(self, address: str) -> None:
        """Create whichever default mailboxes are missing (idempotent)."""
        existing = {m.name for m in await self.store.list_mailboxes(address)}
        for name, special_use in DEFAULT_MAILBOXES:
            if name not in existing:
                try:
                    await self.mailboxes.create_mailbox(address, name, special_use)
                except AlreadyExists:
                    pass
            await self.store.subscribe(address, name)

    @deferred
    async def remove_user(self, address: str) -> None:
        address = normalise_address(address)
        await self.store.remove_user(address)
        log.info("user.removed", user=address)

    @deferred
    async def set_password(self, address: str, password: str) -> None:
        address = normalise_address(address)
        encoded = await deferToThread(hash_password, password)
        await self.store.set_password_hash(address, encoded)
        log.info("user.password_changed", user=address)

    @deferred
    async def authenticate(self, address: str, password: str) -> User | None:
        """The user if the password is right, else None (same cost either way, cache aside).

        The stored hash is read at every login, also when the cache knows the
        password: a password changed or a user removed elsewhere counts at once.
        """
        canonical = normalise_address(address)
        user = await self.store.get_user(canonical)
        ok = await self.verifier.verify(canonical, user.password_hash if user else None, password)
        return user if ok and user is not None else None

    @deferred
    async def inbox(self, address: str) -> Mailbox:
        return await self.mailboxes.ensure_mailbox(address, INBOX)
