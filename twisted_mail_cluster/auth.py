"""Logins for SMTP AUTH, POP3 and IMAP: one checker, one realm, one guard.

* ``AccountsChecker`` is a twisted.cred checker over the user directory
  (Argon2id hashes, verified in a thread).
* ``MailRealm`` hands each protocol its own avatar for the same user.
* ``LoginGuard`` holds the two policies that protocols apply around a login:
  password logins over an unencrypted connection only from trusted networks,
  and a growing delay after failed logins from the same address.
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, TypeVar

import structlog
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from zope.interface import Interface, implementer

from ._deferred import deferred
from .accounts import Accounts

log = structlog.get_logger(__name__)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
AvatarFactory = Callable[[str], Awaitable[Any]]


@implementer(ICredentialsChecker)
class AccountsChecker:
    """Username/password against the store; the avatar id is the canonical address."""

    credentialInterfaces = (IUsernamePassword,)

    def __init__(self, accounts: Accounts) -> None:
        self._accounts = accounts

    @deferred
    async def requestAvatarId(self, credentials: IUsernamePassword) -> bytes | tuple[()]:
        """Fire with the canonical address in UTF-8 (cred's avatar ids are bytes;
        the empty tuple is cred's anonymous id, which this checker never gives)."""
        try:
            username = _text(credentials.username)
            password = _text(credentials.password)
        except UnicodeDecodeError:
            raise UnauthorizedLogin("credentials are not UTF-8") from None
        user = await self._accounts.authenticate(username, password)
        if user is None:
            raise UnauthorizedLogin("wrong user name or password")
        return user.address.encode("utf-8")


def _text(value: bytes | str) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


@implementer(IRealm)
class MailRealm:
    """One user, one avatar per protocol interface (POP3 maildrop, IMAP account, SMTP sender)."""

    def __init__(self, factories: Mapping[type[Interface], AvatarFactory]) -> None:
        self._factories = dict(factories)

    def requestAvatar(
        self, avatarId: bytes | tuple[()], mind: object, *interfaces: type[Interface]
    ) -> Deferred[tuple[type[Interface], Any, Callable[[], None]]]:
        if not isinstance(avatarId, bytes):
            raise NotImplementedError("anonymous logins have no mailbox")
        address = avatarId.decode("utf-8")
        for interface in interfaces:
            factory = self._factories.get(interface)
            if factory is not None:
                return Deferred.fromCoroutine(self._make(interface, factory, address))
        raise NotImplementedError(f"no avatar for {interfaces!r}")

    @staticmethod
    async def _make(
        interface: type[Interface], factory: AvatarFactory, address: str
    ) -> tuple[type[Interface], Any, Callable[[], None]]:
        avatar = await factory(address)
        logout = getattr(avatar, "logout", None) or (lambda: None)
        return interface, avatar, logout


Avatar = TypeVar("Avatar")


async def login(
    portal: Portal, credentials: ICredentials, interface: type[Interface], avatar_type: type[Avatar]
) -> tuple[Avatar, Callable[[], None]]:
    """Log in through cred; fire with the protocol's avatar and its logout.

    Cred hands avatars out as plain objects.  Each protocol's realm factory
    makes one class of avatar, and this says which once, for every protocol,
    rather than a cast at each login.
    """
    _, avatar, logout = await portal.login(credentials, None, interface)
    if not isinstance(avatar, avatar_type):
        raise TypeError(f"the realm made a {type(avatar).__name__} for {interface.__name__}")
    return avatar, logout


class LoginGuard:
    """Where password logins are allowed, and how long failures are made to wait."""

    #: Remember at most this many addresses; the oldest are forgotten first.
    MAX_TRACKED = 100_000

    def __init__(
        self,
        clock: IReactorTime,
        trusted_networks: Iterable[Network],
        failed_login_delay: float = 2.0,
        max_failed_login_delay: float = 30.0,
        failure_window: float = 300.0,
    ) -> None:
        self._clock = clock
        self._trusted = tuple(trusted_networks)
        self._base = failed_login_delay
        self._max = max_failed_login_delay
        self._window = failure_window
        self._failures: OrderedDict[str, tuple[int, float]] = OrderedDict()

    def plaintext_allowed(self, host: str, encrypted: bool = False) -> bool:
        """Whether a password may cross this connection (TLS, or a trusted network)."""
        if encrypted:
            return True
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            address = address.ipv4_mapped
        return any(address in network for network in self._trusted)

    def failed(self, host: str) -> float:
        """Record a failure from ``host``; return the delay before answering it.

        The delay doubles with each failure inside the window, up to the
        maximum, so a password guesser slows down while a user who mistyped
        once barely notices.
        """
        now = self._clock.seconds()
        host = _client_key(host)
        count, last = self._failures.pop(host, (0, now))
        if now - last > self._window:
            count = 0
        count += 1
        self._failures[host] = (count, now)
        while len(self._failures) > self.MAX_TRACKED:
            self._failures.popitem(last=False)
        delay = min(self._base * (2 ** (count - 1)), self._max)
        log.info("login.throttled", remote=host, failures=count, delay=delay)
        return delay

    def succeeded(self, host: str) -> None:
        self._failures.pop(_client_key(host), None)

    def failures(self, host: str) -> int:
        count, last = self._failures.get(_client_key(host), (0, 0.0))
        return count if self._clock.seconds() - last <= self._window else 0


def _client_key(host: str) -> str:
    """Whom failures are counted against: an IPv4 address, or an IPv6 /64.

    One IPv6 host usually owns a whole /64 and can pick a new address for
    every attempt, so counting per address would let it dodge the delay.
    """
    try:
        address = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
