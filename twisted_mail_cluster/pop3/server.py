"""The POP3 server: RFC 1939, CAPA and RESP-CODES (RFC 2449), AUTH-RESP-CODE (RFC 3206), SASL PLAIN (RFC 5034).

``POP3Server`` subclasses ``twisted.mail.pop3.POP3`` for its connection,
line and timeout machinery and replaces the command handling, because the
gaps are in the handling itself (line numbers: Twisted 26.10,
``twisted/mail/pop3.py``):

* RETR/TOP content: ``transformChunk`` (1172-1186) turns stored CRLF into
  CR CR LF and misses dots at the start of the message and of chunks
  -> ``streaming.MessageSender`` (stateful dot-stuffing, pull producer).
* Login: no delay after a failed login (``_ebMailbox``, 792-808), no
  plaintext policy (USER/PASS/AUTH are always allowed, 439), AUTH only in the
  CRAM-MD5 shape (713-740), no RFC 2449/3206 response codes
  -> ``_login``/``_login_failed``, ``cmd_AUTH`` with SASL PLAIN, ``[AUTH]`` and
  ``[SYS/...]`` codes, and the connection is closed after three failures.
* QUIT: ``do_QUIT`` (1257-1267) answers +OK without waiting for ``sync()``
  and loses its errors -> ``cmd_QUIT`` answers only once the removal is
  stored, and ``-ERR [SYS/TEMP]`` if it failed.
* Pipelining: ``do_PASS`` (835-860, and APOP/AUTH likewise) does not block
  the command queue, so a command pipelined after PASS runs before the login
  is known ("not authenticated yet"); only RETR/TOP/LIST/STAT/UIDL use
  ``_longOperation`` (862-880).  -> every line waits in ``_pending`` until
  the previous command has fully answered, and reading from the socket
  pauses if too many lines queue up.
* Errors: ``state_COMMAND`` (543-563) answers bad arguments with Python
  exception text, and ``DELE x`` even escapes it (``int()`` at 1210, then a
  TypeError building the reply) and drops the connection; store failures on
  RETR are only logged (``ebMessageSomething``, 1058-1078), leaving the
  client waiting.  -> every command answers; a store TemporaryFailure is
  ``-ERR [SYS/TEMP]``, damaged content ``-ERR [SYS/PERM]``.
* CAPA advertised joke capabilities and ``PIPELINE`` (599-607) rather than
  RFC 2449's ``PIPELINING``; the greeting carried an APOP timestamp although
  there is no APOP here.
* Commands ending in a bare LF were never seen (the delimiter is CRLF).
* No STLS (RFC 2595) -> ``cmd_STLS``, with whatever the client pipelined
  after it in clear thrown away (the CVE-2011-0411 class of injection).

No maildrop lock: see ``maildrop.py`` for why the message-id view makes
concurrent sessions safe.
"""

from __future__ import annotations

import inspect
import re
from collections import deque
from collections.abc import Callable, Coroutine
from typing import Any

import structlog
from twisted.cred.credentials import UsernamePassword
from twisted.cred.portal import Portal
from twisted.internet import protocol
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IAddress
from twisted.internet.task import deferLater
from twisted.mail import pop3
from twisted.mail.pop3 import IMailbox
from twisted.python.failure import Failure

from ..auth import WrongPassword, guarded_login
from ..flow import WriteGate
from ..login_guard import LoginThrottled
from ..names import loggable_user
from ..node import Node
from ..store.errors import ContentCorrupted, ContentMissing, TemporaryFailure
from ..tls.session import TLSSession
from ..twisted_types import ConnectionInfo, IServerTransport
from .maildrop import Maildrop, MessageGone, NoSuchMessage
from .sasl import SaslError, decode_plain
from .streaming import MessageSender, TransferStopped

__all__ = ["POP3Factory", "POP3Server"]

log = structlog.get_logger(__name__)

IMPLEMENTATION = b"twisted-mail-cluster"
GREETING = "twisted-mail-cluster ready."
# Dovecot's wording, which clients and admins already know.
PLAINTEXT_DISALLOWED = (
    "[AUTH] Plaintext authentication disallowed on non-secure (SSL/TLS) connections."
)
AUTH_FAILED = "[AUTH] Authentication failed."
#: Refused before the password was looked at (login_guard.py); RFC 3206's SYS/TEMP.
THROTTLED = "[SYS/TEMP] Too many login attempts, try again later."
STORE_UNAVAILABLE = "[SYS/TEMP] The mail store is temporarily unavailable, try again later."
CONTENT_UNAVAILABLE = "[SYS/PERM] message content is unavailable"
INTERNAL_ERROR = "[SYS/TEMP] Internal error, see the server log."
MAX_LOGIN_FAILURES = 3

_NUMBER = re.compile(rb"[0-9]{1,10}")
_PRINTABLE = re.compile(rb"[^\x21-\x7e]")

Handler = Callable[..., "Coroutine[Any, Any, None] | None"]


class CommandError(Exception):
    """Answered as ``-ERR <text>``; the session goes on."""


class POP3Server(TLSSession, pop3.POP3):
    """One POP3 connection.

    States follow RFC 1939: AUTHORIZATION until a login succeeds
    (``maildrop`` is None), then TRANSACTION; QUIT in TRANSACTION is UPDATE.
    """

    transport: IServerTransport

    #: RFC 2449 caps commands at 255 octets, but a SASL response line may be
    #: longer; anything past this closes the connection.
    MAX_LENGTH = 8192
    #: Commands may end in a bare LF (people typing into netcat, old scripts):
    #: split on LF and drop the CR.  Replies always end in CRLF (``sendLine``).
    delimiter = b"\n"
    #: Lines queued behind a running command before we stop reading the socket.
    MAX_PENDING = 100

    _AUTHORIZATION = frozenset({b"CAPA", b"STLS", b"USER", b"PASS", b"AUTH", b"QUIT"})
    _TRANSACTION = frozenset(
        {b"CAPA", b"STAT", b"LIST", b"UIDL", b"RETR", b"TOP", b"DELE", b"RSET", b"NOOP", b"QUIT"}
    )

    def __init__(self, node: Node, portal: Portal) -> None:
        self.node = node
        self._portal = portal
        self.timeOut = node.config.pop3.timeout  # type: ignore[assignment]  # seconds, float is fine
        self.maildrop: Maildrop | None = None
        self._host = ""
        self._connection = ConnectionInfo("", None, None)
        self._user: bytes | None = None
        self._login_failures = 0
        self._pending: deque[bytes] = deque()
        self._busy = False
        self._draining = False
        self._reading_paused = False
        self._sasl_waiting = False
        self._streaming = False
        self._closed = False
        self._delay: Deferred[None] | None = None
        #: After STLS, the lines still left of the packet that carried it are dropped.
        self._drop_rest_of_packet = False
        self._gate = WriteGate(on_change=self._output_changed)
        #: Whether this connection holds one of the node's POP3 connection slots.
        self._counted = False

    # -- connection ---------------------------------------------------------------

    def connectionMade(self) -> None:
        # No APOP timestamp in the greeting: we do not offer APOP.
        self._connection = ConnectionInfo.of(self.transport)
        self._host = self._connection.remote
        self.tls_connection_made()
        self.transport.registerProducer(self._gate, True)
        limits = self.node.connections.get("pop3")
        refused = limits.open(self._host) if limits is not None else None
        if refused is not None:
            log.info("connection.refused", protocol="pop3", reason=refused, **self._connection.log_fields())
            self._err(f"[SYS/TEMP] {refused.capitalize()}, try again later.")
            self._closed = True
            self.close_connection()
            return
        self._counted = limits is not None
        log.info("connection.open", protocol="pop3", **self._connection.log_fields())
        self._ok(GREETING)
        self.setTimeout(self.timeOut)

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:
        self._closed = True
        self._pending.clear()
        if self._delay is not None:
            self._delay.cancel()
        self.tls_connection_lost(reason, "pop3", self._host)
        if self._counted:
            self._counted = False
            self.node.connections["pop3"].close(self._host)
        super().connectionLost(reason)
        log.info(
            "connection.close",
            protocol="pop3",
            **self._connection.log_fields(),
            user=self.maildrop.address if self.maildrop else None,
        )

    def timeoutConnection(self) -> None:
        """RFC 1939's autologout: close without entering UPDATE."""
        if self.abort_stalled_handshake("pop3", self._host):
            return
        log.info("connection.timeout", protocol="pop3", remote=self._host)
        if self._streaming:
            self.transport.abortConnection()
            return
        self._err("Disconnected for inactivity.")
        self.close_connection()

    def lineLengthExceeded(self, line: bytes) -> None:
        if not self._streaming:
            self._err("Line too long.")
        self.close_connection()

    # -- command queue: one command at a time, in order ---------------------------

    def sendLine(self, line: bytes) -> None:
        self.transport.writeSequence((line, b"\r\n"))

    def dataReceived(self, data: bytes) -> None:
        self._drop_rest_of_packet = False
        super().dataReceived(data)

    def lineReceived(self, line: bytes) -> None:
        if self._drop_rest_of_packet:
            return
        self.resetTimeout()
        self._pending.append(line[:-1] if line.endswith(b"\r") else line)
        self._update_reading()
        self._run_pending()

    def _run_pending(self) -> None:
        if self._draining:
            return  # a command finished synchronously inside the loop below
        self._draining = True
        try:
            while self._pending and not self._busy and not self._output_full() and not self._closing():
                d = self._execute(self._pending.popleft())
                if d is not None:
                    self._busy = True
                    d.addBoth(self._command_done)
        finally:
            self._draining = False
        self._update_reading()

    def _update_reading(self) -> None:
        """Read the client only while few commands wait and its replies are being read."""
        if self._closing():
            return
        if not self._reading_paused and (len(self._pending) > self.MAX_PENDING or self._output_full()):
            self._reading_paused = True
            self.transport.pauseProducing()
        elif self._reading_paused and not self._pending and not self._output_full():
            self._reading_paused = False
            self.transport.resumeProducing()

    def _output_full(self) -> bool:
        """The client leaves its replies unread (not: a TLS handshake holds them back)."""
        return self._gate.closed and not self.handshaking

    def _output_changed(self, closed: bool) -> None:
        if closed:
            self._update_reading()
        else:
            self._run_pending()

    def _command_done(self, result: object) -> None:
        self._busy = False
        self._run_pending()

    def _closing(self) -> bool:
        return self._closed or bool(self.transport.disconnecting)

    def _execute(self, line: bytes) -> Deferred[None] | None:
        if self._sasl_waiting:
            self._sasl_waiting = False
            return self._run(self._sasl_continued, line)
        name, _, rest = line.partition(b" ")
        command = name.upper()
        allowed = self._TRANSACTION if self.maildrop is not None else self._AUTHORIZATION
        if command not in allowed:
            if command in self._TRANSACTION:
                self._err("Not logged in.")
            elif command in self._AUTHORIZATION:
                self._err("Already logged in.")
            else:
                shown = _PRINTABLE.sub(b"?", command[:32]).decode("ascii")
                self._err(f"Unknown command: {shown}")
            return None
        return self._run(getattr(self, "cmd_" + command.decode("ascii")), rest)

    def _run(self, handler: Handler, argument: bytes) -> Deferred[None] | None:
        """Call a handler; a coroutine becomes a Deferred the queue waits for."""
        try:
            result = handler(argument)
        except CommandError as e:
            self._err(str(e))
            return None
        except Exception:
            self._failed(Failure())
            return None
        if not inspect.iscoroutine(result):
            return None
        d: Deferred[None] = Deferred.fromCoroutine(result)
        d.addErrback(self._failed)
        return d

    def _failed(self, failure: Failure) -> None:
        """Every failed command gets its answer, so no client is left waiting."""
        if failure.check(CommandError):
            self._err(str(failure.value))
        elif self._closed and failure.check(CancelledError, TransferStopped):
            pass
        elif failure.check(TemporaryFailure):
            log.warning(
                "pop3.store_unavailable", remote=self._host, user=self._address(),
                error=failure.getErrorMessage(),
            )
            self._err(STORE_UNAVAILABLE)
        else:
            log.error(
                "pop3.internal_error", remote=self._host, user=self._address(),
                error=failure.getErrorMessage(), traceback=failure.getTraceback(),
            )
            self._err(INTERNAL_ERROR)

    # -- replies --------------------------------------------------------------------

    def _ok(self, text: str = "") -> None:
        self.sendLine(b"+OK " + text.encode("utf-8") if text else b"+OK")

    def _err(self, text: str) -> None:
        self.sendLine(b"-ERR " + text.encode("utf-8"))

    def _multiline(self, first: str, lines: list[bytes]) -> None:
        """A multi-line reply; ``lines`` never start with "." (numbers and ids only)."""
        self.transport.writeSequence(
            [b"+OK " + first.encode("utf-8") + b"\r\n", *(line + b"\r\n" for line in lines), b".\r\n"]
        )

    def _address(self) -> str | None:
        return self.maildrop.address if self.maildrop is not None else None

    # -- AUTHORIZATION ----------------------------------------------------------------

    def _plaintext_allowed(self) -> bool:
        return self.node.guard.plaintext_allowed(self._host, encrypted=self.encrypted)

    def _check_plaintext(self) -> None:
        if not self._plaintext_allowed():
            raise CommandError(PLAINTEXT_DISALLOWED)

    def cmd_CAPA(self, rest: bytes) -> None:
        _no_arguments(rest, "CAPA")
        caps = [b"TOP", b"UIDL", b"RESP-CODES", b"AUTH-RESP-CODE", b"PIPELINING"]
        if self.node.tls is not None and not self.tls_started and self.maildrop is None:
            caps.append(b"STLS")
        if self._plaintext_allowed():
            caps += [b"USER", b"SASL PLAIN"]
        caps.append(b"IMPLEMENTATION " + IMPLEMENTATION)
        self._multiline("Capability list follows", caps)

    def cmd_STLS(self, rest: bytes) -> None:
        """RFC 2595 4: TLS in the AUTHORIZATION state, once."""
        _no_arguments(rest, "STLS")
        if self.node.tls is None:
            raise CommandError("STLS is not available on this server.")
        if self.tls_started:
            raise CommandError("Command not permitted when TLS active.")
        self._ok("Begin TLS negotiation now.")
        # Anything after STLS was sent in clear and may be an attacker's: drop it,
        # the queued lines and the rest of this packet alike (RFC 2595 4, CVE-2011-0411).
        self._pending.clear()
        self._buffer = b""  # LineOnlyReceiver's partial line after the last delimiter
        self._drop_rest_of_packet = True
        self._user = None
        self.start_tls(self.node.tls)

    def cmd_USER(self, rest: bytes) -> None:
        self._check_plaintext()
        if not rest.strip():
            raise CommandError("Syntax: USER name")
        self._user = rest.strip()
        self._ok("Send PASS.")

    def cmd_PASS(self, rest: bytes) -> Coroutine[Any, Any, None]:
        self._check_plaintext()
        if self._user is None:
            raise CommandError("No user name given: send USER first.")
        user, self._user = self._user, None
        return self._login(user, rest)

    def cmd_AUTH(self, rest: bytes) -> Coroutine[Any, Any, None] | None:
        args = rest.split()
        if not args:
            # Some clients list mechanisms with a bare AUTH (RFC 1734 practice).
            self._multiline("Mechanisms follow", [b"PLAIN"] if self._plaintext_allowed() else [])
            return None
        if len(args) > 2:
            raise CommandError("Syntax: AUTH mechanism [initial-response]")
        if args[0].upper() != b"PLAIN":
            raise CommandError("Unsupported authentication mechanism.")
        self._check_plaintext()
        if len(args) == 2:
            return self._sasl_plain(args[1])
        self.sendLine(b"+ ")
        self._sasl_waiting = True
        return None

    def _sasl_continued(self, line: bytes) -> Coroutine[Any, Any, None]:
        if line.strip() == b"*":
            raise CommandError("Authentication aborted by client.")
        return self._sasl_plain(line.strip())

    async def _sasl_plain(self, response: bytes) -> None:
        try:
            credentials = decode_plain(response)
        except SaslError as e:
            raise CommandError(f"Invalid SASL PLAIN response: {e}.") from None
        if credentials.authzid and credentials.authzid != credentials.authcid:
            # Logging in as someone else (proxy authorisation) is not offered.
            await self._login_failed(credentials.authcid)
            return
        await self._login(credentials.authcid, credentials.password)

    async def _login(self, user: bytes, password: bytes) -> None:
        try:
            maildrop, logout = await guarded_login(
                self.node.guard, self._host, self._portal, UsernamePassword(user, password), IMailbox, Maildrop
            )
        except LoginThrottled as e:
            log.info("login.refused", protocol="pop3", user=loggable_user(user), remote=self._host, reason=e.reason)
            self._err(THROTTLED)
            return
        except WrongPassword as e:
            await self._login_failed(user, e.delay)
            return
        self.maildrop = self.mbox = maildrop
        self._onLogout = logout
        count, octets = maildrop.stat()
        log.info(
            "login.success", protocol="pop3", user=maildrop.address, remote=self._host,
            messages=count, octets=octets, **self.tls_log_fields(),
        )
        self._ok("Logged in.")

    async def _login_failed(self, user: bytes, delay: float | None = None) -> None:
        """Answer only after the guard's delay, which grows with each failure from the host.

        ``delay`` None: a failure found before any check (a proxy login), counted here.
        """
        self._login_failures += 1
        if delay is None:
            delay = self.node.guard.failed(self._host, user)
        log.info(
            "login.failure", protocol="pop3", user=loggable_user(user), remote=self._host,
            session_failures=self._login_failures,
        )
        self._delay = deferLater(self.node.reactor, delay, lambda: None)
        try:
            await self._delay
        finally:
            self._delay = None
        self._err(AUTH_FAILED)
        if self._login_failures >= MAX_LOGIN_FAILURES:
            self.close_connection()

    # -- TRANSACTION ----------------------------------------------------------------

    def _drop(self) -> Maildrop:
        assert self.maildrop is not None  # _execute only dispatches here after login
        return self.maildrop

    def _number(self, argument: bytes) -> int:
        if not _NUMBER.fullmatch(argument):
            raise CommandError("Invalid message number.")
        return int(argument)

    def _existing(self, number: int) -> None:
        try:
            self._drop().entry(number)
        except NoSuchMessage:
            if self._drop().is_deleted(number):
                raise CommandError(f"Message {number} is deleted.") from None
            raise CommandError("No such message.") from None

    def _one_number(self, rest: bytes, syntax: str) -> int:
        args = rest.split()
        if len(args) != 1:
            raise CommandError(f"Syntax: {syntax}")
        number = self._number(args[0])
        self._existing(number)
        return number

    def cmd_STAT(self, rest: bytes) -> None:
        _no_arguments(rest, "STAT")
        count, octets = self._drop().stat()
        self._ok(f"{count} {octets}")

    def cmd_LIST(self, rest: bytes) -> None:
        if rest.strip():
            number = self._one_number(rest, "LIST [msg]")
            self._ok(f"{number} {self._drop().entry(number).size}")
            return
        count, octets = self._drop().stat()
        self._multiline(
            f"{count} messages ({octets} octets)",
            [b"%d %d" % (n, e.size) for n, e in self._drop().visible()],
        )

    def cmd_UIDL(self, rest: bytes) -> None:
        """The unique id is the message's TimeUUID: the same in every session, on every node."""
        if rest.strip():
            number = self._one_number(rest, "UIDL [msg]")
            self._ok(f"{number} {self._drop().entry(number).message_id}")
            return
        self._multiline(
            "Unique-ID listing follows",
            [b"%d %s" % (n, str(e.message_id).encode("ascii")) for n, e in self._drop().visible()],
        )

    def cmd_RETR(self, rest: bytes) -> Coroutine[Any, Any, None]:
        number = self._one_number(rest, "RETR msg")
        size = self._drop().entry(number).size
        return self._send(number, f"{size} octets", None)

    def cmd_TOP(self, rest: bytes) -> Coroutine[Any, Any, None]:
        args = rest.split()
        if len(args) != 2:
            raise CommandError("Syntax: TOP msg lines")
        number = self._number(args[0])
        if not _NUMBER.fullmatch(args[1]):
            raise CommandError("Invalid line count.")
        self._existing(number)
        return self._send(number, "Top of message follows", int(args[1]))

    async def _send(self, number: int, first: str, top_lines: int | None) -> None:
        maildrop = self._drop()
        try:
            info, source = await maildrop.open(number)
        except MessageGone:
            raise CommandError(f"Message {number} was removed by another session.") from None
        except (ContentMissing, ContentCorrupted) as e:
            log.error(
                "pop3.content_unavailable", user=maildrop.address, remote=self._host,
                message_id=str(maildrop.entry(number).message_id), error=str(e),
            )
            raise CommandError(CONTENT_UNAVAILABLE) from None
        if self._closed:
            source.close()
            return
        self._ok(first)
        self._streaming = True
        # The transport takes one producer: the message's own (a pull producer,
        # which writes only as fast as the client reads) stands in for the gate.
        self.transport.unregisterProducer()
        try:
            await MessageSender(source, self.transport, top_lines, self.resetTimeout).start()
        except TransferStopped:
            pass  # the client went away; nothing to answer
        except Exception as e:
            # After +OK the only honest signal left is to cut the connection:
            # a client must not take a truncated message for a whole one.
            log.error(
                "pop3.transfer_failed", user=maildrop.address, remote=self._host,
                message_id=str(maildrop.entry(number).message_id), error=str(e),
                traceback=Failure().getTraceback(),
            )
            self.transport.abortConnection()
        finally:
            self._streaming = False
            if not self._closing():
                self._gate.resumeProducing()  # a fresh registration starts with the gate open
                self.transport.registerProducer(self._gate, True)

    def cmd_DELE(self, rest: bytes) -> None:
        number = self._one_number(rest, "DELE msg")
        self._drop().delete(number)
        self._ok(f"Message {number} deleted.")

    def cmd_RSET(self, rest: bytes) -> None:
        _no_arguments(rest, "RSET")
        self._drop().reset()
        count, octets = self._drop().stat()
        self._ok(f"Maildrop has {count} messages ({octets} octets).")

    def cmd_NOOP(self, rest: bytes) -> None:
        _no_arguments(rest, "NOOP")
        self._ok()

    # -- UPDATE -----------------------------------------------------------------------

    def cmd_QUIT(self, rest: bytes) -> Coroutine[Any, Any, None] | None:
        if self.maildrop is None:
            self._ok("Logging out.")
            self.close_connection()
            return None
        return self._update(self.maildrop)

    async def _update(self, maildrop: Maildrop) -> None:
        """RFC 1939 UPDATE: +OK only once the removals are stored; -ERR, and nothing lost, if not."""
        marked = len(maildrop.marked())
        try:
            removed = await maildrop.commit()
        except Exception as e:
            failure = Failure()
            if not isinstance(e, TemporaryFailure):
                log.error(
                    "pop3.internal_error", remote=self._host, user=maildrop.address,
                    error=str(e), traceback=failure.getTraceback(),
                )
            log.warning(
                "pop3.update_failed", user=maildrop.address, remote=self._host,
                marked=marked, error=str(e),
            )
            self._err("[SYS/TEMP] Deleting the messages failed; they are all kept, try again later.")
            self.close_connection()
            return
        log.info("pop3.update", user=maildrop.address, remote=self._host,
                 deleted=len(removed), marked=marked)
        self._ok("Logging out.")
        self.close_connection()


def _no_arguments(rest: bytes, command: str) -> None:
    if rest.strip():
        raise CommandError(f"{command} takes no arguments.")


class POP3Factory(protocol.ServerFactory):
    """POP3 for one node: ``reactor.listenTCP(port, POP3Factory(node))``."""

    noisy = False

    def __init__(self, node: Node) -> None:
        self.node = node
        self.portal = node.portal(IMailbox, self._maildrop)

    # Twisted's POP3 declares ``factory = None``, so to mypy it is no protocol a
    # Factory may build; at run time it is an ordinary Protocol.
    def buildProtocol(self, addr: IAddress | None) -> POP3Server:  # type: ignore[override]
        server = POP3Server(self.node, self.portal)
        server.factory = self  # type: ignore[assignment]
        return server

    async def _maildrop(self, address: str) -> Maildrop:
        """The avatar: the INBOX's POP3 view as it is at login, numbered 1..n in view order."""
        inbox = await self.node.accounts.inbox(address)
        entries = await self.node.store.pop3_list(inbox.id)
        return Maildrop(address, inbox, entries, self.node.store, self.node.mailboxes)
