"""TLS configuration, certificate checks, the self-signed certificate, SNI choice, trace fields."""

from __future__ import annotations

import datetime
import textwrap
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.python import usage

from twisted_mail_cluster.config import CertificateConfig, ConfigError, TLSConfig, load_config
from twisted_mail_cluster.options import MailClusterOptions
from twisted_mail_cluster.smtp.headers import trace_fields
from twisted_mail_cluster.tls.certificates import (
    CertificateError,
    ensure_self_signed,
    fingerprint,
    load_key_pair,
    self_signed_paths,
)
from twisted_mail_cluster.tls.server import ServerTLS


@pytest.fixture(autouse=True)
def in_tmp_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config_file(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def make_pair(folder: Path, name: str, *, days: int = 30, dns: tuple[str, ...] | None = None,
              encrypt: bool = False) -> tuple[Path, Path]:
    """A self-signed certificate and its key as PEM files (the tests' own, no CA needed)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=60))
        .not_valid_after(now + datetime.timedelta(days=days))
    )
    if dns is not None:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False)
    certificate = builder.sign(key, hashes.SHA256())
    folder.mkdir(parents=True, exist_ok=True)
    certificate_path, key_path = folder / f"{name}.pem", folder / f"{name}.key"
    certificate_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    encryption = (serialization.BestAvailableEncryption(b"secret") if encrypt
                  else serialization.NoEncryption())
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           encryption))
    key_path.chmod(0o600)
    return certificate_path, key_path


# -- configuration --------------------------------------------------------------------------


def test_no_tls_section_means_the_self_signed_certificate(in_tmp_dir: Path) -> None:
    config = load_config()
    assert config.tls == TLSConfig(certificates=())
    assert config.imap.listen_tls == ("tcp:2993:interface=127.0.0.1",)
    assert config.pop3.listen_tls == ("tcp:2995:interface=127.0.0.1",)
    assert config.imap.login_timeout == 60.0


def test_the_default_certificate_then_the_sni_entries_in_order(in_tmp_dir: Path) -> None:
    path = config_file(in_tmp_dir / "c.toml", """\
        [tls]
        certificate = "a/fullchain.pem"
        private_key = "a/privkey.pem"
        [[tls.sni]]
        certificate = "b.pem"
        private_key = "b.key"
        names = ["mail.example.org", "*.Example.NET"]
        [[tls.sni]]
        certificate = "c.pem"
        private_key = "c.key"
    """)
    assert load_config(path).tls.certificates == (
        CertificateConfig(in_tmp_dir / "a/fullchain.pem", in_tmp_dir / "a/privkey.pem", (), "tls"),
        CertificateConfig(in_tmp_dir / "b.pem", in_tmp_dir / "b.key", ("mail.example.org", "*.example.net"),
                          "tls.sni[0]"),
        CertificateConfig(in_tmp_dir / "c.pem", in_tmp_dir / "c.key", (), "tls.sni[1]"),
    )


@pytest.mark.parametrize(("text", "message"), [
    ('[tls]\ncertificate = "a.pem"\n', "tls.private_key: is required with tls.certificate"),
    ('[tls]\nprivate_key = "a.key"\n', "tls.certificate: is required with tls.private_key"),
    ('[[tls.sni]]\ncertificate = "a.pem"\n', "tls.sni[0].private_key: is required with tls.sni[0].certificate"),
    ('[[tls.sni]]\ncertificate = "a"\nprivate_key = "b"\nnames = ["not a name"]\n',
     'tls.sni[0].names: "not a name" is not a host name'),
    ('[[tls.sni]]\ncertificate = "a"\nprivate_key = "b"\ncerts = 1\n',
     "tls.sni[0].certs: unknown key"),
    ('[tls]\nsni = "x"\n', 'tls.sni: must be a list of tables ([[tls.sni]] entries), got "x"'),
    ('[imap]\nlisten_tls = "ssl:993:privateKey=k.pem"\n',
     'imap.listen_tls: takes plain endpoints such as "tcp:993" (the TLS is the node\'s own, with the [tls] '
     'certificates), got "ssl:993:privateKey=k.pem"'),
    ('[imap]\nenabled = false\nlisten_tls = "tcp:993"\n',
     "imap.listen_tls: IMAP is disabled (imap.enabled = false), so it cannot listen; remove the listener "
     "or enable IMAP"),
    ('[pop3]\nlisten = "tcp:2110"\nlisten_tls = "tcp:2110"\n',
     'pop3.listen_tls: "tcp:2110" uses the same port as pop3.listen ("tcp:2110")'),
])
def test_bad_tls_settings_are_one_line_naming_the_key(in_tmp_dir: Path, text: str, message: str) -> None:
    path = config_file(in_tmp_dir / "c.toml", text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(message), str(info.value)


def parse(*args: str) -> MailClusterOptions:
    options = MailClusterOptions()
    options.parseOptions(list(args))
    return options


def test_imaps_and_pop3s_options_replace_the_implicit_tls_listeners() -> None:
    config = parse("--imaps", "tcp:993", "--imaps", "tcp:1993", "--pop3s", "tcp:995").config
    assert config.imap.listen_tls == ("tcp:993", "tcp:1993")
    assert config.pop3.listen_tls == ("tcp:995",)
    assert config.imap.listen == ("tcp:2143:interface=127.0.0.1",)


def test_no_protocol_silences_its_implicit_tls_listener_too() -> None:
    config = parse("--no-imap", "--no-pop3").config
    assert (config.imap.listen_tls, config.pop3.listen_tls) == ((), ())
    with pytest.raises(usage.UsageError, match="--imaps and --no-imap cannot be used together"):
        parse("--no-imap", "--imaps", "tcp:993")


# -- certificate files ----------------------------------------------------------------------


def test_a_pair_is_read_with_its_names(tmp_path: Path) -> None:
    certificate, key = make_pair(tmp_path, "mail.example.org", dns=("Mail.Example.org", "imap.example.org"))
    pair = load_key_pair(certificate, key)
    assert pair.names == ("mail.example.org", "imap.example.org")
    assert pair.warnings == ()
    assert fingerprint(pair.leaf).count(":") == 31


def test_without_subject_alt_names_the_common_name_is_the_name(tmp_path: Path) -> None:
    assert load_key_pair(*make_pair(tmp_path, "old.example.org")).names == ("old.example.org",)


def test_what_a_pair_must_not_be(tmp_path: Path) -> None:
    certificate, key = make_pair(tmp_path, "one")
    _, other_key = make_pair(tmp_path, "two")
    with pytest.raises(CertificateError, match=rf"^tls.private_key: {other_key} is not the key of the certificate"):
        load_key_pair(certificate, other_key)
    locked_certificate, locked = make_pair(tmp_path, "locked", encrypt=True)
    with pytest.raises(CertificateError, match="is encrypted; the node needs the key without a passphrase"):
        load_key_pair(locked_certificate, locked)
    expired, expired_key = make_pair(tmp_path, "expired", days=-1)
    with pytest.raises(CertificateError, match=r"^tls.certificate: the certificate in .* expired on "):
        load_key_pair(expired, expired_key)
    with pytest.raises(CertificateError, match=rf"^tls.sni\[2\].certificate: cannot read {tmp_path}"):
        load_key_pair(tmp_path, key, "tls.sni[2]")  # a folder: "Is a directory"


def test_a_key_other_users_can_read_is_only_a_warning(tmp_path: Path) -> None:
    certificate, key = make_pair(tmp_path, "open")
    key.chmod(0o640)
    (warning,) = load_key_pair(certificate, key).warnings
    assert warning == f"tls.private_key: {key} can be read by other users (mode 0640); chmod 600 it"


def test_the_self_signed_pair_is_made_once_and_made_again_for_another_host_name(tmp_path: Path) -> None:
    first, made = ensure_self_signed(tmp_path, "mx.example.org")
    assert made and first.names == ("mx.example.org", "localhost")
    certificate, key = self_signed_paths(tmp_path)
    assert oct(key.stat().st_mode & 0o777) == "0o600" and oct(key.parent.stat().st_mode & 0o777) == "0o700"
    again, made = ensure_self_signed(tmp_path, "mx.example.org")
    assert not made and fingerprint(again.leaf) == fingerprint(first.leaf)
    renamed, made = ensure_self_signed(tmp_path, "mail.example.org")
    assert made and renamed.names[0] == "mail.example.org"
    certificate.write_text("damaged")
    repaired, made = ensure_self_signed(tmp_path, "mail.example.org")
    assert made and repaired.names[0] == "mail.example.org"


# -- choosing by SNI ------------------------------------------------------------------------


def test_sni_names_map_to_their_certificate_exact_then_one_wildcard_label(tmp_path: Path) -> None:
    a = make_pair(tmp_path, "a", dns=("mail.example.org",))
    b = make_pair(tmp_path, "b", dns=("ignored.other.test",))
    server_tls = ServerTLS(TLSConfig((
        CertificateConfig(*a, (), "tls"),
        CertificateConfig(*b, ("*.example.net",), "tls.sni[0]"),
    )), tmp_path, "mx.example.org")
    loaded = server_tls.load()
    assert loaded.context_for("mail.example.org") is loaded.default
    wildcard = loaded.context_for("imap.example.net")
    assert wildcard is not None and wildcard is not loaded.default
    assert loaded.context_for("ignored.other.test") is None  # configured names replace the certificate's
    assert loaded.context_for("a.b.example.net") is None  # a wildcard covers one label only
    assert [p.names for p in loaded.pairs] == [("mail.example.org",), ("ignored.other.test",)]


# -- Received ----------------------------------------------------------------------------------


def test_received_names_the_tls_in_use_as_postfix_does() -> None:
    fields = trace_fields(
        sender="a@remote.test", helo=b"client.test", peer_ip="192.0.2.7", hostname="mx.example.org",
        with_protocol="ESMTPS", transaction="ABC", recipients=["b@example.org"],
        when=datetime.datetime(2026, 12, 7, 12, 0, tzinfo=datetime.timezone.utc),
        tls="TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits)",
    )
    assert fields.decode().splitlines() == [
        "Return-Path: <a@remote.test>",
        "Received: from client.test ([192.0.2.7])",
        "\t(using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256/256 bits))",
        "\tby mx.example.org (twisted-mail-cluster) with ESMTPS id ABC",
        "\tfor <b@example.org>; Mon, 07 Dec 2026 12:00:00 +0000",
    ]
