"""Where one connection stands with TLS; the same rules for SMTP, POP3 and IMAP.

A connection is in clear, in a handshake (implicit TLS from its first byte,
or after STARTTLS/STLS), or encrypted.  For the password rule
(:meth:`LoginGuard.plaintext_allowed`) a connection is protected from the
moment its handshake starts: nothing the client sends is read, and nothing we
write is sent, before the handshake is over.  That matters for the IMAP
greeting on an implicit-TLS port, written before the handshake and sent
after it: its capabilities must already be those of a TLS connection.

Two things a plain TLS layer gets wrong for a server, handled here:

* A handshake that never finishes (a client that connects and stalls) would
  keep its connection for ever: Twisted's ``loseConnection`` waits for the
  handshake to complete before it closes, so the protocols' idle timers call
  :meth:`TLSSession.abort_stalled_handshake`, which aborts instead.
* A failed handshake (garbage instead of a ClientHello, a protocol version we
  refuse) ends the connection with an OpenSSL error as its reason:
  :meth:`TLSSession.tls_connection_lost` logs that as one line.
"""

from __future__ import annotations

from typing import Literal

import structlog
from OpenSSL import SSL
from twisted.internet.interfaces import IHandshakeListener, ISSLTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from ..twisted_types import IServerTransport
from .server import ServerTLS

__all__ = ["TLSSession"]

log = structlog.get_logger(__name__)

TLSState = Literal["clear", "handshake", "encrypted"]


@implementer(IHandshakeListener)
class TLSSession:
    """Mixin for a protocol: its connection's TLS state, STARTTLS, and what to log."""

    transport: IServerTransport
    _tls_state: TLSState = "clear"

    def tls_connection_made(self) -> None:
        """Call from connectionMade: an implicit-TLS listener's transport is TLS already."""
        if ISSLTransport.providedBy(self.transport):
            self._tls_state = "handshake"

    def start_tls(self, server_tls: ServerTLS) -> None:
        """Switch to TLS now; the caller has sent its "go ahead" reply in clear already,
        and has thrown away whatever the client sent after its STARTTLS command."""
        self._tls_state = "handshake"
        self.transport.startTLS(server_tls)

    def handshakeCompleted(self) -> None:
        """Twisted's IHandshakeListener: the handshake is done, the connection is encrypted."""
        self._tls_state = "encrypted"

    @property
    def encrypted(self) -> bool:
        """Whether what crosses this connection from now on is TLS-protected (see above)."""
        return self._tls_state != "clear"

    @property
    def handshaking(self) -> bool:
        """Whether a handshake is under way.

        Twisted's TLS layer holds what we write until the handshake is done and
        meanwhile pauses our producer, as if the client did not read.  It must
        not stop us reading: the handshake needs the client's bytes.  Protocols
        therefore ignore back-pressure while this is true; a client that stalls
        its handshake is dropped by abort_stalled_handshake instead.
        """
        return self._tls_state == "handshake"

    @property
    def tls_started(self) -> bool:
        """Whether TLS is on or on its way (STARTTLS must not be offered again)."""
        return self.encrypted

    def tls_description(self) -> str | None:
        """As Postfix writes it in Received: ``TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)``."""
        if self._tls_state != "encrypted":
            return None
        connection = self.transport.getHandle()
        if not isinstance(connection, SSL.Connection):
            return None
        version = connection.get_protocol_version_name()
        cipher = connection.get_cipher_name()
        bits = connection.get_cipher_bits()
        return f"{version} with cipher {cipher} ({bits}/{bits} bits)"

    def tls_log_fields(self) -> dict[str, object]:
        """``tls`` for login lines: which connections carried passwords, and how."""
        description = self.tls_description()
        return {"tls": description} if description is not None else {}

    def close_connection(self) -> None:
        """Close once what was written has gone out.

        The producer (the connection's WriteGate) is let go first: Twisted's
        TLS layer starts its shutdown only when no producer is registered, so a
        TLS session that said goodbye would otherwise stay open for ever.
        """
        self.transport.unregisterProducer()
        self.transport.loseConnection()

    def abort_stalled_handshake(self, protocol: str, remote: str) -> bool:
        """From an idle timer: drop a connection whose handshake did not finish in time."""
        if self._tls_state != "handshake":
            return False
        log.info("tls.handshake_timeout", protocol=protocol, remote=remote)
        self.transport.abortConnection()
        return True

    def tls_connection_lost(self, reason: Failure, protocol: str, remote: str) -> None:
        """Call from connectionLost: a handshake that failed is worth one line.

        Only a TLS error counts: a client that connects and goes away without a
        byte (a port scan, a load balancer's health check) is no TLS problem.
        """
        if self._tls_state == "handshake" and reason.check(SSL.Error):
            log.info("tls.handshake_failed", protocol=protocol, remote=remote, error=_error_text(reason))


def _error_text(reason: Failure) -> str:
    """OpenSSL errors are lists of (library, function, reason) tuples: keep the reasons."""
    value = reason.value
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list):
        reasons = [str(item[-1]) for item in args[0] if isinstance(item, tuple) and item]
        if reasons:
            return "; ".join(reasons)
    return reason.getErrorMessage()
