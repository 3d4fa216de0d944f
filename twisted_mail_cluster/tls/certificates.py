"""Certificates and keys: read and checked from PEM files, or made self-signed.

Everything here is checked before a port opens (and again on each SIGHUP
reload), so that an operator hears about a wrong file once, in one line that
names it, rather than from every client's failed handshake later.  Files are
read by us, not by OpenSSL, so that the line says "permission denied" rather
than an OpenSSL error stack.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = [
    "CertificateError",
    "KeyPair",
    "SELF_SIGNED_DAYS",
    "fingerprint",
    "load_key_pair",
    "read_chain",
    "self_signed_paths",
    "ensure_self_signed",
]

#: Below Apple's 825-day ceiling for server certificates, which its clients
#: apply even to certificates a user chose to trust.
SELF_SIGNED_DAYS = 825
#: A self-signed certificate this close to its end is made anew at start-up.
RENEW_BEFORE = datetime.timedelta(days=30)

ServerKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey | ed448.Ed448PrivateKey


class CertificateError(ValueError):
    """One line for the operator: which file (or key) and what is wrong with it."""


@dataclass(frozen=True)
class KeyPair:
    """A certificate chain (leaf first) and its private key, read and checked."""

    certificate_path: Path
    key_path: Path
    chain: tuple[x509.Certificate, ...]
    key: ServerKey
    #: Host names the leaf certificate is for (SNI looks these up), lowercase.
    names: tuple[str, ...]
    #: Problems that do not stop the node (a private key other users can read).
    warnings: tuple[str, ...] = ()

    @property
    def leaf(self) -> x509.Certificate:
        return self.chain[0]


def fingerprint(certificate: x509.Certificate) -> str:
    """SHA-256 of the DER certificate, as clients show it (``AB:CD:...``)."""
    return ":".join(f"{b:02X}" for b in certificate.fingerprint(hashes.SHA256()))


def load_key_pair(certificate_path: Path, key_path: Path, key_name: str = "tls") -> KeyPair:
    """Read a PEM chain and key; raise CertificateError naming the file at fault.

    ``key_name`` is the config section the files come from (``tls``,
    ``tls.sni[1]``), so the message names the key the operator must fix.
    """
    chain = read_chain(certificate_path, f"{key_name}.certificate")
    key = _read_key(key_path, f"{key_name}.private_key")
    if _public_bytes(key) != _public_bytes(chain[0]):
        raise CertificateError(
            f"{key_name}.private_key: {key_path} is not the key of the certificate {certificate_path}"
        )
    warnings = []
    mode = stat.S_IMODE(key_path.stat().st_mode)
    if mode & 0o077:
        warnings.append(
            f"{key_name}.private_key: {key_path} can be read by other users (mode {mode:04o}); chmod 600 it"
        )
    return KeyPair(certificate_path, key_path, chain, key, certificate_names(chain[0]), tuple(warnings))


def certificate_names(certificate: x509.Certificate) -> tuple[str, ...]:
    """The DNS names a certificate is for: its subjectAltName, else its common name."""
    try:
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        names = [str(a.value) for a in certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    return tuple(dict.fromkeys(n.lower().rstrip(".") for n in names))


def _read(path: Path, key: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CertificateError(f"{key}: cannot read {path}: {e.strerror or e}") from None


def read_chain(path: Path, key: str) -> tuple[x509.Certificate, ...]:
    """The certificates of a PEM file, leaf first; CertificateError names ``key`` and the file."""
    data = _read(path, key)
    try:
        chain = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise CertificateError(f"{key}: {path} holds no PEM certificate") from None
    now = datetime.datetime.now(datetime.timezone.utc)
    if chain[0].not_valid_after_utc < now:
        raise CertificateError(f"{key}: the certificate in {path} expired on {chain[0].not_valid_after_utc:%Y-%m-%d}")
    return tuple(chain)


def _read_key(path: Path, key: str) -> ServerKey:
    data = _read(path, key)
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise CertificateError(f"{key}: {path} is encrypted; the node needs the key without a passphrase") from None
    except ValueError:
        raise CertificateError(f"{key}: {path} holds no PEM private key") from None
    if not isinstance(loaded, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                               ed25519.Ed25519PrivateKey, ed448.Ed448PrivateKey)):
        raise CertificateError(f"{key}: {path} holds a {type(loaded).__name__}, not a TLS server key")
    return loaded


def _public_bytes(item: ServerKey | x509.Certificate) -> bytes:
    return item.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ---------------------------------------------------------------------------
# The self-signed certificate of a node that has none configured


def self_signed_paths(data_dir: Path) -> tuple[Path, Path]:
    folder = data_dir / "tls"
    return folder / "self-signed.pem", folder / "self-signed.key"


def ensure_self_signed(data_dir: Path, hostname: str) -> tuple[KeyPair, bool]:
    """The data folder's self-signed pair, made now if missing, stale or not for ``hostname``.

    Fires with the pair and whether it was made now.  It is kept across
    restarts, so that a client that accepted it once is not asked again.
    """
    certificate_path, key_path = self_signed_paths(data_dir)
    if certificate_path.exists() and key_path.exists():
        try:
            pair = load_key_pair(certificate_path, key_path, "tls (self-signed)")
        except CertificateError:
            pair = None  # damaged or expired: make a new one below
        if pair is not None and hostname.lower() in pair.names and not _ends_soon(pair.leaf):
            return pair, False
    _write_self_signed(certificate_path, key_path, hostname)
    return load_key_pair(certificate_path, key_path, "tls (self-signed)"), True


def _ends_soon(certificate: x509.Certificate) -> bool:
    return certificate.not_valid_after_utc - datetime.datetime.now(datetime.timezone.utc) < RENEW_BEFORE


def _write_self_signed(certificate_path: Path, key_path: Path, hostname: str) -> None:
    """An ECDSA P-256 certificate for the host name, localhost and the loopback addresses.

    P-256 rather than RSA: every client of the last decade takes it, and a
    handshake costs the server a fraction of an RSA-2048 signature.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname)])
    names: list[x509.GeneralName] = [x509.DNSName(n) for n in dict.fromkeys([hostname.lower(), "localhost"])]
    names += [x509.IPAddress(ipaddress.ip_address(a)) for a in ("127.0.0.1", "::1")]
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=SELF_SIGNED_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    certificate_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    _write_private(key_path, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ))
    _write_private(certificate_path, certificate.public_bytes(serialization.Encoding.PEM))


def _write_private(path: Path, data: bytes) -> None:
    """Write whole or not at all, readable by this user only (whatever the umask)."""
    temporary = path.with_name(path.name + ".new")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an existing file keeps its mode through O_CREAT
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)
