"""SASL PLAIN (RFC 4616) and LOGIN for SMTP AUTH (RFC 4954).

Twisted's own ``PLAINCredentials``/``LOGINCredentials`` (``twisted/mail/_cred.py``)
are not used, because:

* its LOGIN prompts are ``b"User Name\\0"``/``b"Password\\0"`` (with a NUL),
  where every other server sends ``Username:``/``Password:``, and its list of
  prompts must be popped by hand to accept an initial response;
* its PLAIN ignores the authorization identity, so ``bob\\0alice\\0pw`` would
  log in as alice while claiming to act as bob.  We have no proxy
  authorization, so an authorization identity other than the login name is
  refused (``authzid_mismatch``).

Both are ``IUsernamePassword`` credentials, so they go straight to the cred
portal and its ``AccountsChecker``.
"""

from __future__ import annotations

from collections.abc import Callable

from twisted.cred.credentials import IUsernamePassword, UsernamePassword
from twisted.mail._except import IllegalClientResponse
from twisted.mail.interfaces import IChallengeResponse
from zope.interface import implementer

from ..names import normalise_address


class Mechanism(UsernamePassword):
    """A credentials object that also runs its side of the SASL exchange."""

    def __init__(self) -> None:
        super().__init__(b"", b"")

    def getChallenge(self) -> bytes:
        """The next prompt to send (334)."""
        raise NotImplementedError

    def setResponse(self, response: bytes) -> None:
        """Take the client's decoded answer; IllegalClientResponse if unusable."""
        raise NotImplementedError

    def moreChallenges(self) -> bool:
        """Whether the client must answer another prompt before the login is checked."""
        raise NotImplementedError

    @property
    def authzid_mismatch(self) -> bool:
        """Whether the client asked to act as someone other than who logs in."""
        return False


@implementer(IChallengeResponse, IUsernamePassword)
class Plain(Mechanism):
    """``authzid NUL authcid NUL passwd`` in one response."""

    def __init__(self) -> None:
        super().__init__()
        self.authzid = b""
        self._answered = False

    def getChallenge(self) -> bytes:
        return b""

    def setResponse(self, response: bytes) -> None:
        parts = response.split(b"\0")
        if len(parts) != 3 or not parts[1]:
            raise IllegalClientResponse("PLAIN needs authzid NUL authcid NUL password")
        self.authzid, self.username, self.password = parts
        self._answered = True

    def moreChallenges(self) -> bool:
        return not self._answered

    @property
    def authzid_mismatch(self) -> bool:
        if not self.authzid:
            return False
        try:
            return normalise_address(self.authzid.decode()) != normalise_address(
                self.username.decode()
            )
        except UnicodeDecodeError:
            return True


@implementer(IChallengeResponse, IUsernamePassword)
class Login(Mechanism):
    """The de-facto LOGIN mechanism: user name, then password, each prompted.

    An initial response on the AUTH line (``AUTH LOGIN <base64 user>``, as
    Outlook and others send) answers the first prompt, so the exchange goes
    on with the password prompt.
    """

    PROMPTS = (b"Username:", b"Password:")

    def __init__(self) -> None:
        super().__init__()
        self._step = 0

    def getChallenge(self) -> bytes:
        return self.PROMPTS[self._step]

    def setResponse(self, response: bytes) -> None:
        if self._step == 0:
            if not response:
                raise IllegalClientResponse("empty user name")
            self.username = response
        elif self._step == 1:
            self.password = response
        else:
            raise IllegalClientResponse("LOGIN takes two responses")
        self._step += 1

    def moreChallenges(self) -> bool:
        return self._step < len(self.PROMPTS)


#: What EHLO advertises after ``AUTH``, in this order.
MECHANISMS: dict[bytes, Callable[[], Mechanism]] = {b"PLAIN": Plain, b"LOGIN": Login}
