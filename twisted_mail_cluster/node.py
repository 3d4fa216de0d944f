"""Everything one node's protocols share: config, store, bus, accounts, login policy.

A node keeps per-connection state only; anything another node must see goes
to the store or the bus (DESIGN.md).  ``Node`` is the bag the protocol
factories are built from, so that a test can assemble one around a
temporary store without twistd.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.portal import Portal

from .accounts import Accounts
from .auth import AccountsChecker, AvatarFactory, LoginGuard, MailRealm
from .config import Config
from .events.interfaces import IEventBus
from .mailbox_service import MailboxService
from .store.interfaces import IMailStore
from .tls.server import ServerTLS
from .twisted_types import INodeReactor


@dataclass
class Node:
    config: Config
    store: IMailStore
    bus: IEventBus
    mailboxes: MailboxService
    accounts: Accounts
    guard: LoginGuard
    reactor: INodeReactor
    #: The node's TLS (implicit-TLS listeners, STARTTLS/STLS); None: no TLS at all.
    tls: ServerTLS | None = None

    def portal(self, interface: type, factory: AvatarFactory) -> Portal:
        """A cred portal whose realm makes one protocol's avatar for a logged-in address."""
        return Portal(MailRealm({interface: factory}), [AccountsChecker(self.accounts)])


def build_node(
    config: Config, store: IMailStore, bus: IEventBus, reactor: INodeReactor, tls: ServerTLS | None = None
) -> Node:
    mailboxes = MailboxService(store, bus)
    guard = LoginGuard(
        reactor,
        config.auth.trusted_networks,
        config.auth.failed_login_delay,
        config.auth.max_failed_login_delay,
        config.auth.failure_window,
    )
    return Node(config, store, bus, mailboxes, Accounts(mailboxes), guard, reactor, tls)
