"""The server side of every TLS handshake of a node: policy, certificates by SNI, reloads.

One :class:`ServerTLS` serves every implicit-TLS listener and every
STARTTLS/STLS of a node, so the policy is the same everywhere:

* TLS 1.2 and 1.3 only; Mozilla's "intermediate" cipher list for TLS 1.2
  (TLS 1.3's suites are all of that standard already); no compression; no
  client-initiated renegotiation (TLS 1.2's renegotiation was a DoS lever and
  the root of CVE-2009-3555);
* the certificate is chosen by the name the client asks for (SNI), the first
  configured one otherwise, so one node can serve several mail domains;
* ``kill -HUP`` reads the files again (certbot renewals): new handshakes get the
  new certificates, connections already open keep theirs, and a reload that
  fails keeps everything as it was and logs why.
"""

from __future__ import annotations

import signal
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import structlog
from OpenSSL import SSL
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet.threads import deferToThreadPool
from zope.interface import implementer

from ..config import TLSConfig
from ..twisted_types import INodeReactor
from .certificates import CertificateError, KeyPair, ensure_self_signed, fingerprint, load_key_pair

__all__ = ["INTERMEDIATE_CIPHERS", "ServerTLS", "TLSReloadService", "load_server_tls"]

log = structlog.get_logger(__name__)

#: Mozilla's "intermediate" TLS 1.2 suites (ssl-config.mozilla.org, version 5.7),
#: in its order: forward secrecy and AEAD only.
INTERMEDIATE_CIPHERS = b":".join([
    b"ECDHE-ECDSA-AES128-GCM-SHA256", b"ECDHE-RSA-AES128-GCM-SHA256",
    b"ECDHE-ECDSA-AES256-GCM-SHA384", b"ECDHE-RSA-AES256-GCM-SHA384",
    b"ECDHE-ECDSA-CHACHA20-POLY1305", b"ECDHE-RSA-CHACHA20-POLY1305",
    b"DHE-RSA-AES128-GCM-SHA256", b"DHE-RSA-AES256-GCM-SHA384", b"DHE-RSA-CHACHA20-POLY1305",
])


@dataclass(frozen=True)
class _Certificates:
    """One loaded generation: the default context and the others by name."""

    pairs: tuple[KeyPair, ...]
    default: SSL.Context
    by_name: Mapping[str, SSL.Context]
    self_signed: bool

    def context_for(self, name: str) -> SSL.Context | None:
        """The context for an SNI name: exact, then one wildcard label (``*.example.org``)."""
        context = self.by_name.get(name)
        if context is None and "." in name:
            context = self.by_name.get("*." + name.split(".", 1)[1])
        return context


@implementer(IOpenSSLServerConnectionCreator)
class ServerTLS:
    """What Twisted's TLS layer asks for a new server-side connection (implicit TLS or STARTTLS)."""

    def __init__(self, config: TLSConfig, data_dir: Path, hostname: str) -> None:
        self._config = config
        self._data_dir = data_dir
        self._hostname = hostname
        self._current: _Certificates | None = None

    # -- loading -----------------------------------------------------------------

    def load(self) -> _Certificates:
        """Read every file and build the contexts; raise CertificateError naming the file.

        Blocking (file reads, a key generation the first time without a
        certificate): at start-up, or in a thread (:meth:`reload`).
        """
        self_signed = not self._config.certificates
        # Each pair with the names SNI finds it by: those configured, else its own.
        if self_signed:
            pair, _ = ensure_self_signed(self._data_dir, self._hostname)
            named = [(pair, pair.names)]
        else:
            named = []
            for c in self._config.certificates:
                pair = load_key_pair(c.certificate, c.private_key, c.key_name)
                named.append((pair, c.names or pair.names))
        by_name: dict[str, SSL.Context] = {}
        contexts = []
        for pair, names in named:
            context = self._context(pair)
            contexts.append(context)
            for name in names:
                by_name.setdefault(name.lower(), context)  # the first certificate for a name wins
        loaded = _Certificates(tuple(p for p, _ in named), contexts[0], by_name, self_signed)
        for context in contexts:
            context.set_tlsext_servername_callback(lambda connection: self._choose(loaded, connection))
        return loaded

    def install(self, loaded: _Certificates) -> None:
        """Make ``loaded`` what new handshakes use (reactor thread)."""
        self._current = loaded

    def start(self) -> list[str]:
        """Load at start-up; the warnings to log (the certificates' own, and self-signed)."""
        loaded = self.load()
        self.install(loaded)
        warnings = [w for pair in loaded.pairs for w in pair.warnings]
        if loaded.self_signed:
            pair = loaded.pairs[0]
            warnings.append(
                f"tls: no certificate configured, using the self-signed {pair.certificate_path} for "
                f"{', '.join(pair.names)} (SHA-256 {fingerprint(pair.leaf)}); clients will ask to trust it, "
                "set [tls] certificate and private_key for a real one"
            )
        return warnings

    def reload(self, reactor: INodeReactor) -> Deferred[bool]:
        """Read the files again in a thread; fire with whether the new ones are in use."""
        d = deferToThreadPool(reactor, reactor.getThreadPool(), self.load)

        def loaded(certificates: _Certificates) -> bool:
            self.install(certificates)
            for pair in certificates.pairs:
                for warning in pair.warnings:
                    log.warning("tls.certificate_warning", problem=warning)
            log.info(
                "tls.reloaded",
                certificates=[{"file": str(p.certificate_path), "names": list(p.names),
                               "sha256": fingerprint(p.leaf)} for p in certificates.pairs],
            )
            return True

        def failed(failure: object) -> bool:
            reason = getattr(failure, "value", failure)
            problem = str(reason) if isinstance(reason, CertificateError) else repr(reason)
            log.error("tls.reload_failed", problem=problem, kept="the certificates in use before")
            return False

        return d.addCallbacks(loaded, failed)

    @property
    def certificates(self) -> tuple[KeyPair, ...]:
        return self._loaded().pairs

    def _loaded(self) -> _Certificates:
        if self._current is None:
            raise RuntimeError("ServerTLS used before start()")
        return self._current

    # -- the handshake -----------------------------------------------------------

    def serverConnectionForTLS(self, tlsProtocol: object) -> SSL.Connection:
        return SSL.Connection(self._loaded().default, None)

    @staticmethod
    def _choose(loaded: _Certificates, connection: SSL.Connection) -> None:
        """SNI: switch to the certificate for the name the client asked for, if we have one."""
        requested = connection.get_servername()
        if not requested:
            return
        context = loaded.context_for(requested.decode("ascii", "replace").lower().rstrip("."))
        if context is not None and context is not loaded.default:
            connection.set_context(context)

    @staticmethod
    def _context(pair: KeyPair) -> SSL.Context:
        context = SSL.Context(SSL.TLS_SERVER_METHOD)
        context.set_min_proto_version(SSL.TLS1_2_VERSION)
        context.set_options(SSL.OP_NO_COMPRESSION | SSL.OP_NO_RENEGOTIATION)
        # Idle connections give their read and write buffers back (about 34 KiB
        # each): an IMAP server holds thousands of idle TLS sessions.
        context.set_mode(SSL.MODE_RELEASE_BUFFERS)
        context.set_cipher_list(INTERMEDIATE_CIPHERS)
        context.set_session_id(b"twisted-mail-cluster")
        context.use_certificate(pair.leaf)
        for extra in pair.chain[1:]:
            context.add_extra_chain_cert(extra)
        context.use_privatekey(pair.key)
        context.check_privatekey()
        return context


def load_server_tls(config: TLSConfig, data_dir: Path, hostname: str) -> tuple[ServerTLS, list[str]]:
    """The node's ServerTLS, loaded; raises CertificateError for the operator's one line."""
    server_tls = ServerTLS(config, data_dir, hostname)
    return server_tls, server_tls.start()


class TLSReloadService(Service):
    """``kill -HUP`` reloads the certificate files (what certbot's deploy hook sends)."""

    def __init__(self, server_tls: ServerTLS, reactor: INodeReactor) -> None:
        self._server_tls = server_tls
        self._reactor = reactor
        self._previous: object = None
        #: The reload in progress, if any (tests and the manhole can wait for it).
        self.reloading: Deferred[bool] | None = None

    def startService(self) -> None:
        super().startService()
        self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)  # type: ignore[arg-type]  # what signal() gave back
        return super().stopService()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        # A signal handler runs between two bytecodes of the main thread: hand over.
        self._reactor.callFromThread(self.reload)

    def reload(self) -> Deferred[bool]:
        log.info("tls.reload_requested")
        self.reloading = self._server_tls.reload(self._reactor)
        return self.reloading
