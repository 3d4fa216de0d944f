"""Logins for SMTP AUTH, POP3 and IMAP: one checker, one realm, one way in.

* ``AccountsChecker`` is a twisted.cred checker over the user directory
  (Argon2id hashes, checked by accounts.Verifier, with its cache).
* ``MailRealm`` hands each protocol its own avatar for the same user.
* ``guarded_login`` is how every protocol logs a user in: the LoginGuard
  (login_guard.py) admits the attempt *before* any password is looked at,
  then cred checks it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

import structlog
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import IUsernamePassword
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.credentials import ICredentials
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from zope.interface import Interface, implementer

from ._deferred import deferred
from .accounts import Accounts
from .login_guard import LoginGuard

log = structlog.get_logger(__name__)

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


class WrongPassword(UnauthorizedLogin):
    """The password was checked and is wrong (or the user unknown); the failure is counted.

    ``delay``: how long the protocol makes the answer wait (the guard holds the
    address that long too).
    """

    def __init__(self, delay: float) -> None:
        super().__init__("wrong user name or password")
        self.delay = delay


async def guarded_login(
    guard: LoginGuard, host: str, portal: Portal, credentials: IUsernamePassword,
    interface: type[Interface], avatar_type: type[Avatar],
) -> tuple[Avatar, Callable[[], None]]:
    """Log in as :func:`login` does, once the guard admitted it.

    Raises LoginThrottled before anything is checked (answer it with the
    protocol's temporary failure), WrongPassword after a check that failed.
    The outcome is recorded before the check's slot is given back, so that a
    login waiting for the slot sees the failure and is refused unchecked.
    """
    ticket = await guard.admit(host, credentials.username)
    try:
        try:
            result = await login(portal, credentials, interface, avatar_type)
        except UnauthorizedLogin:
            raise WrongPassword(guard.failed(host, credentials.username)) from None
        guard.succeeded(host, credentials.username)
        return result
    finally:
        ticket.release()
