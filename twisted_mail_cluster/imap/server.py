"""IMAP4rev1 (RFC 3501) with IDLE, NAMESPACE, UIDPLUS, MOVE, UNSELECT, ID, ENABLE,
SPECIAL-USE, CHILDREN, LITERAL+ and SASL-IR, on Twisted's IMAP4Server.

We keep what Twisted's server does well - the connection life cycle, the
state names, greeting, tagged/untagged response plumbing, idle timeouts - and
replace what falls short (TWISTED-NOTES.md section 1):

* framing: a whole command, literals included, is read before it runs, so
  LITERAL+ works, literals may appear anywhere (SEARCH, LOGIN), a large
  APPEND is spooled to disk, and every literal has a size limit;
* serialisation: input is paused while a command runs, so pipelined commands
  run one after the other (Twisted refuses a FETCH pipelined after SELECT);
* every mailbox command talks to our store through ``SelectedMailbox``, which
  holds the client's view of sequence numbers and reports EXISTS, EXPUNGE and
  FETCH FLAGS only where RFC 3501 7.4.1 allows;
* APPEND without flags, partial FETCH, SEARCH KEYWORD/TEXT, NO replies made
  of bytes, an IDLE that only DONE ends, a delay after failed logins;
* the inactivity timeout never writes BYE into the middle of a response: a
  client still reading a long FETCH gets more time, one that stopped reading
  is dropped; nothing is read or written after a BYE.

tests/unit/test_imap_twisted_gaps.py shows each of these gaps on plain
Twisted; tests/unit/test_imap_conformance.py checks the RFCs on the wire.
"""

from __future__ import annotations

import base64
import binascii
import tempfile
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import structlog
from twisted.cred.credentials import UsernamePassword
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.protocol import ServerFactory, connectionDone
from twisted.internet.task import LoopingCall, deferLater
from twisted.mail.imap4 import IAccount, IMAP4Server
from twisted.python.failure import Failure

from .. import __version__
from ..auth import WrongPassword, guarded_login
from ..login_guard import LoginThrottled
from ..events.model import Event, MailboxDeleted
from ..flow import WriteGate
from ..names import INBOX, check_mailbox_name, list_pattern, loggable_user, parents, with_inferiors
from ..node import Node
from ..store.errors import (
    AlreadyExists,
    ContentCorrupted,
    ContentMissing,
    InvalidName,
    NotFound,
    TemporaryFailure,
)
from ..store.model import HIERARCHY_DELIMITER, FlagMode, Mailbox
from ..tls.session import TLSSession
from ..twisted_types import ConnectionInfo, IServerTransport
from . import wire
from .fetch import Fetcher
from .limits import (
    copy_refusal,
    flag_list_refusal,
    keywords_of,
    mailbox_room_refusal,
    new_keywords,
)
from .parser import CommandReader, Literal, ParseError, format_uid_set, split_literal_announcement
from .search import Searcher, count_keys
from .selected import RECENT, BadSequence, SelectedMailbox

log = structlog.get_logger(__name__)

#: Literals of commands other than APPEND (strings, passwords) are at most this big.
SMALL_LITERAL_LIMIT = 64 * 1024
#: Literals above this size are spooled to a temporary file while they arrive.
SPOOL_THRESHOLD = 1024 * 1024
#: Failed logins allowed in one connection before it is closed.
MAX_LOGIN_FAILURES = 3
#: During IDLE: "* OK Still here" this often keeps NAT and firewalls from
#: dropping the connection; the store is polled this often too, in case an
#: event never arrived (a node restarted, the bus was down).
IDLE_KEEPALIVE = 120.0
IDLE_POLL = 30.0
#: IDLE checks this often whether the event bus is down or was reconnected
#: (events may have been lost), and then looks at the store.
IDLE_CHECK = 2.0
#: After BYE, how long a client may take to read what is left before the socket is aborted.
BYE_GRACE = 30.0

ANY = frozenset({"unauth", "auth", "select"})
AUTHENTICATED = frozenset({"auth", "select"})
SELECTED = frozenset({"select"})
#: Commands during which EXPUNGE must not be sent (RFC 3501 7.4.1).
NO_EXPUNGE_DURING = frozenset({"FETCH", "STORE", "SEARCH"})


class _ConnectionGone(Exception):
    """The client went away while a command waited for its next line (IDLE, AUTHENTICATE).

    Not an error: the command just ends, and nothing is written or logged as a crash.
    """


class ImapNo(Exception):
    """A tagged NO, with an optional response code (RFC 5530)."""

    def __init__(self, text: str, code: str | None = None) -> None:
        super().__init__(text)
        self.code = code


@dataclass(frozen=True)
class ImapAccount:
    """The IMAP avatar: who is logged in.  All state lives in the protocol."""

    address: str


Handler = Callable[..., Awaitable[bytes]]
#: What a command raises to be answered with a tagged BAD or NO (see
#: _command_failed); anything else is a bug, answered by _unexpected.
_COMMAND_ERRORS = (
    ParseError, BadSequence, ImapNo, InvalidName, NotFound, AlreadyExists,
    TemporaryFailure, ContentCorrupted, ContentMissing,
)


class _LiteralReader:
    """Collects one literal's octets off the wire, spooling big ones to disk."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self._file = tempfile.SpooledTemporaryFile(max_size=SPOOL_THRESHOLD) if size > SPOOL_THRESHOLD else None
        self._parts: list[bytes] = []

    def close(self) -> None:
        """Drop what arrived so far (the connection went away mid-literal)."""
        if self._file is not None:
            self._file.close()
        self._parts = []

    def feed(self, data: bytes) -> bytes | None:
        """Take what belongs to the literal; return the rest once it is complete."""
        take, rest = data[:self.remaining], data[self.remaining:]
        self.remaining -= len(take)
        if self._file is not None:
            self._file.write(take)
        else:
            self._parts.append(take)
        return rest if self.remaining == 0 else None

    def value(self) -> Literal:
        if self._file is not None:
            return Literal.from_file(self._file)
        return Literal(b"".join(self._parts))


class IMAPServer(TLSSession, IMAP4Server):
    """One IMAP connection."""

    transport: IServerTransport
    IDENT = b"twisted-mail-cluster ready."

    def __init__(self, node: Node) -> None:
        super().__init__()
        self.node = node
        # Not int(): a fraction of a second is a valid setting (and what tests use).
        self.POSTAUTH_TIMEOUT = node.config.imap.idle_timeout  # type: ignore[assignment]
        # Before login (TLS handshake included); TimeoutMixin keeps the current one here.
        self.timeOut = node.config.imap.login_timeout  # type: ignore[assignment]  # Twisted infers int from 60
        self.MAX_LENGTH = node.config.imap.max_line_length
        self.user: str | None = None
        self.selected: SelectedMailbox | None = None
        self._registration: Any = None
        self._segments: list[bytes | Literal] = []
        self._command_size = 0
        self._literal: _LiteralReader | None = None
        self._continuation: Deferred[bytes] | None = None
        self._idling = False
        self._sync_lock = DeferredLock()
        self._gate = WriteGate(on_change=self._output_changed)
        self._connection = ConnectionInfo("", None, None)
        #: STARTTLS answered OK: switch once that reply is written.
        self._starttls_after_reply = False
        #: Whether this connection holds an IMAP connection slot, and a user+address one.
        self._counted = False
        self._user_counted = False
        #: Literals of the command being received, and the time it has to arrive whole.
        self._literal_count = 0
        self._command_deadline: IDelayedCall | None = None
        self._failures = 0
        self._selected_deleted = False
        self._closed = False
        #: Set once the server decided to close (BYE, LOGOUT, timeout): no more
        #: input is read and no more responses are written after that.
        self._closing = False
        self._abort_later: Any = None
        self._idle_ticks = 0
        #: The bus generation when the selected mailbox was last known in sync.
        self._bus_generation = 0
        #: When the selected mailbox was last read from the store (reactor seconds).
        self._last_sync = 0.0
        #: A command is running (between framing and its tagged reply).
        self._busy = False
        #: Bytes FETCH has handed to the transport, and that count at the last
        #: timeout check: a FETCH whose output still moves is not idle.
        self._written = 0
        self._written_at_check = 0
        #: While SELECT/EXAMINE loads a mailbox, events for it are noted here.
        self._selecting: uuid.UUID | None = None
        self._missed_event = False
        self._enabled: set[str] = set()

    # -- connection ------------------------------------------------------------------

    @property
    def _peer(self) -> str:
        return self._connection.remote

    def connectionMade(self) -> None:
        self._connection = ConnectionInfo.of(self.transport)
        self.tls_connection_made()
        self.transport.registerProducer(self._gate, True)
        limits = self.node.connections.get("imap")
        refused = limits.open(self._peer) if limits is not None else None
        if refused is not None:
            log.info("connection.refused", protocol="imap", reason=refused, **self._connection.log_fields())
            self.sendLine(b"* BYE [UNAVAILABLE] " + refused.capitalize().encode() + b", try again later.")
            self._disconnect()
            return
        self._counted = limits is not None
        log.info("connection.open", protocol="imap", **self._connection.log_fields())
        super().connectionMade()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._closed = True
        if self._abort_later is not None and self._abort_later.active():
            self._abort_later.cancel()
        self._gate.stopProducing()
        self._drop_registration()
        self._discard_command()
        if self._continuation is not None:
            continuation, self._continuation = self._continuation, None
            continuation.errback(Failure(_ConnectionGone("connection lost")))
        self.tls_connection_lost(reason, "imap", self._peer)
        limits = self.node.connections.get("imap")
        if self._user_counted and limits is not None and self.user is not None:
            limits.log_out(self.user, self._peer)
        if self._counted and limits is not None:
            limits.close(self._peer)
        self._counted = self._user_counted = False
        log.info("connection.close", protocol="imap", **self._connection.log_fields(), user=self.user)
        super().connectionLost(reason)

    def timeoutConnection(self) -> None:
        """The client sent nothing for the whole timeout.

        Between commands (or in IDLE) that earns a BYE.  While a command is
        still answering, a BYE would land in the middle of its response - in
        a FETCH literal, say - so: if its output moved since the last check,
        the client is reading and gets more time; if not, the client stopped
        reading, and the connection is dropped without another byte.
        A TLS handshake that has not finished by then is dropped as well.
        """
        if self.abort_stalled_handshake("imap", self._peer):
            return
        if self._busy and self._continuation is None:
            if self._written != self._written_at_check:
                self._written_at_check = self._written
                # The timer has fired and is gone: resetTimeout() would be a no-op.
                self.setTimeout(self.timeOut)
                return
            log.info("imap.output_stalled", user=self.user, remote=self._peer)
            self._closing = True
            self.transport.abortConnection()
            return
        self.sendLine(b"* BYE Disconnected for inactivity.")
        self._disconnect()

    def _disconnect(self) -> None:
        """Close after what was written: the gate must let go, or Twisted waits for it forever.

        A client that never reads its BYE would keep the socket (and its
        buffer) forever, so after a grace period the connection is aborted.
        """
        if not self._closing:
            self._closing = True
            self._abort_later = self.node.reactor.callLater(
                BYE_GRACE, self.transport.abortConnection
            )
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def _write_counted(self, data: bytes) -> None:
        """FETCH's writer: counts what it wrote so a slow but reading client is not timed out."""
        self._written += len(data)
        self.transport.write(data)

    def capabilities(self) -> dict[bytes, Any]:
        caps: dict[bytes, Any] = {}
        for name in (b"LITERAL+", b"SASL-IR", b"ID", b"ENABLE", b"IDLE", b"NAMESPACE",
                     b"UIDPLUS", b"MOVE", b"UNSELECT", b"SPECIAL-USE", b"CHILDREN"):
            caps[name] = None
        if self.state == "unauth":
            if self.node.tls is not None and not self.tls_started:
                caps[b"STARTTLS"] = None
            if self._plaintext_allowed():
                caps[b"AUTH"] = [b"PLAIN"]
            else:
                caps[b"LOGINDISABLED"] = None  # RFC 9051 6.2.3; and no AUTH= either
        return caps

    def _capability_line(self) -> bytes:
        return b"CAPABILITY " + b" ".join(self.listCapabilities())

    def lineLengthExceeded(self, line: bytes) -> None:
        self.sendLine(b"* BYE Command line too long.")
        self._disconnect()

    # -- framing: a whole command, literals included, before it runs ---------------------

    def lineReceived(self, line: bytes) -> None:
        if self._closing:
            return  # input that arrived after BYE or LOGOUT is not executed
        self.resetTimeout()
        if self._continuation is not None:
            # IDLE's DONE or an AUTHENTICATE response: input pauses again
            # until the command that asked for it has finished.
            continuation, self._continuation = self._continuation, None
            self.pauseProducing()
            continuation.callback(line)
            return
        try:
            split = split_literal_announcement(line)
        except ParseError as e:
            # The line may be the command's first: it carries the tag to answer with.
            self._segments.append(line)
            self._reject_command(b"BAD", str(e).encode())
            return
        if split is None:
            self._segments.append(line)
            segments, self._segments, self._command_size = self._segments, [], 0
            self._literal_count = 0
            self._cancel_command_deadline()
            self._dispatch(segments)
            return
        text, size, non_sync = split
        self._segments.append(text)
        self._command_size += len(line) + size
        self._literal_count += 1
        if self._literal_count == 1:
            self._start_command_deadline()
        if self._literal_count > self._literals_allowed():
            # Each literal is an object held until the command runs: 5,000,000 {0+}
            # before login took 400 MB.  The client may be sending more: hang up.
            self.sendLine(b"* BYE [LIMIT] Too many literals in one command.")
            self._disconnect()
            return
        limit = self._literal_limit()
        if size > limit or self._command_size > limit + self.MAX_LENGTH:
            if non_sync:
                # The client is already sending it (RFC 7888): we cannot resync.
                self.sendLine(b"* BYE [TOOBIG] Literal too big.")
                self._disconnect()
            else:
                code = b"NO [TOOBIG]" if limit > SMALL_LITERAL_LIMIT else b"BAD"
                self._reject_command(code, b"Literal too big.")
            return
        if not non_sync:
            self.sendContinuationRequest(b"Ready for literal data")
        self._literal = _LiteralReader(size)
        if size == 0:
            self._finish_literal(b"")
        else:
            self.setRawMode()

    def rawDataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        self.resetTimeout()
        assert self._literal is not None
        rest = self._literal.feed(data)
        if rest is not None:
            self._finish_literal(rest)

    def _finish_literal(self, rest: bytes) -> None:
        assert self._literal is not None
        self._segments.append(self._literal.value())
        self._literal = None
        self.setLineMode(rest)

    def _literals_allowed(self) -> int:
        config = self.node.config.imap
        return config.preauth_max_literals if self.state == "unauth" else config.max_literals_per_command

    def _start_command_deadline(self) -> None:
        """A command with literals must arrive whole in time (a byte every 20 s kept one for 640 s)."""
        config = self.node.config.imap
        seconds = config.login_timeout if self.state == "unauth" else config.command_timeout
        self._cancel_command_deadline()
        self._command_deadline = self.node.reactor.callLater(seconds, self._command_too_slow)

    def _cancel_command_deadline(self) -> None:
        if self._command_deadline is not None and self._command_deadline.active():
            self._command_deadline.cancel()
        self._command_deadline = None

    def _command_too_slow(self) -> None:
        self._command_deadline = None
        log.info("imap.command_timeout", user=self.user, remote=self._peer)
        self._discard_command()
        self.sendLine(b"* BYE Command not received in time.")
        self._disconnect()

    def _literal_limit(self) -> int:
        if self.state == "unauth":
            return self.node.config.imap.preauth_max_literal_size  # APPEND needs a login anyway
        first = self._segments[0] if self._segments else b""
        words = first.split(b" ", 3) if isinstance(first, bytes) else []
        verb = b" ".join(words[1:3]).upper() if len(words) > 1 else b""
        if verb.startswith(b"APPEND") or verb.startswith(b"UID APPEND"):
            return self.node.config.imap.max_literal_size
        return SMALL_LITERAL_LIMIT

    def _reject_command(self, status: bytes, text: bytes) -> None:
        first = self._segments[0] if self._segments else b""
        tag = first.split(b" ", 1)[0] if isinstance(first, bytes) and first else b"*"
        self._discard_command()
        self.sendLine(tag + b" " + status + b" " + text)

    def _discard_command(self) -> None:
        for segment in self._segments:
            if isinstance(segment, Literal):
                segment.close()
        if self._literal is not None:
            self._literal.close()
        self._segments, self._command_size, self._literal = [], 0, None
        self._literal_count = 0
        self._cancel_command_deadline()

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, segments: list[bytes | Literal]) -> None:
        reader = CommandReader(segments)
        try:
            tag = reader.tag()
        except (ParseError, TypeError):
            self.sendLine(b"* BAD Invalid tag.")
            return
        try:
            reader.sp()
            name = reader.command_name()
        except ParseError:
            self.sendLine(tag + b" BAD Missing or invalid command name.")
            return
        self.pauseProducing()
        self._busy = True
        self._written_at_check = self._written
        d = Deferred.fromCoroutine(self._run(tag, name, reader))
        d.addErrback(self._unexpected, tag)
        d.addBoth(lambda _: self._command_done(segments))

    def _command_done(self, segments: list[bytes | Literal]) -> None:
        self._busy = False
        # Inactivity is counted from the end of the answer, not from the
        # command line: a long FETCH must not eat into the client's idle time.
        self.resetTimeout()
        for segment in segments:
            if isinstance(segment, Literal):
                segment.close()
        if not self._closed and not self._closing and not self._output_full():
            self.resumeProducing()  # else once the client has read its replies (_output_changed)

    def _output_changed(self, closed: bool) -> None:
        """Stop reading a client that does not read its replies; start again once it did.

        Input is already paused while a command runs; between commands, and in
        IDLE, this is what keeps unread responses from growing without end.
        """
        if self._closed or self._closing:
            return
        if closed:
            if not self.handshaking:  # the TLS layer holds our greeting back: keep reading
                self.pauseProducing()
        elif not self._busy or self._continuation is not None:
            self.resumeProducing()

    def _output_full(self) -> bool:
        return self._gate.closed and not self.handshaking

    def _unexpected(self, failure: Failure, tag: bytes) -> None:
        if failure.check(_ConnectionGone):
            return
        log.error("imap.command_crashed", user=self.user, traceback=failure.getTraceback())
        if not self._closed and not self._closing:
            self.sendLine(tag + b" NO [SERVERBUG] Internal error occurred.")

    async def _run(self, tag: bytes, name: str, reader: CommandReader) -> None:
        found = self._find_command(tag, name, reader)
        if found is None:
            return
        handler, name, uid = found
        try:
            status, text = b"OK", await (handler(tag, reader, uid) if uid else handler(tag, reader))
        except _COMMAND_ERRORS as e:
            status, text = self._command_failed(name, e)
        if self._closed or self._closing:
            return
        if self.selected is not None and self._events_may_be_lost():
            self.selected.dirty = True  # the store is the only news
        await self._report(allow_expunge=name not in NO_EXPUNGE_DURING or uid)
        if self._closed or self._closing:
            return  # the report said BYE: a tagged reply after it would only confuse
        self.sendLine(tag + b" " + status + (b" " + text if text else b""))
        if self._starttls_after_reply:
            self._switch_to_tls()
        if self._failures >= MAX_LOGIN_FAILURES:
            self._bye(b"Too many failed logins.")

    def _find_command(self, tag: bytes, name: str, reader: CommandReader) -> tuple[Handler, str, bool] | None:
        """The handler for this command (after a UID prefix), or None once BAD was sent."""
        uid = False
        if name == "UID" and self.state == "select":
            try:
                reader.sp()
                name = reader.command_name()
            except ParseError:
                self.sendLine(tag + b" BAD Missing UID command.")
                return None
            if name not in ("FETCH", "STORE", "SEARCH", "COPY", "MOVE", "EXPUNGE"):
                self.sendLine(tag + b" BAD Unknown UID command.")
                return None
            uid = True
        command = _COMMANDS.get(name)
        if command is None:
            self.sendLine(tag + b" BAD Unknown command.")
            return None
        method, states = command
        if self.state not in states:
            self.sendLine(tag + b" BAD Command not permitted in this state.")
            return None
        return getattr(self, method), name, uid

    def _command_failed(self, name: str, error: Exception) -> tuple[bytes, bytes]:
        """The tagged status and text for a command that raised one of _COMMAND_ERRORS."""
        if isinstance(error, (ParseError, BadSequence)):
            return b"BAD", str(error).encode()
        if isinstance(error, ImapNo):
            return b"NO", _coded(error.code, str(error))
        if isinstance(error, InvalidName):
            return b"NO", _coded("CANNOT", str(error))
        if isinstance(error, NotFound):
            return b"NO", _coded("NONEXISTENT", str(error))
        if isinstance(error, AlreadyExists):
            return b"NO", _coded("ALREADYEXISTS", str(error))
        if isinstance(error, TemporaryFailure):
            log.warning("imap.store_unavailable", user=self.user, command=name, error=str(error))
            return b"NO", _coded("UNAVAILABLE", "Temporary failure, try again later.")
        log.error("imap.content_unavailable", user=self.user, command=name, error=str(error))
        return b"NO", _coded("SERVERBUG", "Message content is unavailable.")

    # -- keeping the client's view up to date ------------------------------------------------

    async def _report(self, allow_expunge: bool, force: bool = False) -> None:
        """Sync the selected mailbox from the store if needed, then tell the client."""
        await self._sync_lock.acquire()
        try:
            selected = self.selected
            if selected is None:
                return
            if self._selected_deleted:
                self._bye(b"Selected mailbox was deleted, have to disconnect.")
                return
            if selected.dirty or force:
                selected.dirty = False
                try:
                    changes = await self.node.store.imap_changes(selected.mailbox.id, selected.highest_modseq)
                    self._last_sync = self.node.reactor.seconds()
                except TemporaryFailure as e:
                    selected.dirty = True
                    log.warning("imap.sync_failed", user=self.user, error=str(e))
                    return
                except NotFound:
                    # Deleted while its event never reached us (another node, bus down).
                    self._bye(b"Selected mailbox was deleted, have to disconnect.")
                    return
                new = selected.apply_changes(changes)
                if new and not selected.readonly:
                    first_recent = await self.node.store.imap_claim_recent(selected.mailbox.id)
                    selected.add_recent(u for u in new if u >= first_recent)
            if self.selected is selected and not self._closed:
                for line in selected.drain_updates(allow_expunge):
                    self.sendLine(b"* " + line)
        finally:
            self._sync_lock.release()

    def _events_may_be_lost(self) -> bool:
        """Whether events of the selected mailbox may not have reached this session:
        the bus is down, or it reconnected since the session last looked (the
        node's queue and bindings were gone for a while), or the session has
        not looked for IDLE_POLL seconds (an event can be lost at its sender:
        a node whose own bus was down when it made the change).  Counts as looking."""
        bus = self.node.bus
        if not bus.connected() or self.node.reactor.seconds() - self._last_sync >= IDLE_POLL:
            return True
        generation = bus.generation()
        if generation != self._bus_generation:
            self._bus_generation = generation
            return True
        return False

    def _on_event(self, event: Event) -> None:
        selected = self.selected
        if selected is None or event.mailbox_id != selected.mailbox.id:
            if event.mailbox_id == self._selecting:
                self._missed_event = True  # SELECT is loading it: sync once it is loaded
            return
        if isinstance(event, MailboxDeleted):
            self._selected_deleted = True
        selected.dirty = True
        if self._idling:
            Deferred.fromCoroutine(self._report(allow_expunge=True)).addErrback(
                lambda f: log.error("imap.idle_report_failed", error=f.getErrorMessage())
            )

    def _bye(self, text: bytes) -> None:
        if not self._closed and not self._closing:
            self.sendLine(b"* BYE " + text)
            self._disconnect()

    async def _select_mailbox(self, mailbox: Mailbox, readonly: bool) -> SelectedMailbox:
        self._drop_registration()
        self._selecting, self._missed_event = mailbox.id, False
        self._bus_generation = self.node.bus.generation()  # the snapshot below is read after it
        self._registration = await self.node.bus.register(self._on_event, str(mailbox.id))
        if self._closed:
            self._drop_registration()  # the client left while the bus was binding
        try:
            first_recent = None if readonly else await self.node.store.imap_claim_recent(mailbox.id)
            snapshot = await self.node.store.imap_snapshot(mailbox.id)
            self._last_sync = self.node.reactor.seconds()
        finally:
            self._selecting = None
        selected = SelectedMailbox(snapshot, readonly, first_recent, self.node.config.imap.max_keywords)
        # A change whose event came while the snapshot was being read may or
        # may not be in it: look again at the end of this command.
        selected.dirty = self._missed_event
        self.selected = selected
        self._selected_deleted = False
        self.state = "select"
        return selected

    def _unselect(self) -> None:
        self._drop_registration()
        self.selected = None
        self._selected_deleted = False
        if self.state == "select":
            self.state = "auth"

    def _drop_registration(self) -> None:
        registration, self._registration = self._registration, None
        if registration is not None:
            registration.unregister()

    def _untagged(self, line: bytes) -> None:
        self.sendLine(b"* " + line)

    # -- any state ------------------------------------------------------------------------------

    async def cmd_capability(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        self._untagged(self._capability_line())
        return b"Capability completed."

    async def cmd_noop(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        if self.selected is not None:
            self.selected.dirty = True
        return b"NOOP completed."

    async def cmd_logout(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        self._untagged(b"BYE Logging out")
        self.sendLine(tag + b" OK Logout completed.")
        self._unselect()
        self.state = "logout"
        self._disconnect()
        self._closed = True
        return b""

    async def cmd_id(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        client: dict[str, str] = {}
        if r.peek_char() == b"(":
            values = r.paren_list(r.nstring)
            if len(values) % 2 or len(values) > 60:
                raise ParseError("ID takes up to 30 field/value pairs")
            client = {
                (k or b"").decode("utf-8", "replace")[:30]: (v or b"").decode("utf-8", "replace")[:1024]
                for k, v in zip(values[::2], values[1::2], strict=True)
            }
        else:
            if r.atom().upper() != b"NIL":
                raise ParseError("expected a list or NIL")
        r.end()
        if client:
            log.info("imap.client_id", remote=self._peer, client=client)
        self._untagged(b'ID ("name" "twisted-mail-cluster" "version" ' + wire.string(__version__) + b")")
        return b"ID completed."

    # -- not authenticated --------------------------------------------------------------------

    def _plaintext_allowed(self) -> bool:
        return self.node.guard.plaintext_allowed(self._peer, encrypted=self.encrypted)

    async def cmd_starttls(self, tag: bytes, r: CommandReader) -> bytes:
        """RFC 3501 6.2.1 / 9051 6.2.1: the tagged OK goes out in clear, then the handshake."""
        r.end()
        if self.node.tls is None:
            raise ImapNo("STARTTLS is not available on this server.")
        if self.tls_started:
            raise ParseError("TLS is already active")
        self._starttls_after_reply = True
        return b"Begin TLS negotiation now."

    def _switch_to_tls(self) -> None:
        self._starttls_after_reply = False
        assert self.node.tls is not None  # cmd_starttls checked
        # Anything pipelined after STARTTLS was sent in clear and may be an
        # attacker's: it is never run (CVE-2011-0411).  Input is paused while a
        # command runs, so all of it still sits in the line buffer.
        self.clearLineBuffer()
        self._discard_command()
        self.start_tls(self.node.tls)

    async def cmd_login(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        user = r.astring()
        r.sp()
        password = r.astring()
        r.end()
        return await self._login(user, password)

    async def cmd_authenticate(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        mechanism = r.atom().upper()
        initial: bytes | None = None
        if not r.at_end():
            r.sp()
            initial = r.atom()
            if initial == b"=":
                initial = b""  # RFC 4959: "=" is an empty initial response
        r.end()
        if mechanism != b"PLAIN":
            raise ImapNo("Unsupported authentication mechanism.")
        if not self._plaintext_allowed():
            raise ImapNo(
                "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
                "PRIVACYREQUIRED",
            )
        if initial is None:
            self.sendLine(b"+ ")
            initial = await self._read_continuation()
            if initial.strip() == b"*":
                raise ParseError("Authentication aborted by client")
        try:
            decoded = base64.b64decode(initial.strip(), validate=True)
            authzid, authcid, password = decoded.split(b"\0")
        except (binascii.Error, ValueError):
            raise ParseError("Invalid base64 SASL PLAIN response") from None
        if authzid and authzid != authcid:
            raise ImapNo("Authorization identity not allowed.", "AUTHORIZATIONFAILED")
        return await self._login(authcid, password)

    def _read_continuation(self) -> Deferred[bytes]:
        self._continuation = Deferred()
        d = self._continuation
        self.resumeProducing()
        return d

    async def _login(self, user: bytes, password: bytes) -> bytes:
        host = self._peer
        if not self._plaintext_allowed():
            raise ImapNo(
                "Plaintext authentication disallowed on non-secure (SSL/TLS) connections.",
                "PRIVACYREQUIRED",
            )
        portal = self.node.portal(IAccount, self._make_account)
        guard = self.node.guard
        try:
            avatar, _ = await guarded_login(
                guard, host, portal, UsernamePassword(user, password), IAccount, ImapAccount
            )
        except LoginThrottled as e:
            log.info("login.refused", protocol="imap", user=loggable_user(user), remote=host, reason=e.reason)
            raise ImapNo("Too many login attempts, try again later.", "UNAVAILABLE") from None
        except WrongPassword as e:
            log.info("login.failure", protocol="imap", user=loggable_user(user), remote=host)
            self._failures += 1
            await deferLater(self.node.reactor, e.delay, lambda: None)
            raise ImapNo("Authentication failed.", "AUTHENTICATIONFAILED") from None
        limits = self.node.connections.get("imap")
        if limits is not None:
            if not limits.log_in(avatar.address, host):
                log.info("login.refused", protocol="imap", user=avatar.address, remote=host,
                         reason="too many sessions of this user from this address")
                raise ImapNo(
                    "Maximum number of connections from user+IP exceeded "
                    f"(max_userip_connections={limits.per_user_and_address})",
                    "LIMIT",
                )
            self._user_counted = True
        self.user = avatar.address
        self.state = "auth"
        self.setTimeout(self.POSTAUTH_TIMEOUT)
        log.info("login.success", protocol="imap", user=self.user, remote=host, **self.tls_log_fields())
        return b"[" + self._capability_line() + b"] Logged in"

    async def _make_account(self, address: str) -> ImapAccount:
        await self.node.accounts.inbox(address)
        return ImapAccount(address)

    # -- authenticated ----------------------------------------------------------------------

    async def cmd_enable(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        while True:
            r.atom()
            if r.at_end():
                break
            r.sp()
        r.end()
        # No extension that needs enabling is offered yet (CONDSTORE and
        # QRESYNC will be): RFC 5161 says to list only what got enabled.
        self._untagged(b"ENABLED")
        return b"Enabled."

    async def cmd_namespace(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        self._untagged(b'NAMESPACE (("" "' + HIERARCHY_DELIMITER.encode() + b'")) NIL NIL')
        return b"Namespace completed."

    async def cmd_select(self, tag: bytes, r: CommandReader) -> bytes:
        return await self._select(r, readonly=False)

    async def cmd_examine(self, tag: bytes, r: CommandReader) -> bytes:
        return await self._select(r, readonly=True)

    async def _select(self, r: CommandReader, readonly: bool) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.end()
        self._unselect()
        assert self.user is not None
        mailbox = await self.node.store.get_mailbox(self.user, name)
        if mailbox is None:
            raise ImapNo("Mailbox doesn't exist: " + name, "NONEXISTENT")
        selected = await self._select_mailbox(mailbox, readonly)
        for line in selected.flags_response()[:1]:
            self._untagged(line)
        self._untagged(b"%d EXISTS" % selected.exists)
        self._untagged(b"%d RECENT" % len(selected.recent))
        first_unseen = selected.first_unseen()
        if first_unseen is not None:
            self._untagged(b"OK [UNSEEN %d] First unseen." % first_unseen)
        self._untagged(selected.flags_response()[1])
        self._untagged(b"OK [UIDVALIDITY %d] UIDs valid" % mailbox.uidvalidity)
        self._untagged(b"OK [UIDNEXT %d] Predicted next UID" % selected.uidnext)
        mode = b"[READ-ONLY]" if readonly else b"[READ-WRITE]"
        return mode + (b" Examine completed." if readonly else b" Select completed.")

    async def cmd_create(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        raw = r.mailbox()
        r.end()
        name = check_mailbox_name(raw.rstrip(HIERARCHY_DELIMITER) or raw)
        assert self.user is not None
        if name == INBOX or await self.node.store.get_mailbox(self.user, name) is not None:
            raise ImapNo("Mailbox already exists", "ALREADYEXISTS")
        refusal = await mailbox_room_refusal(self.node.store, self.user, name, self.node.config.imap)
        if refusal:
            raise ImapNo(refusal, "LIMIT")
        await self.node.mailboxes.create_mailbox(self.user, name)
        return b"Create completed."

    async def cmd_delete(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.end()
        assert self.user is not None
        mailbox = await self.node.mailboxes.delete_mailbox(self.user, name)
        if self.selected is not None and self.selected.mailbox.id == mailbox.id:
            self._unselect()
        return b"Delete completed."

    async def cmd_rename(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        old = check_mailbox_name(r.mailbox())
        r.sp()
        new = check_mailbox_name(r.mailbox())
        r.end()
        assert self.user is not None
        refusal = await mailbox_room_refusal(
            self.node.store, self.user, new, self.node.config.imap, creates_name=(old == INBOX)
        )
        if refusal:
            raise ImapNo(refusal, "LIMIT")
        await self.node.mailboxes.rename_mailbox(self.user, old, new)
        return b"Rename completed."

    async def cmd_subscribe(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.end()
        assert self.user is not None
        await self.node.store.subscribe(self.user, name)
        return b"Subscribe completed."

    async def cmd_unsubscribe(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.end()
        assert self.user is not None
        try:
            await self.node.store.unsubscribe(self.user, name)
        except NotFound:
            raise ImapNo("Not subscribed to " + name) from None
        return b"Unsubscribe completed."

    async def cmd_list(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        selection: set[str] = set()
        if r.peek_char() == b"(":
            selection = {a.decode("ascii").upper() for a in r.paren_list(r.atom)}
            r.sp()
        reference = r.list_mailbox()
        r.sp()
        if r.peek_char() == b"(":
            patterns = r.paren_list(r.list_mailbox)
        else:
            patterns = [r.list_mailbox()]
        returns: set[str] = set()
        if not r.at_end():
            r.sp()
            if r.atom().upper() != b"RETURN":
                raise ParseError("expected RETURN")
            r.sp()
            returns = {a.decode("ascii").upper() for a in r.paren_list(r.atom)}
        r.end()
        await self._list(b"LIST", reference, patterns, selection, returns)
        return b"List completed."

    async def cmd_lsub(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        reference = r.list_mailbox()
        r.sp()
        pattern = r.list_mailbox()
        r.end()
        await self._list(b"LSUB", reference, [pattern], {"SUBSCRIBED"}, set())
        return b"Lsub completed."

    async def _list(
        self, verb: bytes, reference: str, patterns: list[str], selection: set[str], returns: set[str]
    ) -> None:
        assert self.user is not None
        if patterns == [""]:
            # RFC 3501 6.3.8: the hierarchy delimiter and root name.
            self._untagged(verb + b' (\\Noselect) "' + HIERARCHY_DELIMITER.encode() + b'" ""')
            return
        boxes = await self.node.store.list_mailboxes(self.user)
        by_name = {m.name: m for m in boxes}
        subscribed = set(await self.node.store.list_subscriptions(self.user))
        only_subscribed = "SUBSCRIBED" in selection
        only_special = "SPECIAL-USE" in selection
        regexes = [list_pattern(reference, p) for p in patterns]

        def matches(name: str) -> bool:
            return any(rx.match(name) for rx in regexes)

        names = {n for n in (subscribed if only_subscribed else by_name) if matches(n)}
        superiors = with_inferiors(by_name)
        # RFC 3501 6.3.9: with "foo/bar" subscribed but not "foo", LSUB "" "%"
        # must return "foo" flagged \Noselect - the superior that the
        # pattern reaches - rather than nothing.  LIST does the same for a
        # superior that is no mailbox (6.3.8; CREATE makes parents, so only a
        # race with DELETE or a hand-made store leaves one).
        noselect: set[str] = set()
        if verb == b"LSUB":
            for name in subscribed:
                if not matches(name):
                    noselect.update(p for p in parents(name) if p not in subscribed and matches(p))
        elif not only_subscribed:
            noselect.update(p for p in superiors if p not in by_name and matches(p))
        for name in sorted(names | noselect):
            mailbox = by_name.get(name)
            if only_special and (mailbox is None or mailbox.special_use is None):
                continue
            attributes = []
            if name in noselect:
                attributes.append("\\Noselect")
                if verb == b"LIST":
                    attributes.append("\\HasChildren")
            elif mailbox is None:
                attributes.append("\\NonExistent" if verb == b"LIST" else "\\Noselect")
            else:
                attributes.append("\\HasChildren" if name in superiors else "\\HasNoChildren")
                if mailbox.special_use:
                    attributes.append(mailbox.special_use)
            if verb == b"LIST" and (only_subscribed or "SUBSCRIBED" in returns) and name in subscribed:
                attributes.append("\\Subscribed")
            self._untagged(
                verb + b" (" + " ".join(attributes).encode() + b') "'
                + HIERARCHY_DELIMITER.encode() + b'" ' + wire.mailbox_name(name)
            )

    async def cmd_status(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.sp()
        items = [a.decode("ascii").upper() for a in r.paren_list(r.atom)]
        r.end()
        unknown = [i for i in items if i not in _STATUS_ITEMS]
        if unknown or not items:
            raise ParseError("unknown STATUS item " + (unknown[0] if unknown else "(none)"))
        assert self.user is not None
        mailbox = await self.node.store.get_mailbox(self.user, name)
        if mailbox is None:
            raise ImapNo("Mailbox doesn't exist: " + name, "NONEXISTENT")
        selected = self.selected
        if selected is not None and selected.mailbox.id == mailbox.id:
            # STATUS of the selected mailbox (RFC 9051 6.3.11 discourages it,
            # clients do it): bring the client's view up to date first, then
            # answer from that view, so STATUS agrees with the EXISTS it just
            # got and counts the \Recent messages this session holds.
            selected.dirty = True
            await self._report(allow_expunge=True)
            if self._closing:
                return b""
        status = await self.node.store.imap_status(mailbox.id)
        values = {
            "MESSAGES": status.messages, "RECENT": status.recent, "UIDNEXT": status.uidnext,
            "UIDVALIDITY": status.uidvalidity, "UNSEEN": status.unseen,
            "HIGHESTMODSEQ": status.highest_modseq, "SIZE": status.size,
        }
        if selected is not None and self.selected is selected and selected.mailbox.id == mailbox.id:
            values.update(
                MESSAGES=selected.exists, RECENT=len(selected.recent), UIDNEXT=selected.uidnext,
                UNSEEN=selected.unseen_count(), HIGHESTMODSEQ=selected.highest_modseq,
            )
        body = " ".join(f"{item} {values[item]}" for item in items).encode()
        self._untagged(b"STATUS " + wire.mailbox_name(name) + b" (" + body + b")")
        return b"Status completed."

    async def cmd_append(self, tag: bytes, r: CommandReader) -> bytes:
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.sp()
        flags: list[str] = []
        date = None
        if r.peek_char() == b"(":
            flags = r.flag_list()
            r.sp()
        if r.peek_char() == b'"':
            date = r.date_time()
            r.sp()
        value = r.string_or_literal()
        r.end()
        if any(f == RECENT for f in flags):
            raise ParseError("\\Recent cannot be stored")
        raw = value.open().read() if isinstance(value, Literal) else value
        if not raw:
            raise ImapNo("Can't save a zero byte message.")
        if len(raw) > self.node.config.imap.max_literal_size:
            raise ImapNo("Message too big.", "TOOBIG")
        assert self.user is not None
        mailbox = await self.node.store.get_mailbox(self.user, name)
        if mailbox is None:
            raise ImapNo("Mailbox doesn't exist: " + name, "TRYCREATE")
        known = await keywords_of(self.node.store, self.selected, mailbox) if new_keywords(flags, {}) else {}
        refusal = flag_list_refusal(flags, known, self.node.config.imap, creating=True)
        if refusal:
            raise ImapNo(refusal, "LIMIT")
        prepared = await self.node.mailboxes.prepare(raw)
        delivered = await self.node.mailboxes.deliver(prepared, [(mailbox, frozenset(flags))], date)
        if self.selected is not None and self.selected.mailbox.id == mailbox.id:
            self.selected.dirty = True
        uid = delivered[0].uid
        return b"[APPENDUID %d %d] Append completed." % (mailbox.uidvalidity, uid or 0)

    async def cmd_idle(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        if self.selected is not None:
            self.selected.dirty = True
            await self._report(allow_expunge=True)
        self.sendLine(b"+ idling")
        self._idling = True
        keepalive = self._every(IDLE_KEEPALIVE, lambda: self.sendLine(b"* OK Still here"))
        poll = self._every(IDLE_CHECK, self._poll_while_idle)
        try:
            line = await self._read_continuation()
        finally:
            self._idling = False
            keepalive.stop()
            poll.stop()
        if line.strip().upper() != b"DONE":
            raise ParseError("Expected DONE.")
        return b"Idle completed."

    def _poll_while_idle(self) -> None:
        """Look at the store every IDLE_POLL seconds, and every IDLE_CHECK while
        events may be lost (the bus is down, or just came back)."""
        self._idle_ticks += 1
        if self.selected is None:
            return
        if not self._events_may_be_lost() and self._idle_ticks * IDLE_CHECK < IDLE_POLL:
            return
        self._idle_ticks = 0
        self.selected.dirty = True
        Deferred.fromCoroutine(self._report(allow_expunge=True)).addErrback(
            lambda f: log.error("imap.idle_poll_failed", error=f.getErrorMessage())
        )

    def _every(self, seconds: float, action: Callable[[], None]) -> LoopingCall:
        timer = LoopingCall(action)
        timer.clock = self.node.reactor
        timer.start(seconds, now=False)
        return timer

    # -- selected ---------------------------------------------------------------------------

    def _current(self) -> SelectedMailbox:
        assert self.selected is not None
        return self.selected

    async def cmd_check(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        self._current().dirty = True
        return b"Check completed."

    async def cmd_close(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        selected = self._current()
        if not selected.readonly:
            await self.node.mailboxes.expunge(selected.mailbox)
        self._unselect()
        return b"Close completed."

    async def cmd_unselect(self, tag: bytes, r: CommandReader) -> bytes:
        r.end()
        self._unselect()
        return b"Unselect completed."

    async def cmd_expunge(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        uids: list[int] | None = None
        if uid:
            r.sp()
            uids = self._current().resolve(r.sequence_set(), True)
        r.end()
        selected = self._current()
        if selected.readonly:
            raise ImapNo("Mailbox is read-only.", "READ-ONLY")
        removed = await self.node.mailboxes.expunge(selected.mailbox, uids)
        selected.mark_expunged(x.uid for x in removed if x.uid is not None)
        return b"Expunge completed."

    async def cmd_search(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        r.sp()
        charset, key = r.search_program()
        if charset is not None and charset.upper() not in ("UTF-8", "US-ASCII"):
            raise ImapNo("Unsupported charset", "BADCHARSET (UTF-8 US-ASCII)")
        if count_keys(key) > self.node.config.imap.max_search_keys:
            raise ImapNo(f"Too many search keys (at most {self.node.config.imap.max_search_keys}).", "LIMIT")
        selected = self._current()
        matched = await Searcher(self.node.store, selected).run(key)
        numbers = matched if uid else [selected.seq_of(u) or 0 for u in matched]
        self._untagged(b"SEARCH" + (b" " + wire.number_list(numbers) if numbers else b""))
        return b"Search completed."

    async def cmd_fetch(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        r.sp()
        sequence = r.sequence_set()
        r.sp()
        attributes = r.fetch_attributes()
        r.end()
        selected = self._current()
        uids = selected.resolve(sequence, uid)
        fetcher = Fetcher(self.node.store, self.node.mailboxes, selected, self._write_counted, self._gate)
        outcome = await fetcher.run(uids, attributes, uid)
        if outcome.damaged:
            raise ImapNo("Some message content is unavailable.", "SERVERBUG")
        if outcome.expunge_issued:
            raise ImapNo("Some messages were expunged.", "EXPUNGEISSUED")
        return b"Fetch completed."

    async def cmd_store(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        r.sp()
        sequence = r.sequence_set()
        r.sp()
        unchanged_since = None
        if r.peek_char() == b"(":
            r.expect(b"(")
            if r.atom().upper() != b"UNCHANGEDSINCE":
                raise ParseError("unknown STORE modifier")
            r.sp()
            unchanged_since = r.number64()
            r.expect(b")")
            r.sp()
        item = r.atom().upper()
        r.sp()
        flags = r.flag_list()
        r.end()
        modes = {b"FLAGS": FlagMode.REPLACE, b"+FLAGS": FlagMode.ADD, b"-FLAGS": FlagMode.REMOVE}
        silent = item.endswith(b".SILENT")
        mode = modes.get(item.removesuffix(b".SILENT"))
        if mode is None:
            raise ParseError("expected FLAGS, +FLAGS or -FLAGS")
        flags = [f for f in flags if f != RECENT]
        selected = self._current()
        if selected.readonly:
            raise ImapNo("Mailbox is read-only.", "READ-ONLY")
        refusal = flag_list_refusal(flags, selected.keywords, self.node.config.imap, mode is not FlagMode.REMOVE)
        if refusal:
            raise ImapNo(refusal, "LIMIT")
        uids = selected.resolve(sequence, uid)
        live = selected.live_uids(uids)
        result = await self.node.mailboxes.store_flags(selected.mailbox, live, mode, flags, unchanged_since)
        selected.apply_own(result.updated)
        for line in selected.keyword_updates():
            self._untagged(line)
        if not silent:
            for u in live:
                if u in result.modified:
                    continue
                line = b"%d FETCH (FLAGS %s" % (selected.seq_of(u) or 0, wire.flag_list(selected.flags(u)))
                self._untagged(line + (b" UID %d)" % u if uid else b")"))
        if result.modified:
            raise ImapNo(
                "Some messages were modified.", "MODIFIED " + format_uid_set(result.modified).decode()
            )
        if len(live) < len(uids):
            raise ImapNo("Some messages were expunged.", "EXPUNGEISSUED")
        return b"Store completed."

    async def cmd_copy(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        return await self._copy_or_move(r, uid, move=False)

    async def cmd_move(self, tag: bytes, r: CommandReader, uid: bool = False) -> bytes:
        return await self._copy_or_move(r, uid, move=True)

    async def _copy_or_move(self, r: CommandReader, uid: bool, move: bool) -> bytes:
        r.sp()
        sequence = r.sequence_set()
        r.sp()
        name = check_mailbox_name(r.mailbox())
        r.end()
        selected = self._current()
        if move and selected.readonly:
            raise ImapNo("Mailbox is read-only.", "READ-ONLY")
        uids = selected.resolve(sequence, uid)
        if len(selected.live_uids(uids)) < len(uids):
            raise ImapNo("Some of the requested messages no longer exist.", "EXPUNGEISSUED")
        assert self.user is not None
        target = await self.node.store.get_mailbox(self.user, name)
        if target is None:
            raise ImapNo("Mailbox doesn't exist: " + name, "TRYCREATE")
        refusal = await copy_refusal(self.node.store, selected, uids, target, self.node.config.imap)
        if refusal:
            raise ImapNo(refusal, "LIMIT")
        if not uids:
            return b"No messages found." if uid else b"Copy completed."
        if move:
            copied, removed = await self.node.mailboxes.move(selected.mailbox, uids, target)
        else:
            copied, removed = await self.node.mailboxes.copy(selected.mailbox, uids, target), []
        if target.id == selected.mailbox.id:
            selected.dirty = True
        code = b""
        if copied:
            code = b"[COPYUID %d %s %s]" % (
                target.uidvalidity,
                format_uid_set(c.source_uid for c in copied),
                format_uid_set(c.delivered.uid or 0 for c in copied),
            )
        if move:
            if code:
                self._untagged(b"OK " + code + b" Moved UIDs.")
            selected.mark_expunged(x.uid for x in removed if x.uid is not None)
            return b"Move completed."
        return code + b" Copy completed." if code else b"Copy completed."


def _coded(code: str | None, text: str) -> bytes:
    return (f"[{code}] " if code else "").encode() + text.encode("utf-8", "replace")


_STATUS_ITEMS = frozenset({"MESSAGES", "RECENT", "UIDNEXT", "UIDVALIDITY", "UNSEEN", "HIGHESTMODSEQ", "SIZE"})

_COMMANDS: dict[str, tuple[str, frozenset[str]]] = {
    "CAPABILITY": ("cmd_capability", ANY),
    "NOOP": ("cmd_noop", ANY),
    "LOGOUT": ("cmd_logout", ANY),
    "ID": ("cmd_id", ANY),
    "LOGIN": ("cmd_login", frozenset({"unauth"})),
    "AUTHENTICATE": ("cmd_authenticate", frozenset({"unauth"})),
    "STARTTLS": ("cmd_starttls", frozenset({"unauth"})),
    "ENABLE": ("cmd_enable", AUTHENTICATED),
    "NAMESPACE": ("cmd_namespace", AUTHENTICATED),
    "SELECT": ("cmd_select", AUTHENTICATED),
    "EXAMINE": ("cmd_examine", AUTHENTICATED),
    "CREATE": ("cmd_create", AUTHENTICATED),
    "DELETE": ("cmd_delete", AUTHENTICATED),
    "RENAME": ("cmd_rename", AUTHENTICATED),
    "SUBSCRIBE": ("cmd_subscribe", AUTHENTICATED),
    "UNSUBSCRIBE": ("cmd_unsubscribe", AUTHENTICATED),
    "LIST": ("cmd_list", AUTHENTICATED),
    "LSUB": ("cmd_lsub", AUTHENTICATED),
    "STATUS": ("cmd_status", AUTHENTICATED),
    "APPEND": ("cmd_append", AUTHENTICATED),
    "IDLE": ("cmd_idle", AUTHENTICATED),
    "CHECK": ("cmd_check", SELECTED),
    "CLOSE": ("cmd_close", SELECTED),
    "UNSELECT": ("cmd_unselect", SELECTED),
    "EXPUNGE": ("cmd_expunge", SELECTED),
    "SEARCH": ("cmd_search", SELECTED),
    "FETCH": ("cmd_fetch", SELECTED),
    "STORE": ("cmd_store", SELECTED),
    "COPY": ("cmd_copy", SELECTED),
    "MOVE": ("cmd_move", SELECTED),
}


class IMAPFactory(ServerFactory):
    def __init__(self, node: Node) -> None:
        self.node = node

    def buildProtocol(self, addr: object) -> IMAPServer:
        protocol = IMAPServer(self.node)
        protocol.factory = self
        return protocol
