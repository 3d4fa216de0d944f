"""The receiving SMTP server: mail for local users, stored once, answered in order.

``SMTPServer`` subclasses Twisted's ``ESMTP`` and keeps its command dispatch,
reply formatting, address parsing, timeout and cred ``portal`` plumbing; it
replaces the parts that do not fit a production MX (line numbers are
``twisted/mail/smtp.py`` 26.10):

* EHLO advertised only AUTH/STARTTLS (``extensions``, 1632): here PIPELINING,
  SIZE, 8BITMIME, ENHANCEDSTATUSCODES, and AUTH only where plaintext
  passwords are allowed.
* MAIL/RCPT parameters were ignored (``do_MAIL``, 579): see ``params.py``.
* Pipelined replies came back out of order when validation was asynchronous
  (#8126): see ``lines.py``; one command at a time.
* Each recipient got its own ``IMessage`` and the message was fed to each
  (``do_DATA``, 659): here the text is held once and stored with one
  ``deliver`` call for all recipients (``data.py``, ``delivery.py``).
* Any delivery failure became ``550`` for the whole message
  (``_messageHandled``, 768), so a database hiccup bounced mail for good:
  here a failure is ``451 4.3.0`` and the sender retries.
* An overlong DATA line dropped back to command mode mid-message
  (``lineLengthExceeded``, 521): see ``lines.py``, which also takes a bare
  LF as the end of a text line (never of the data: only CRLF.CRLF is).
* NOOP and VRFY, which RFC 5321 4.5.1 requires, did not exist; non-ASCII
  command bytes raised out of ``lookupMethod`` and dropped the connection;
  a malformed PLAIN response raised out of ``state_AUTH``.
* AUTH failures answered at once: here after the ``LoginGuard`` delay.
* STARTTLS (RFC 3207) ran the lines pipelined after it once TLS was up
  (``basic.py`` 428-440: the CVE-2011-0411 class): here they are thrown
  away, and everything learnt before it (EHLO) is forgotten.

Every reply carries an enhanced status code (RFC 2034, 3463, 5248) except
the greeting, HELO/EHLO and the 334/354 continuations, as RFC 2034 says.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

import structlog
from twisted.cred.error import LoginFailed
from twisted.cred.portal import Portal
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IAddress, IDelayedCall
from twisted.internet.task import deferLater
from twisted.mail import smtp
from twisted.mail._except import IllegalClientResponse
from twisted.mail.interfaces import IMessageDelivery
from twisted.python.failure import Failure

from ..auth import WrongPassword, guarded_login
from ..login_guard import LoginThrottled
from ..names import loggable_user, normalise_address
from ..node import Node
from ..flow import WriteGate
from ..tls.session import TLSSession
from ..twisted_types import ConnectionInfo, IServerTransport
from . import headers, replies
from .data import IncomingMessage, Verdict
from .delivery import LocalDelivery, Recipient
from .lines import SerialLineReader
from .params import MailParameters, ParameterError, check_rcpt_parameters, parse_mail_parameters
from .replies import Reply
from .sasl import MECHANISMS, Mechanism

log = structlog.get_logger(__name__)

#: Failed AUTHs before the connection is closed, as POP3 and IMAP do.
MAX_AUTH_FAILURES = 3

COMMAND, DATA, AUTH = smtp.COMMAND, smtp.DATA, smtp.AUTH

#: Bytes no command line may hold: controls (a bare LF could smuggle a header
#: line into Received) and, without SMTPUTF8, anything beyond ASCII.
_BAD_COMMAND_BYTES = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f-\xff]")


@dataclass(frozen=True)
class AuthenticatedSender:
    """The avatar of an SMTP AUTH login: who sent the mail, nothing more.

    Twisted's cred login asks for ``IMessageDelivery``; we request the same
    interface so the realm knows which protocol logs in, but the server does
    its own delivery (one stored copy for all recipients), so the avatar only
    names the user.  It never widens what may be sent: no relaying for
    anyone.
    """

    address: str


@dataclass
class Transaction:
    """One MAIL ... DATA exchange (RFC 5321 3.3)."""

    sender: str
    parameters: MailParameters
    recipients: list[str] = field(default_factory=list)  # normalised, unique
    given: list[str] = field(default_factory=list)  # as the client wrote them
    attempted: bool = False  # whether any RCPT was tried (for DATA's 503 vs 554)


class SMTPServer(TLSSession, SerialLineReader, smtp.ESMTP):
    """One SMTP connection."""

    transport: IServerTransport
    #: Twisted sets it in connectionMade, before any command; its own code
    #: declares it as None.
    _helo: tuple[bytes | None, bytes]

    def __init__(self, node: Node, portal: Portal) -> None:
        smtp.ESMTP.__init__(self, chal=dict(MECHANISMS))
        self.node = node
        # Ours, not Twisted's ``portal``: MAIL, RCPT and AUTH are all ours here, so
        # Twisted's anonymous login through ``portal`` never runs.
        self._portal = portal
        self._local = LocalDelivery(node)
        config = node.config.smtp
        self.host = node.config.hostname
        # Twisted infers int from its default of 600; setTimeout takes any seconds.
        self.timeout = config.timeout  # type: ignore[assignment]
        self.line_limit = config.max_line_length
        self._max_size = config.max_message_size
        self._max_recipients = config.max_recipients
        self._greeted = False
        self._esmtp = False
        self._connected = False
        self._remote = ""
        self._connection = ConnectionInfo("", None, None)
        self._transaction: Transaction | None = None
        self._message: IncomingMessage | None = None
        self._sender: AuthenticatedSender | None = None
        self._auth_failures = 0
        #: Error replies so far (4xx/5xx), for the soft and hard error limits.
        self._errors = 0
        #: Whether this connection holds one of the node's SMTP connection slots.
        self._counted = False
        self._gate = WriteGate(on_change=self._output_changed)
        self.challenger: Mechanism | None = None

    # -- connection ----------------------------------------------------------

    def connectionMade(self) -> None:
        self._connection = ConnectionInfo.of(self.transport)
        self._remote = self._connection.remote
        self._connected = True
        self.tls_connection_made()
        self.transport.registerProducer(self._gate, True)
        limits = self.node.connections.get("smtp")
        refused = limits.open(self._remote) if limits is not None else None
        if refused is not None:
            log.info("connection.refused", protocol="smtp", reason=refused, **self._connection.log_fields())
            self.sendCode(*_reply_parts(_about_host(self.hostname, Reply(421, "4.7.0", f"Error: {refused}"))))
            self.close_connection()
            return
        self._counted = limits is not None
        log.info("connection.open", protocol="smtp", **self._connection.log_fields())
        smtp.ESMTP.connectionMade(self)  # greeting, timeout

    def connectionLost(self, reason: Failure = smtp.protocol.connectionDone) -> None:
        self._connected = False
        self._transaction = self._message = None
        self.challenger = None
        self.tls_connection_lost(reason, "smtp", self._remote)
        if self._counted:
            self._counted = False
            self.node.connections["smtp"].close(self._remote)
        log.info("connection.close", protocol="smtp", **self._connection.log_fields())
        smtp.ESMTP.connectionLost(self, reason)

    def greeting(self) -> bytes:
        return self.host + b" ESMTP twisted-mail-cluster"

    def dataReceived(self, data: bytes) -> None:
        self.feed(data)

    def callLater(self, period: float, func: Callable[[], object]) -> IDelayedCall:
        """TimeoutMixin's clock: the node's reactor, so tests can drive it."""
        return self.node.reactor.callLater(period, func)

    def timeoutConnection(self) -> None:
        if self.abort_stalled_handshake("smtp", self._remote):
            return
        log.info("smtp.timeout", remote=self._remote, after=self.timeout)
        self.reply(_about_host(self.hostname, replies.TIMEOUT))
        self.close_connection()

    # SerialLineReader hooks: no idle timeout while *we* make the client wait.

    def blocked(self) -> None:
        self.setTimeout(None)

    def unblocked(self) -> None:
        if self._connected:
            self.setTimeout(self.timeout)

    def command_failed(self, failure: Failure) -> None:
        """A bug, not a client error: say so and close rather than guess the state."""
        log.error(
            "smtp.internal_error", remote=self._remote, error=failure.getErrorMessage(),
            exception=failure.getTraceback(),
        )
        self.reply(_about_host(self.hostname, replies.INTERNAL_ERROR))
        self.close_connection()

    def line_too_long(self) -> None:
        if self.mode == DATA and self._message is not None:
            self._message.line_too_long()  # answered at the final dot
        elif self.mode == AUTH:
            self._end_auth()
            self.reply(replies.AUTH_LINE_TOO_LONG)
        else:
            self.reply(replies.COMMAND_TOO_LONG)

    # -- replies ---------------------------------------------------------------

    @property
    def hostname(self) -> str:
        return self.host.decode("ascii")

    def reply(self, reply: Reply) -> None:
        if reply.code >= 400:
            self._errors += 1
        self.sendCode(reply.code, reply.message())

    # -- a client that does not read its replies, or keeps getting errors ---------------

    @property
    def output_full(self) -> bool:
        return self._gate.closed and not self.handshaking

    def _output_changed(self, closed: bool) -> None:
        if not closed:
            self.output_drained()

    def _after_command(self, errors_before: int) -> Deferred[None] | None:
        """Postfix's error limits: past the soft one each error waits, at the hard one we hang up."""
        if self._errors == errors_before or not self._connected:
            return None
        config = self.node.config.smtp
        if self._errors >= config.hard_error_limit:
            log.info("smtp.too_many_errors", remote=self._remote, errors=self._errors)
            self.sendCode(*_reply_parts(_about_host(self.hostname, replies.TOO_MANY_ERRORS)))
            self.close_connection()
            return None
        if self._errors > config.soft_error_limit and config.error_sleep > 0:
            return deferLater(self.node.reactor, config.error_sleep, lambda: None)
        return None

    def sendSyntaxError(self) -> None:
        self.reply(replies.BAD_SYNTAX)

    def _reject(self, reply: Reply, reason: str, **fields: object) -> None:
        log.info("smtp.rejected", reason=reason, code=reply.code, remote=self._remote, **fields)
        self.reply(reply)

    # -- commands ----------------------------------------------------------------

    def state_COMMAND(self, line: bytes) -> Deferred[None] | None:
        """Twisted's dispatch, the handler's Deferred passed on (see lines.py), error limits applied."""
        errors_before = self._errors
        result = self._dispatch(line)
        if isinstance(result, Deferred):
            return result.addCallback(lambda _: self._after_command(errors_before))
        return self._after_command(errors_before)

    def _dispatch(self, line: bytes) -> Deferred[None] | None:
        if _BAD_COMMAND_BYTES.search(line):
            self.reply(replies.BAD_SYNTAX)
            return None
        parts = line.strip().split(None, 1)
        if not parts:
            self.reply(replies.BAD_SYNTAX)
            return None
        method = self.lookupMethod(parts[0]) or self.do_UNKNOWN
        return method(parts[1] if len(parts) == 2 else b"")

    def do_UNKNOWN(self, rest: bytes) -> None:
        self.reply(replies.UNKNOWN_COMMAND)

    def do_HELO(self, rest: bytes) -> None:
        if not rest.strip():
            self.reply(Reply(501, "5.5.4", "Syntax: HELO hostname"))
            return
        self._greet(rest.strip(), esmtp=False)
        self.sendCode(250, self.host)

    def do_EHLO(self, rest: bytes) -> None:
        if not rest.strip():
            self.reply(Reply(501, "5.5.4", "Syntax: EHLO hostname"))
            return
        self._greet(rest.strip(), esmtp=True)
        self.sendCode(250, self.host + b"\n" + self.listExtensions())

    def _greet(self, name: bytes, esmtp: bool) -> None:
        """HELO/EHLO also reset any transaction (RFC 5321 4.1.4)."""
        self._helo = (name, self._remote.encode("ascii", "replace"))
        self._greeted = True
        self._esmtp = esmtp
        self._transaction = None

    def extensions(self) -> dict[bytes, list[bytes] | None]:
        ext: dict[bytes, list[bytes] | None] = {
            b"PIPELINING": None,
            b"SIZE": [str(self._max_size).encode()],
            b"8BITMIME": None,
            b"ENHANCEDSTATUSCODES": None,
        }
        if self.node.tls is not None and not self.tls_started:
            ext[b"STARTTLS"] = None
        if self._auth_allowed:
            ext[b"AUTH"] = list(MECHANISMS)
        return ext

    @property
    def _auth_allowed(self) -> bool:
        return self.node.guard.plaintext_allowed(self._remote, encrypted=self.encrypted)

    def do_NOOP(self, rest: bytes) -> None:
        self.reply(replies.OK)

    def do_VRFY(self, rest: bytes) -> None:
        self.reply(replies.VRFY_REFUSED)

    def do_RSET(self, rest: bytes) -> None:
        self._transaction = None
        self.reply(replies.OK)

    def do_QUIT(self, rest: bytes) -> None:
        self.reply(replies.BYE)
        self.close_connection()

    def ext_STARTTLS(self, rest: bytes) -> None:
        """RFC 3207: TLS now; then the client starts over with EHLO."""
        if self.node.tls is None:
            self.reply(replies.STARTTLS_UNAVAILABLE)
        elif rest.strip():
            self.reply(replies.STARTTLS_SYNTAX)
        elif self.tls_started:
            self.reply(replies.STARTTLS_ACTIVE)
        elif self.authenticated:
            self.reply(replies.STARTTLS_AFTER_AUTH)
        elif self._transaction is not None:
            self.reply(replies.STARTTLS_IN_TRANSACTION)
        else:
            self.reply(replies.STARTTLS_READY)
            # What the client sent after STARTTLS came in clear and may be an
            # attacker's: never run it (CVE-2011-0411).  RFC 3207 4.2: forget EHLO.
            self.discard_buffered()
            self._greeted = self._esmtp = False
            self._helo = (None, self._remote.encode("ascii", "replace"))
            self.start_tls(self.node.tls)

    # -- MAIL --------------------------------------------------------------------

    def do_MAIL(self, rest: bytes) -> None:
        if not self._greeted:
            self.reply(replies.NEED_HELO)
            return
        if self._transaction is not None:
            self.reply(replies.NESTED_MAIL)
            return
        match = self.mail_re.match(rest)
        if match is None:
            self.reply(replies.MAIL_SYNTAX)
            return
        try:
            sender = str(smtp.Address(match.group("path"), self.host))
        except smtp.AddressError:
            self.reply(replies.BAD_SENDER)
            return
        try:
            parameters = parse_mail_parameters(match.group("opts"), self._max_size)
        except ParameterError as e:
            self._reject(e.reply, "mail parameter", sender=sender)
            return
        self._transaction = Transaction(sender, parameters)
        self.reply(replies.SENDER_OK)

    # -- RCPT --------------------------------------------------------------------

    def do_RCPT(self, rest: bytes) -> Deferred[None] | None:
        transaction = self._transaction
        if transaction is None:
            self.reply(replies.NEED_MAIL)
            return None
        match = self.rcpt_re.match(rest)
        if match is None:
            self.reply(replies.RCPT_SYNTAX)
            return None
        try:
            check_rcpt_parameters(match.group("opts"))
            given = str(smtp.Address(match.group("path"), self.host))
        except ParameterError as e:
            self._reject(e.reply, "rcpt parameter")
            return None
        except smtp.AddressError:
            self.reply(replies.BAD_RECIPIENT)
            return None
        transaction.attempted = True
        address = normalise_address(given)
        if address in transaction.recipients:
            self.reply(replies.RECIPIENT_OK)  # delivered once, whatever the repetitions
            return None
        if len(transaction.recipients) >= self._max_recipients:
            self._reject(replies.TOO_MANY_RECIPIENTS, "too many recipients", recipient=given)
            return None
        return Deferred.fromCoroutine(self._check_recipient(transaction, given, address))

    async def _check_recipient(self, transaction: Transaction, given: str, address: str) -> None:
        try:
            kind, owner = await self._local.classify(address)
        except Exception:
            self._log_failure("smtp.lookup_failed", Failure(), recipient=given)
            self.reply(replies.LOOKUP_FAILED)
            return
        if kind is Recipient.LOCAL:
            if self._transaction is transaction and owner not in transaction.recipients:
                transaction.recipients.append(owner)
                transaction.given.append(given)
            self.reply(replies.RECIPIENT_OK)
        elif kind is Recipient.UNKNOWN_USER:
            self._reject(_about(given, replies.UNKNOWN_USER), "unknown user", recipient=given)
        else:
            self._reject(_about(given, replies.RELAY_DENIED), "relay denied", recipient=given)

    # -- DATA --------------------------------------------------------------------

    def do_DATA(self, rest: bytes) -> None:
        transaction = self._transaction
        if transaction is None:
            self.reply(replies.NEED_MAIL)
            return
        if rest.strip():
            self.reply(Reply(501, "5.5.4", "Syntax: DATA"))
            return
        if not transaction.recipients:
            self.reply(replies.NO_VALID_RECIPIENTS if transaction.attempted else replies.NEED_RCPT)
            return
        self._message = IncomingMessage(self._max_size)
        self.mode = DATA
        self.lf_ends_lines = True
        self.reply(replies.START_DATA)

    def state_DATA(self, line: bytes) -> Deferred[None] | None:
        """One line of message text; stored with CRLF whichever ending it came with.

        Only ``<CRLF>.<CRLF>`` ends the data: a dot line next to a bare LF is
        text (SMTP smuggling relies on servers that disagree about this).
        """
        if line[:1] == b".":
            if line == b"." and self.line_crlf and self.after_crlf:
                return self._end_of_data()
            line = line[1:]  # dot-unstuffing (RFC 5321 4.5.2)
        assert self._message is not None
        self._message.add_line(line)
        return None

    dataLineReceived = state_DATA

    def _end_of_data(self) -> Deferred[None] | None:
        transaction, message = self._transaction, self._message
        self._transaction = self._message = None
        self.mode = COMMAND
        self.lf_ends_lines = False
        assert transaction is not None and message is not None
        if message.verdict is Verdict.TOO_BIG:
            self._reject(
                replies.message_too_big(self._max_size), "message too big",
                size=message.size, sender=transaction.sender,
            )
            return None
        if message.verdict is Verdict.LINE_TOO_LONG:
            self._reject(
                replies.line_too_long(self.line_limit), "line too long",
                sender=transaction.sender,
            )
            return None
        return Deferred.fromCoroutine(self._store(transaction, message))

    async def _store(self, transaction: Transaction, message: IncomingMessage) -> None:
        """Answer 250 only once the store said the message is durable."""
        transaction_id = headers.transaction_id()
        trace = headers.trace_fields(
            sender=transaction.sender,
            helo=self._helo[0],
            peer_ip=self._remote,
            hostname=self.hostname,
            with_protocol=self._with_protocol(),
            tls=self.tls_description(),
            transaction=transaction_id,
            recipients=transaction.given,
            when=datetime.now().astimezone(),
        )
        separator = b"" if headers.starts_with_header(message.first_line) else b"\r\n"
        content = trace + separator + message.text()
        del message  # the text now lives in ``content`` only
        try:
            delivered = await self._local.deliver(content, transaction.recipients)
        except Exception:
            self._log_failure(
                "smtp.delivery_failed", Failure(), id=transaction_id, sender=transaction.sender,
                recipients=len(transaction.recipients), size=len(content),
            )
            self.reply(replies.STORE_FAILED)
            return
        log.info(
            "smtp.delivered",
            id=transaction_id,
            message_ids=[str(copy.message_id) for copy in delivered],
            size=len(content),
            recipients=len(transaction.recipients),
            sender=transaction.sender,
            remote=self._remote,
            user=self._sender.address if self._sender else None,
        )
        self.reply(replies.stored(transaction_id))

    def _with_protocol(self) -> str:
        """The ``with`` of the Received field (RFC 3848)."""
        if not self._esmtp:
            return "SMTP"
        return "ESMTP" + ("S" if self.encrypted else "") + ("A" if self.authenticated else "")

    # -- AUTH --------------------------------------------------------------------

    def ext_AUTH(self, rest: bytes) -> Deferred[None] | None:
        if not self._greeted:
            self.reply(replies.NEED_HELO)
            return None
        if self.authenticated:
            self.reply(replies.AUTH_ALREADY)
            return None
        if self._transaction is not None:
            self.reply(replies.AUTH_IN_TRANSACTION)
            return None
        if not self._auth_allowed:
            self._reject(replies.AUTH_NEEDS_ENCRYPTION, "plaintext auth not allowed")
            return None
        parts = rest.split(None, 1)
        if not parts:
            self.reply(Reply(501, "5.5.4", "Syntax: AUTH mechanism"))
            return None
        make = MECHANISMS.get(parts[0].upper())
        if make is None:
            self.reply(replies.AUTH_UNKNOWN_MECHANISM)
            return None
        self.challenger = make()
        self.mode = AUTH
        if len(parts) == 2:
            return self._sasl_step(parts[1].strip(), initial=True)
        self.sendCode(334, base64.b64encode(self.challenger.getChallenge()))
        return None

    def state_AUTH(self, response: bytes) -> Deferred[None] | None:
        return self._sasl_step(response.strip(), initial=False)

    def _sasl_step(self, response: bytes, initial: bool) -> Deferred[None] | None:
        mechanism = self.challenger
        assert mechanism is not None
        if response == b"*":
            self._end_auth()
            self.reply(replies.AUTH_ABORTED)
            return None
        try:
            # RFC 4954 4: "=" is an empty initial response.
            decoded = b"" if initial and response == b"=" else base64.b64decode(response, validate=True)
            mechanism.setResponse(decoded)
        except binascii.Error:
            self._end_auth()
            self.reply(replies.AUTH_BAD_RESPONSE)
            return None
        except IllegalClientResponse:
            self._end_auth()
            self.reply(Reply(501, "5.5.2", "Invalid authentication response"))
            return None
        if mechanism.moreChallenges():
            self.sendCode(334, base64.b64encode(mechanism.getChallenge()))
            return None
        self._end_auth()
        return Deferred.fromCoroutine(self._login(mechanism))

    def _end_auth(self) -> None:
        self.mode = COMMAND
        self.challenger = None

    async def _login(self, credentials: Mechanism) -> None:
        """Check the password through the portal; make failures wait (never log a password)."""
        user = loggable_user(credentials.username)
        guard = self.node.guard
        try:
            if credentials.authzid_mismatch:
                raise LoginFailed("no proxy authorization")
            avatar, logout = await guarded_login(
                guard, self._remote, self._portal, credentials, IMessageDelivery, AuthenticatedSender
            )
        except LoginThrottled as e:
            log.info("login.refused", protocol="smtp", user=user, remote=self._remote, reason=e.reason)
            self.reply(replies.AUTH_THROTTLED)
            return
        except LoginFailed as e:
            # A wrong password was counted by guarded_login; a proxy login, refused unchecked, here.
            delay = e.delay if isinstance(e, WrongPassword) else guard.failed(self._remote, credentials.username)
            self._auth_failures += 1
            log.info("login.failure", protocol="smtp", user=user, remote=self._remote, delay=delay)
            await deferLater(self.node.reactor, delay, lambda: None)
            self.reply(replies.AUTH_FAILED)
            if self._auth_failures >= MAX_AUTH_FAILURES:
                self.reply(_about_host(self.hostname, replies.TOO_MANY_AUTH_FAILURES))
                self.close_connection()
            return
        except Exception:
            self._log_failure("login.error", Failure(), user=user)
            self.reply(replies.AUTH_TEMPORARY)
            return
        finally:
            credentials.password = b""
        self.authenticated = True
        self._sender = avatar
        self._onLogout = logout
        log.info("login.success", protocol="smtp", user=avatar.address, remote=self._remote, **self.tls_log_fields())
        self.reply(replies.AUTH_OK)

    # -- helpers -----------------------------------------------------------------

    def _log_failure(self, event: str, failure: Failure, **fields: object) -> None:
        log.error(
            event, remote=self._remote, error=failure.getErrorMessage(),
            exception=failure.getTraceback(), **fields,
        )


def _reply_parts(reply: Reply) -> tuple[int, bytes]:
    """sendCode's arguments; the hang-up reply is not counted as one more error."""
    return reply.code, reply.message()


def _about_host(hostname: str, reply: Reply) -> Reply:
    """421 replies name the server first (RFC 5321 3.8)."""
    return dataclasses.replace(reply, text=f"{hostname} {reply.text}")


def _about(address: str, reply: Reply) -> Reply:
    """The reply with the address in front, as Postfix words recipient rejections."""
    return dataclasses.replace(reply, text=f"<{address}>: {reply.text}")


class SMTPFactory(smtp.SMTPFactory):
    """What the node listens with: ``listen(SMTPFactory(node))``."""

    noisy = False

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        self._portal = node.portal(IMessageDelivery, _sender_avatar)

    def buildProtocol(self, addr: IAddress | None) -> SMTPServer:
        protocol = SMTPServer(self.node, self._portal)
        protocol.factory = self
        return protocol


async def _sender_avatar(address: str) -> AuthenticatedSender:
    return AuthenticatedSender(address)
