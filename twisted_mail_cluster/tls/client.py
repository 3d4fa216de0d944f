"""TLS for the links on which a node is the client: Cassandra and RabbitMQ.

Both links carry what an attacker on the network wants (RabbitMQ's password,
every stored message), so both verify the server the same way: its
certificate must chain to a CA of the configured PEM file (the system's trust
store when none is configured) and must name the host the node connects to.
Contact points and broker URLs are often IP addresses, and an IP address is
only matched by an IP subjectAltName, never by a DNS name or the common name.
TLS 1.2 is the oldest version accepted (1.0 and 1.1 are deprecated, RFC 8996).

The two links use different TLS stacks, so there are two builders here:
cassandra-driver wraps its own sockets with the standard library's
``ssl.SSLContext``; the RabbitMQ bus runs on the reactor and gets Twisted's
pyOpenSSL connection creator.  The CA file is read with ``cryptography`` by
:func:`read_ca_certificates`, which the configuration also uses at load time,
so a missing or unreadable file stops the node before it opens a port.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import (
    Certificate,
    TLSVersion,
    optionsForClientTLS,
    platformTrust,
    trustRootFromCertificates,
)

__all__ = [
    "CAFileError",
    "read_ca_certificates",
    "stdlib_context",
    "twisted_creator",
    "describe_tls_failure",
]

PEM_CERTIFICATE = b"-----BEGIN CERTIFICATE-----"


class CAFileError(ValueError):
    """A CA file that cannot be used; the message names the file and why, in one line."""


def read_ca_certificates(path: Path) -> list[x509.Certificate]:
    """The certificates of a PEM file (one or more ``BEGIN CERTIFICATE`` blocks)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise CAFileError(f"file not found: {path}") from None
    except OSError as e:
        raise CAFileError(f"cannot read {path}: {e.strerror or e}") from None
    if PEM_CERTIFICATE not in data:
        raise CAFileError(f"no PEM certificate (-----BEGIN CERTIFICATE-----) in {path}")
    try:
        return x509.load_pem_x509_certificates(data)
    except ValueError as e:
        raise CAFileError(f"unreadable PEM certificate in {path}: {e}") from None


def stdlib_context(ca_file: Path | None) -> ssl.SSLContext:
    """A client context for cassandra-driver: verify the chain and the host name, TLS 1.2+.

    ``PROTOCOL_TLS_CLIENT`` turns on ``check_hostname`` and ``CERT_REQUIRED``;
    they are set again below so that the intent is visible.  The driver
    passes each connection's own endpoint address as ``server_hostname``
    (cassandra/connection.py, ``_wrap_socket_from_context``), so every node
    of the ring is checked against its own address.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = True
    if ca_file is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        read_ca_certificates(ca_file)  # the same one-line errors as at configuration time
        context.load_verify_locations(cafile=str(ca_file))
    return context


def twisted_creator(hostname: str, ca_file: Path | None) -> IOpenSSLClientConnectionCreator:
    """A connection creator for ``wrapClientTLS``: verify the chain and ``hostname``, TLS 1.2+.

    ``optionsForClientTLS`` checks the name with service_identity (an IP
    address against IP subjectAltNames) and sends SNI only for DNS names.
    Twisted's own minimum is TLS 1.2 today; asking for it keeps it so.
    """
    if ca_file is None:
        trust = platformTrust()
    else:
        certificates = [Certificate.loadPEM(c.public_bytes(Encoding.PEM)) for c in read_ca_certificates(ca_file)]
        trust = trustRootFromCertificates(certificates)
    return optionsForClientTLS(
        hostname, trustRoot=trust, extraCertificateOptions={"raiseMinimumTo": TLSVersion.TLSv1_2}
    )


def describe_tls_failure(error: BaseException, ca_key: str) -> str | None:
    """One line an operator can act on for a failed TLS handshake; None if ``error`` is not one.

    ``ca_key`` is the configuration key of the CA file, named in the advice.
    """
    from OpenSSL import SSL
    from service_identity import VerificationError

    if isinstance(error, VerificationError):
        names = ", ".join(_mismatched_names(error)) or "the host connected to"
        return f"TLS: the server's certificate does not name {names} (the host name or IP address connected to)"
    if isinstance(error, SSL.Error):
        reasons = _openssl_reasons(error)
        return f"TLS handshake failed ({reasons}): {_advice(reasons, ca_key)}"
    if isinstance(error, ssl.SSLCertVerificationError):
        detail = error.verify_message or str(error)
        return f"TLS handshake failed (certificate verify failed: {detail}): {_advice('certificate verify', ca_key)}"
    if isinstance(error, ssl.SSLError):
        return f"TLS handshake failed ({error.reason or error}): {_advice(str(error.reason), ca_key)}"
    return None


def _mismatched_names(error: BaseException) -> list[str]:
    """The names service_identity looked for in the certificate and did not find."""
    names = []
    for mismatch in getattr(error, "errors", ()):
        wanted = getattr(mismatch, "mismatched_id", None)
        name = getattr(wanted, "ip", None) or getattr(wanted, "hostname", None)
        if name is not None:
            names.append(str(name))
    return names


def _advice(reasons: str, ca_key: str) -> str:
    if "certificate verify" in reasons or "unknown ca" in reasons:
        return (f"the server's certificate does not verify against the CAs of {ca_key} (the system's trust "
                "store when unset): signed by another CA, or expired")
    if "wrong version number" in reasons or "packet length" in reasons or "record layer" in reasons:
        return "the server did not answer in TLS: is that port its TLS listener?"
    if "protocol version" in reasons or "no protocols available" in reasons or "unsupported protocol" in reasons:
        return "the server offers no TLS version we accept (1.2 or newer)"
    return f"check the server's TLS listener and {ca_key}"


def _openssl_reasons(error: BaseException) -> str:
    """pyOpenSSL's error list ``[(library, function, reason), ...]`` as its reasons."""
    entries = error.args[0] if error.args else []
    if isinstance(entries, list):
        reasons = [str(entry[-1]) for entry in entries if isinstance(entry, tuple) and entry]
        if reasons:
            return "; ".join(reasons)
    return str(error) or type(error).__name__
