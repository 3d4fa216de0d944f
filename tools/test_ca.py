#!/usr/bin/env python3
"""A certificate authority for the test servers' TLS listeners (Cassandra, RabbitMQ).

``tools/cassandra.py`` and ``tools/rabbitmq.py`` load this file by path (as
the tests load those tools) when a node is started with TLS; nothing else
needs it.  It imports ``cryptography`` only inside its functions: that
package is in the project's venv, not in a bare ``python3``, and the tools'
other commands (``fetch``, ``status``, ...) must keep working without it.

* The CA is a directory (default ``.cache/test-ca``, or
  ``MAILCLUSTER_TEST_CA``): ``ca.pem`` (give it to clients as their CA file)
  and ``ca.key`` (mode 0600).  It is made once and kept, so a client's CA
  file stays valid across server restarts.
* A server's files are ``server.pem`` (its certificate, then the CA's),
  ``server.key`` (mode 0600), ``server-keystore.pem`` (key and chain in one
  file, mode 0600: the form of a PEM "keystore" for Java) and ``ca.pem`` (a
  copy of the CA certificate), in a directory of the node.  The certificate names the node's loopback
  addresses as IP subjectAltNames (clients that connect to an address check
  it against those) and ``localhost`` as a DNS name.  It is issued again
  only when the CA, the names or the validity no longer fit.

Keys are ECDSA P-256: quick to make, and every TLS stack in play (OpenSSL,
Erlang's ssl, Java's JSSE) speaks it.  These certificates are for tests and
the one-machine demo only.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CA_DIR = Path(os.environ.get("MAILCLUSTER_TEST_CA", REPO_ROOT / ".cache" / "test-ca")).resolve()
CA_NAME = "mailcluster test CA"
CA_DAYS = 3650
SERVER_DAYS = 825
#: a server certificate closer than this to its end is issued again
RENEW_BEFORE = datetime.timedelta(days=30)


class TestCAError(Exception):
    """A failure the user can act on; the message says what to do."""

    __test__ = False  # not a pytest test class, whatever its name


@dataclass(frozen=True)
class ServerFiles:
    """What a TLS listener needs: its certificate chain, its key, and the CA to hand to clients."""

    certificate: Path
    key: Path
    ca: Path
    #: the key, then the chain, in one file (Cassandra's PEM keystore)
    key_and_chain: Path


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A standard-library client context that verifies a server against ``ca_file``
    (chain and address, TLS 1.2 or newer); no ``cryptography`` needed."""
    context = ssl.create_default_context(cafile=str(ca_file))
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


def _crypto() -> Any:
    """The cryptography package, or an error that says where it is."""
    try:
        import cryptography  # noqa: F401
    except ImportError:
        raise TestCAError(
            "TLS test certificates need the 'cryptography' package: run the tool with the project's "
            f"venv ({REPO_ROOT / '.venv' / 'bin' / 'python'} tools/...)"
        ) from None
    from cryptography import x509

    return x509


def _write_private(path: Path, data: bytes) -> None:
    """A key file only its owner can read, replaced atomically."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    tmp.replace(path)


def _write_public(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


def _new_key() -> Any:
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: Any) -> bytes:
    """PKCS#8, unencrypted: what Cassandra's PEMBasedSslContextFactory and Erlang both read."""
    from cryptography.hazmat.primitives import serialization

    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _cert_pem(cert: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.PEM)


def ensure_ca(ca_dir: Path | None = None, name: str = CA_NAME) -> Path:
    """Make the CA in ``ca_dir`` (default DEFAULT_CA_DIR) unless it is there; the path of its ``ca.pem``."""
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    ca_dir = Path(ca_dir or DEFAULT_CA_DIR)
    cert_path, key_path = ca_dir / "ca.pem", ca_dir / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path
    ca_dir.mkdir(parents=True, exist_ok=True)
    key = _new_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject).issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    _write_private(key_path, _key_pem(key))  # the key first: a ca.pem without its key is never left behind
    _write_public(cert_path, _cert_pem(cert))
    return cert_path


def _load_ca(ca_dir: Path) -> tuple[Any, Any]:
    x509 = _crypto()
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate((ca_dir / "ca.pem").read_bytes())
    key = serialization.load_pem_private_key((ca_dir / "ca.key").read_bytes(), password=None)
    return cert, key


def _wanted_names(addresses: Sequence[str], dns_names: Sequence[str]) -> list[Any]:
    x509 = _crypto()
    names: list[Any] = [x509.DNSName(n) for n in dns_names]
    for address in addresses:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(address)))
        except ValueError:
            raise TestCAError(f"not an IP address: {address!r}") from None
    return names


def _still_fits(cert_path: Path, ca_cert: Any, names: list[Any]) -> bool:
    """Whether the server certificate there is the CA's, for exactly these names, and not near its end."""
    x509 = _crypto()
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        cert.verify_directly_issued_by(ca_cert)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except Exception:  # missing, unreadable, another CA's, no SAN: any doubt means issue it again
        return False
    return set(san) == set(names) and cert.not_valid_after_utc - _now() > RENEW_BEFORE


def server_files(out_dir: Path, addresses: Sequence[str], dns_names: Sequence[str] = ("localhost",),
                 ca_dir: Path | None = None, common_name: str = "mailcluster test server") -> ServerFiles:
    """The TLS files of a server listening on ``addresses`` (issued now unless those there still fit).

    ``ca_dir``: the CA's directory (default DEFAULT_CA_DIR, read at each call).
    """
    x509 = _crypto()
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    ca_dir = Path(ca_dir or DEFAULT_CA_DIR)
    ca_path = ensure_ca(ca_dir)
    ca_cert, ca_key = _load_ca(ca_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = ServerFiles(out_dir / "server.pem", out_dir / "server.key", out_dir / "ca.pem",
                        out_dir / "server-keystore.pem")
    names = _wanted_names(addresses, dns_names)
    _write_public(files.ca, ca_path.read_bytes())
    if files.key.is_file() and files.key_and_chain.is_file() and _still_fits(files.certificate, ca_cert, names):
        return files
    key = _new_key()
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SERVER_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    chain = _cert_pem(cert) + _cert_pem(ca_cert)
    _write_private(files.key, _key_pem(key))
    _write_private(files.key_and_chain, _key_pem(key) + chain)
    _write_public(files.certificate, chain)
    return files


def main(argv: Sequence[str] | None = None) -> int:
    """``test_ca.py [CA_DIR]``: make the CA (if needed) and print the path of its certificate."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        print(ensure_ca(Path(args[0]) if args else None))
    except (TestCAError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
