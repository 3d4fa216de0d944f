"""The admin SSH manhole: a Python prompt inside the running server, over SSH.

Whoever gets in can do anything the process can, so the door is narrow:

- SSH only (no telnet) and public keys only (no password checker is
  registered, so the server does not even offer password authentication);
- one user name, the configured one, with the keys of one authorized_keys
  file, read again at each login so a removed key stops working at once;
- bound to 127.0.0.1 by default (reach it through an SSH tunnel);
- a persistent host key, so clients can pin it: ``host_key``, or
  ``<data_dir>/manhole_host_key`` generated (ed25519) on first start with
  mode 0600, next to its ``.pub``.

Unlike ``twistd manhole`` (TWISTED-NOTES section 5), the host keys go into
*instance* attributes of the ``ConchFactory``: its class attributes are
dicts shared by every factory in the process.
"""

from __future__ import annotations

import functools
import os
import stat
from pathlib import Path
from typing import Any

import structlog
from cryptography.hazmat.primitives.asymmetric import ed25519
from twisted.application import strports
from twisted.application.service import Service
from twisted.conch import manhole, manhole_ssh
from twisted.conch.checkers import IAuthorizedKeysDB, SSHPublicKeyChecker, readAuthorizedKeyFile
from twisted.conch.error import ValidPublicKey
from twisted.conch.insults import insults
from twisted.conch.interfaces import IConchUser
from twisted.conch.ssh.keys import BadKeyError, Key
from twisted.cred.checkers import ICredentialsChecker
from twisted.cred.credentials import ISSHPrivateKey
from twisted.cred.error import UnauthorizedLogin
from twisted.cred.portal import IRealm, Portal
from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_mail_cluster.config import ManholeConfig
from twisted_mail_cluster.names import loggable_user

__all__ = [
    "AuthorizedKeysFile",
    "HOST_KEY_NAME",
    "load_or_create_host_key",
    "make_manhole_service",
]

HOST_KEY_NAME = "manhole_host_key"

_log = structlog.get_logger("twisted_mail_cluster.manhole")


def make_manhole_service(config: ManholeConfig, data_dir: Path, namespace: dict[str, Any]) -> Service:
    """The manhole listener, not started; raises ValueError for an unusable setup.

    Each session works on a copy of ``namespace`` (Conch's ``Manhole`` copies
    it): names bound in one session are not seen by the next, but the
    objects in it are the live ones of the node.

    The host key is loaded or created here, while twistd is still setting
    up, so an unwritable data folder stops the server before it starts.
    """
    if config.authorized_keys is None:
        raise ValueError("manhole.authorized_keys is required: the manhole only takes public keys")
    host_key = load_or_create_host_key(config.host_key or data_dir / HOST_KEY_NAME)
    checker = _AuditingChecker(
        SSHPublicKeyChecker(AuthorizedKeysFile(config.authorized_keys, config.username))
    )
    factory = manhole_ssh.ConchFactory(Portal(_ManholeRealm(namespace), [checker]))
    # Twisted annotates these dicts as bytes to bytes, but SSHFactory uses the
    # values as Key objects (ssh/factory.py calls supportedSignatureAlgorithms on them).
    factory.publicKeys = {host_key.sshType(): host_key.public()}
    factory.privateKeys = {host_key.sshType(): host_key}  # type: ignore[dict-item]
    return strports.service(config.listen, factory)


# ---------------------------------------------------------------------------
# Host key


def load_or_create_host_key(path: Path) -> Key:
    """The host key at ``path``; a new ed25519 key saved there (0600) if none exists."""
    if path.exists():
        return _load_host_key(path)
    key = Key(ed25519.Ed25519PrivateKey.generate())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # O_EXCL: never write through a symlink or over a key created meanwhile.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.toString("openssh"))
    path.with_name(path.name + ".pub").write_bytes(key.public().toString("openssh") + b"\n")
    _log.info("manhole host key generated", path=str(path), fingerprint=key.fingerprint())
    return key


def _load_host_key(path: Path) -> Key:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        _log.warning(
            "manhole host key is readable by others; chmod 600 it",
            path=str(path),
            mode=oct(stat.S_IMODE(mode)),
        )
    try:
        key = Key.fromFile(str(path))
    except (BadKeyError, ValueError) as e:
        raise ValueError(f"manhole host key {path}: not a usable private key: {e}") from e
    if key.isPublic():
        raise ValueError(f"manhole host key {path}: is a public key, a private key is needed")
    return key


# ---------------------------------------------------------------------------
# Authentication


@implementer(IAuthorizedKeysDB)
class AuthorizedKeysFile:
    """The keys of one authorized_keys file, for one user name only.

    Read at every login so that revoking a key needs no restart.  Lines with
    OpenSSH options (``from=...``) cannot be parsed and are skipped, which
    refuses that key rather than ignoring its restrictions.
    """

    def __init__(self, path: Path, username: str) -> None:
        self._path = path
        self._username = username.encode("utf-8")

    def getAuthorizedKeys(self, username: bytes) -> list[Key]:
        if username != self._username:
            return []
        try:
            with open(self._path, "rb") as f:
                return list(readAuthorizedKeyFile(f, _parse_public_key))
        except OSError as e:
            _log.error("manhole authorized_keys unreadable", path=str(self._path), error=str(e))
            return []


def _parse_public_key(line: bytes) -> Key:
    """Key.fromString, failing only with BadKeyError, which readAuthorizedKeyFile skips.

    A truncated line raises struct.error or binascii.Error, which would
    otherwise abort reading the file and lock every key out.
    """
    try:
        return Key.fromString(line)
    except BadKeyError:
        raise
    except Exception as e:
        raise BadKeyError(f"unparsable key line: {e}") from e


@implementer(ICredentialsChecker)
class _AuditingChecker:
    """Log who got in with which key, and refused attempts: the manhole is root-equivalent."""

    credentialInterfaces = (ISSHPrivateKey,)

    def __init__(self, checker: SSHPublicKeyChecker) -> None:
        self._checker = checker

    def requestAvatarId(self, credentials: Any) -> Deferred[bytes | tuple[()]]:
        d = self._checker.requestAvatarId(credentials)
        d.addCallbacks(self._granted, self._refused, callbackArgs=(credentials,), errbackArgs=(credentials,))
        return d

    def _granted(self, avatar_id: bytes, credentials: Any) -> bytes:
        _log.info("manhole login", user=_user(credentials), key=_fingerprint(credentials))
        return avatar_id

    def _refused(self, failure: Failure, credentials: Any) -> Failure:
        # ValidPublicKey is the client asking "would this key do?": not a failure yet.
        if not failure.check(ValidPublicKey):
            _log.warning(
                "manhole login refused",
                user=_user(credentials),
                key=_fingerprint(credentials),
                reason=failure.getErrorMessage() if failure.check(UnauthorizedLogin) else repr(failure.value),
            )
        return failure


def _user(credentials: Any) -> str:
    return loggable_user(bytes(credentials.username))


def _fingerprint(credentials: Any) -> str:
    try:
        return str(Key.fromString(credentials.blob).fingerprint())
    except Exception:
        return "unparsable key"


# ---------------------------------------------------------------------------
# Sessions


class _ManholeSession(manhole_ssh.TerminalSession):
    """A terminal session that also copes with clients Conch's own one does not.

    Conch's ``TerminalSession`` needs a pty request before the shell, raises
    NotImplementedError on window changes and on EOF, and closes the channel
    without an exit status (OpenSSH then exits with 255).  This one defaults
    to 80x24, follows window changes, ends the session on EOF like a shell,
    and reports exit status 0 whether the session ends by EOF or by Ctrl-D at
    the prompt - so ``ssh -T`` with a piped stdin works as well as an
    interactive login, and scripts can trust the exit code.
    """

    width = 80
    height = 24
    _transport: manhole_ssh.TerminalSessionTransport | None = None
    _proto: Any = None
    _ended = False

    def getPty(self, term: bytes, windowSize: tuple[int, int, int, int], attrs: Any) -> None:
        rows, columns = windowSize[:2]
        self.height, self.width = rows or 24, columns or 80

    def openShell(self, proto: Any) -> None:
        self._proto = proto
        self._transport = self.transportFactory(
            proto,
            self.chainedProtocolFactory(),
            IConchUser(self.original),
            self.width,
            self.height,
        )
        # The manhole's own way out (Ctrl-D at the prompt) goes through here.
        self._transport.chainedProtocol.transport.loseConnection = self._exit

    def execCommand(self, proto: Any, cmd: bytes) -> None:
        """Refuse ``ssh host command`` with a message and status 1, not a logged traceback."""
        proto.write(b"manhole: commands are not supported, log in without one\r\n")
        proto.processEnded(Failure(ProcessTerminated(exitCode=1)))

    def windowChanged(self, newWindowSize: tuple[int, int, int, int]) -> None:
        rows, columns = newWindowSize[:2]
        self.height, self.width = rows or self.height, columns or self.width
        if self._transport is not None:
            self._transport.chainedProtocol.terminalProtocol.terminalSize(self.width, self.height)

    def eofReceived(self) -> None:
        self._exit()

    def _exit(self) -> None:
        if self._ended or self._proto is None:
            return
        self._ended = True
        self._proto.processEnded(Failure(ProcessDone(0)))


@implementer(IRealm)  # TerminalRealm has requestAvatar but declares no interface
class _ManholeRealm(manhole_ssh.TerminalRealm):
    """Every login gets a colored Python prompt on the shared namespace."""

    sessionFactory = _ManholeSession

    def __init__(self, namespace: dict[str, Any]) -> None:
        super().__init__()
        # Twisted infers type[ServerProtocol] from the class default; TerminalSession
        # only calls it with no arguments, so any such factory will do.
        self.chainedProtocolFactory = functools.partial(  # type: ignore[assignment]
            insults.ServerProtocol, manhole.ColoredManhole, namespace
        )
