"""Everything one node's protocols share: config, store, bus, accounts, login policy.

A node keeps per-connection state only; anything another node must see goes
to the store or the bus (DESIGN.md).  ``Node`` is the bag the protocol
factories are built from, so that a test can assemble one around a
temporary store without twistd.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from twisted.cred.portal import Portal

from .accounts import Accounts
from .auth import AccountsChecker, AvatarFactory, MailRealm
from .login_guard import LoginGuard
from .config import Config
from .connection_limits import ConnectionLimits
from .events.interfaces import IEventBus
from .mailbox_service import MailboxService
from .store.interfaces import IMailStore
from .tls.server import ServerTLS
from .verifier import Verifier
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
    #: Connection counts per protocol ("smtp", "pop3", "imap"), for every listener of it.
    connections: Mapping[str, ConnectionLimits] = field(default_factory=dict)

    def portal(self, interface: type, factory: AvatarFactory) -> Portal:
        """A cred portal whose realm makes one protocol's avatar for a logged-in address."""
        return Portal(MailRealm({interface: factory}), [AccountsChecker(self.accounts)])


def build_node(
    config: Config, store: IMailStore, bus: IEventBus, reactor: INodeReactor, tls: ServerTLS | None = None
) -> Node:
    mailboxes = MailboxService(store, bus)
    auth = config.auth
    guard = LoginGuard(
        reactor, auth.trusted_networks, auth.failed_login_delay, auth.max_failed_login_delay,
        auth.failure_window, auth.max_checks_per_address, auth.max_checks,
    )
    verifier = Verifier(reactor, threads=auth.hash_threads, cache_ttl=auth.cache_ttl)
    connections = {
        "smtp": ConnectionLimits(config.smtp.max_connections_per_address, config.smtp.max_connections),
        "pop3": ConnectionLimits(config.pop3.max_connections_per_address, config.pop3.max_connections),
        "imap": ConnectionLimits(
            config.imap.max_connections_per_address, config.imap.max_connections, config.imap.max_userip_connections
        ),
    }
    return Node(config, store, bus, mailboxes, Accounts(mailboxes, verifier), guard, reactor, tls, connections)
