"""TLS on every protocol, against a real node, with Python's clients and raw sockets.

Loopback is not trusted here (``auth.trusted_networks = []``), as any other
network would not be: a password must not cross in clear, and the same login
must work after STARTTLS/STLS and on the implicit-TLS ports.  Clients verify
the node's certificate (its self-signed one, or one from the test CA), as a
user who accepted it would.
"""

from __future__ import annotations

import hashlib
import imaplib
import poplib
import re
import random
import signal
import smtplib
import socket
import ssl
import subprocess
import time
from email.message import EmailMessage
from pathlib import Path
from types import ModuleType

import pytest
from OpenSSL import SSL

from tests.helpers.tools import load_tool

from tests.helpers.mailserver import (
    BIN,
    DOMAIN,
    PASSWORD,
    UNTRUSTED,
    LineClient,
    MailServer,
    admin,
    free_port,
    node_with,
)

ALICE = f"alice@{DOMAIN}"


def ca_tool() -> ModuleType:
    """tools/test_ca.py, the CA the test servers' certificates come from."""
    return load_tool("test_ca.py", "mailcluster_test_ca")


def trusting(node: MailServer) -> ssl.SSLContext:
    """A client that trusts the node's self-signed certificate (and checks the name on it)."""
    return ssl.create_default_context(cafile=str(node.data / "tls" / "self-signed.pem"))


def peer_fingerprint(sock: ssl.SSLSocket) -> str:
    der = sock.getpeercert(binary_form=True)
    assert der is not None
    return ":".join(f"{b:02X}" for b in hashlib.sha256(der).digest())


class Raw(LineClient):
    """A line client that can switch to TLS in the middle, as STARTTLS does."""

    def start_tls(self, context: ssl.SSLContext, server_hostname: str = "localhost") -> None:
        assert self.buffer == b"", f"unread before TLS: {self.buffer!r}"
        self.sock = context.wrap_socket(self.sock, server_hostname=server_hostname)

    def nothing_more(self, wait: float = 0.5) -> bytes:
        """What arrives unasked within ``wait`` seconds (nothing, from a sane server)."""
        self.sock.settimeout(wait)
        try:
            return self.buffer + self.sock.recv(65536)
        except (TimeoutError, socket.timeout, ssl.SSLWantReadError):
            return self.buffer

    def closed_by_server(self, within: float) -> bool:
        """Whether the server closed (or reset) the connection within ``within`` seconds."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            self.sock.settimeout(max(0.05, deadline - time.monotonic()))
            try:
                if self.sock.recv(65536) == b"":
                    return True
            except (TimeoutError, socket.timeout):
                continue
            except (ConnectionResetError, ssl.SSLError, OSError):
                return True
        return False


def wait_for_event(node: MailServer, event: str, timeout: float = 10, **fields: object) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        for e in node.log_events():
            if e["event"] == event and all(e.get(k) == v for k, v in fields.items()):
                return e
        if time.monotonic() > deadline:
            raise AssertionError(f"no {event} {fields} in the log")
        time.sleep(0.05)


# -- the password rule: TLS, or a trusted network --------------------------------------------


def test_clear_logins_are_refused_on_every_protocol_off_trusted_networks(untrusted: MailServer) -> None:
    imap = imaplib.IMAP4("127.0.0.1", untrusted.imap, timeout=10)
    assert {"STARTTLS", "LOGINDISABLED"} <= set(imap.capabilities)
    assert not [c for c in imap.capabilities if c.startswith("AUTH=")]
    with pytest.raises(imaplib.IMAP4.error, match="PRIVACYREQUIRED"):
        imap.login(ALICE, PASSWORD)
    imap.logout()

    pop = poplib.POP3("127.0.0.1", untrusted.pop3, timeout=10)
    capa = pop.capa()
    assert "STLS" in capa and "USER" not in capa and "SASL" not in capa
    with pytest.raises(poplib.error_proto, match=r"\[AUTH\] Plaintext authentication disallowed"):
        pop.user(ALICE)
    pop.quit()

    with smtplib.SMTP("127.0.0.1", untrusted.smtp, timeout=10) as smtp:
        smtp.ehlo("client.test")
        assert smtp.has_extn("starttls") and not smtp.has_extn("auth")
        code, text = smtp.docmd("AUTH", "PLAIN AGFsaWNlQGV4YW1wbGUudGVzdABw")
        assert (code, text[:6]) == (538, b"5.7.11"), text


def test_the_same_logins_work_after_starttls_and_on_the_implicit_tls_ports(untrusted: MailServer) -> None:
    context = trusting(untrusted)

    imap = imaplib.IMAP4("127.0.0.1", untrusted.imap, timeout=10)
    imap.starttls(context)
    capabilities = set(imap.capabilities)
    assert "AUTH=PLAIN" in capabilities and not {"STARTTLS", "LOGINDISABLED"} & capabilities
    assert imap.login(ALICE, PASSWORD)[0] == "OK"
    imap.logout()
    imaps = imaplib.IMAP4_SSL("localhost", untrusted.imaps, ssl_context=context, timeout=10)
    assert "AUTH=PLAIN" in imaps.capabilities and "STARTTLS" not in imaps.capabilities
    assert imaps.login(ALICE, PASSWORD)[0] == "OK"
    imaps.logout()

    pop = poplib.POP3("127.0.0.1", untrusted.pop3, timeout=10)
    pop.stls(context)
    capa = pop.capa()
    assert "USER" in capa and capa.get("SASL") == ["PLAIN"] and "STLS" not in capa
    pop.user(ALICE)
    assert pop.pass_(PASSWORD).startswith(b"+OK")
    pop.quit()
    pops = poplib.POP3_SSL("localhost", untrusted.pop3s, context=context, timeout=10)
    pops.user(ALICE)
    assert pops.pass_(PASSWORD).startswith(b"+OK")
    pops.quit()

    with smtplib.SMTP("127.0.0.1", untrusted.smtp, timeout=10) as smtp:
        smtp.ehlo("client.test")
        smtp.starttls(context=context)
        smtp.ehlo("client.test")
        assert smtp.has_extn("auth") and not smtp.has_extn("starttls")
        assert smtp.login(ALICE, PASSWORD)[0] == 235

    logins = [e for e in untrusted.log_events() if e["event"] == "login.success"]
    assert len(logins) == 5
    assert all(str(e.get("tls", "")).startswith("TLSv1.") for e in logins), logins


def test_the_imaps_greeting_already_offers_login(untrusted: MailServer) -> None:
    """The greeting is written before the handshake ends and sent after it: its capabilities
    must be those of a TLS connection (mbsync and Thunderbird take them from the greeting)."""
    with socket.create_connection(("127.0.0.1", untrusted.imaps), timeout=10) as sock:
        with trusting(untrusted).wrap_socket(sock, server_hostname="localhost") as tls:
            greeting = tls.recv(4096)
    assert greeting.startswith(b"* OK [CAPABILITY IMAP4rev1 ") and b" AUTH=PLAIN" in greeting, greeting
    assert b"LOGINDISABLED" not in greeting and b"STARTTLS" not in greeting, greeting


def test_received_records_esmtps_and_the_tls_version_and_cipher(untrusted: MailServer) -> None:
    """On the MX port: STARTTLS for anyone (opportunistic), and Postfix's trace of it."""
    context = trusting(untrusted)
    message = EmailMessage()
    message["Subject"] = "over tls"
    message.set_content("hello\n")
    with smtplib.SMTP("127.0.0.1", untrusted.smtp, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.send_message(message, "sender@remote.test", [ALICE])
        smtp.login(ALICE, PASSWORD)
        message.replace_header("Subject", "authenticated")
        smtp.send_message(message, ALICE, [ALICE])
    pop = poplib.POP3_SSL("localhost", untrusted.pop3s, context=context, timeout=10)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    traces = []
    for number in (1, 2):
        head = b"\n".join(pop.retr(number)[1]).split(b"\n\n", 1)[0].decode()
        traces.append(head.split("Received: ", 1)[1].split("Subject:", 1)[0])
    pop.quit()
    for trace, protocol in zip(traces, ("ESMTPS", "ESMTPSA")):
        assert re.search(r"\(using TLSv1\.3 with cipher TLS_\w+ \((\d+)/\1 bits\)\)", trace), trace
        assert f"with {protocol} id " in trace, trace


def test_starttls_offers_stop_once_tls_is_on_and_a_second_one_is_refused(untrusted: MailServer) -> None:
    context = trusting(untrusted)
    raw = Raw(untrusted.imap)
    raw.until(b"\r\n")
    raw.send(b"a STARTTLS\r\n")
    assert raw.until(b"\r\n").startswith(b"a OK")
    raw.start_tls(context)
    raw.send(b"b STARTTLS\r\n")
    assert raw.until(b"\r\n").startswith(b"b BAD")
    raw.close()

    pop = poplib.POP3("127.0.0.1", untrusted.pop3, timeout=10)
    pop.stls(context)
    with pytest.raises(poplib.error_proto, match="TLS active"):
        pop._shortcmd("STLS")  # type: ignore[attr-defined]  # poplib has no public way to send it twice
    pop.quit()

    with smtplib.SMTP("127.0.0.1", untrusted.smtp, timeout=10) as smtp:
        smtp.starttls(context=context)
        smtp.ehlo("client.test")
        assert smtp.docmd("STARTTLS")[0] == 554


def test_logging_out_over_tls_closes_the_connection(untrusted: MailServer) -> None:
    """The server ends a TLS session it said goodbye to (Twisted's TLS layer waits for the
    connection's producer to let go first; a session left open was seen on POP3S)."""
    context = trusting(untrusted)
    cases = [(untrusted.smtp, b"STARTTLS\r\n", b"220 ", b"QUIT\r\n", b"221 "),
             (untrusted.pop3, b"STLS\r\n", b"+OK", b"QUIT\r\n", b"+OK"),
             (untrusted.imap, b"a STARTTLS\r\n", b"a OK", b"b LOGOUT\r\n", b"b OK")]
    for port, start, started, logout, goodbye in cases:
        raw = Raw(port)
        raw.until(b"\r\n")
        raw.send(start)
        assert raw.until(b"\r\n").startswith(started)
        raw.start_tls(context)
        raw.send(logout)
        raw.until(goodbye)
        assert raw.closed_by_server(within=5), port
        raw.close()
    for port, logout, goodbye in ((untrusted.imaps, b"b LOGOUT\r\n", b"b OK"), (untrusted.pop3s, b"QUIT\r\n", b"+OK ")):
        raw = Raw(port)
        raw.start_tls(context)
        raw.until(b"\r\n")
        raw.send(logout)
        raw.until(goodbye)
        assert raw.closed_by_server(within=5), port
        raw.close()


# -- STARTTLS command injection (CVE-2011-0411): nothing pipelined after it runs ----------------


def test_smtp_lines_pipelined_after_starttls_are_thrown_away(untrusted: MailServer) -> None:
    raw = Raw(untrusted.smtp)
    raw.until(b"\r\n")
    raw.send(b"EHLO client.test\r\n")
    raw.until(b"250 ")
    raw.until(b"\r\n")
    raw.send(b"STARTTLS\r\nHELO injected.test\r\nMAIL FROM:<attacker@remote.test>\r\n")
    assert raw.until(b"\r\n").startswith(b"220 2.0.0")
    raw.start_tls(trusting(untrusted))
    assert raw.nothing_more() == b""  # the injected HELO and MAIL were never answered...
    raw.send(b"MAIL FROM:<a@remote.test>\r\n")
    # ...nor run: the session starts over, as if no HELO had been given (RFC 3207 4.2).
    assert raw.until(b"\r\n").startswith(b"503 5.5.1 Error: send HELO/EHLO first")
    raw.close()


def test_pop3_lines_pipelined_after_stls_are_thrown_away(untrusted: MailServer) -> None:
    raw = Raw(untrusted.pop3)
    raw.until(b"\r\n")
    raw.send(f"STLS\r\nUSER {ALICE}\r\n".encode())
    assert raw.until(b"\r\n").startswith(b"+OK")
    raw.start_tls(trusting(untrusted))
    assert raw.nothing_more() == b""
    raw.send(f"PASS {PASSWORD}\r\n".encode())
    assert raw.until(b"\r\n").startswith(b"-ERR No user name given")
    raw.close()


def test_imap_commands_pipelined_after_starttls_are_thrown_away(untrusted: MailServer) -> None:
    raw = Raw(untrusted.imap)
    raw.until(b"\r\n")
    raw.send(b'a STARTTLS\r\ni1 CAPABILITY\r\ni2 LOGIN "x" "y"\r\n')
    assert raw.until(b"\r\n").startswith(b"a OK")
    raw.start_tls(trusting(untrusted))
    assert raw.nothing_more() == b""
    raw.send(b"b NOOP\r\n")
    answer = raw.until(b"b OK")
    assert b"i1" not in answer and b"i2" not in answer
    raw.close()


# -- bad handshakes ----------------------------------------------------------------------------


def test_garbage_instead_of_a_client_hello_closes_that_connection_only(untrusted: MailServer) -> None:
    context = trusting(untrusted)
    session = imaplib.IMAP4_SSL("localhost", untrusted.imaps, ssl_context=context, timeout=10)
    session.login(ALICE, PASSWORD)
    noise = random.Random(7).randbytes(2000)
    for port in (untrusted.imaps, untrusted.pop3s):
        raw = Raw(port)
        raw.send(noise)
        assert raw.closed_by_server(within=5)
        raw.close()
    raw = Raw(untrusted.smtp)  # the same after STARTTLS
    raw.until(b"\r\n")
    raw.send(b"STARTTLS\r\n")
    raw.until(b"220 ")
    raw.send(noise)
    assert raw.closed_by_server(within=5)
    assert session.noop()[0] == "OK"  # the node and its other sessions carry on
    session.logout()
    failures = [e for e in untrusted.log_events() if e["event"] == "tls.handshake_failed"]
    assert sorted(e["protocol"] for e in failures) == ["imap", "pop3", "smtp"], failures


def client_hello() -> bytes:
    """The first flight of a real TLS client, to send only half of it."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ssl.create_default_context().wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_a_handshake_that_stalls_is_dropped_at_the_idle_timeout(tmp_path: Path, provisioned: Path) -> None:
    node = node_with(tmp_path, provisioned, UNTRUSTED + "[smtp]\ntimeout = 1\n[pop3]\ntimeout = 1\n"
                     "[imap]\nlogin_timeout = 1\n")
    try:
        hello = client_hello()
        stalled = []
        for port in (node.imaps, node.pop3s):
            raw = Raw(port)
            raw.send(hello[: len(hello) // 2])
            stalled.append(raw)
        raw = Raw(node.smtp)
        raw.until(b"\r\n")
        raw.send(b"STARTTLS\r\n")
        raw.until(b"220 ")
        raw.send(hello[:20])
        stalled.append(raw)
        for raw in stalled:
            assert raw.closed_by_server(within=5)
            raw.close()
        timeouts = sorted(e["protocol"] for e in node.log_events() if e["event"] == "tls.handshake_timeout")
        assert timeouts == ["imap", "pop3", "smtp"]
    finally:
        node.stop()


# -- policy -------------------------------------------------------------------------------------


def test_only_tls_1_2_and_1_3_are_spoken(untrusted: MailServer) -> None:
    for version in (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1):
        context = trusting(untrusted)
        context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        context.maximum_version = version
        context.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            imaplib.IMAP4_SSL("localhost", untrusted.imaps, ssl_context=context, timeout=10)
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        context = trusting(untrusted)
        context.minimum_version = context.maximum_version = version
        session = imaplib.IMAP4_SSL("localhost", untrusted.imaps, ssl_context=context, timeout=10)
        assert session.sock.version() == version.name.replace("_", ".")
        assert session.sock.compression() is None
        session.logout()


@pytest.mark.parametrize("protocol", ["smtp", "pop3", "imap"])
def test_openssl_s_client_starttls_and_old_versions_refused(untrusted: MailServer, protocol: str) -> None:
    port = getattr(untrusted, protocol)
    ok = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", protocol, "-brief"],
                        input="", capture_output=True, text=True, timeout=30)
    assert "Protocol version: TLSv1.3" in ok.stdout + ok.stderr, ok.stderr
    old = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-starttls", protocol,
                          "-tls1_1", "-cipher", "DEFAULT:@SECLEVEL=0"],
                         input="", capture_output=True, text=True, timeout=30)
    assert old.returncode != 0
    assert "alert protocol version" in old.stdout + old.stderr, old.stderr


def test_openssl_s_client_on_the_implicit_ports(untrusted: MailServer) -> None:
    for port, greeting, logout in ((untrusted.imaps, "* OK", "a LOGOUT\r\n"), (untrusted.pop3s, "+OK", "QUIT\r\n")):
        session = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-quiet",
                                  "-verify_return_error", "-CAfile", str(untrusted.data / "tls" / "self-signed.pem"),
                                  "-verify_hostname", "localhost"],
                                 input=logout, capture_output=True, text=True, timeout=30)
        assert session.stdout.startswith(greeting), session.stdout + session.stderr
        for version in ("-tls1", "-tls1_1"):
            old = subprocess.run(["openssl", "s_client", "-connect", f"127.0.0.1:{port}", version,
                                  "-cipher", "DEFAULT:@SECLEVEL=0"],
                                 input="", capture_output=True, text=True, timeout=30)
            assert old.returncode != 0 and "alert protocol version" in old.stdout + old.stderr


def test_client_initiated_renegotiation_is_refused(untrusted: MailServer) -> None:
    context = SSL.Context(SSL.TLS_CLIENT_METHOD)
    context.set_max_proto_version(SSL.TLS1_2_VERSION)  # TLS 1.3 has no renegotiation at all
    sock = socket.create_connection(("127.0.0.1", untrusted.imaps), timeout=10)
    sock.settimeout(None)  # pyOpenSSL wants a blocking socket (pytest's timeout guards the test)
    connection = SSL.Connection(context, sock)
    connection.set_connect_state()
    connection.do_handshake()
    assert connection.get_protocol_version_name() == "TLSv1.2"
    assert connection.recv(1024).startswith(b"* OK")
    connection.renegotiate()
    with pytest.raises(SSL.Error):
        connection.do_handshake()
        connection.send(b"a NOOP\r\n")
        connection.recv(1024)
    sock.close()


def test_a_weak_tls_1_2_cipher_is_refused(untrusted: MailServer) -> None:
    context = trusting(untrusted)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("ECDHE-ECDSA-AES128-SHA:AES128-SHA")  # CBC with SHA-1: not Mozilla intermediate
    with pytest.raises(ssl.SSLError):
        imaplib.IMAP4_SSL("localhost", untrusted.imaps, ssl_context=context, timeout=10)


# -- certificates -------------------------------------------------------------------------------


def test_the_self_signed_certificate_is_kept_and_tls_show_prints_what_clients_see(
    tmp_path: Path, provisioned: Path
) -> None:
    node = node_with(tmp_path, provisioned, UNTRUSTED, name="first")
    try:
        session = imaplib.IMAP4_SSL("localhost", node.imaps, ssl_context=trusting(node), timeout=10)
        first = peer_fingerprint(session.sock)
        session.logout()
        warnings = [e for e in node.log_events() if e["event"] == "tls.warning"]
        assert len(warnings) == 1 and "self-signed" in str(warnings[0]["problem"]), warnings
    finally:
        node.stop()
    key = node.data / "tls" / "self-signed.key"
    assert oct(key.stat().st_mode & 0o777) == "0o600"
    shown = admin(node.data, "tls", "show")
    assert shown.returncode == 0, shown.stderr
    assert f"SHA-256      {first}" in shown.stdout and "localhost" in shown.stdout
    again = node_with(tmp_path, provisioned, UNTRUSTED, name="second")
    try:
        session = imaplib.IMAP4_SSL("localhost", again.imaps, ssl_context=trusting(again), timeout=10)
        assert peer_fingerprint(session.sock) == first  # a client that trusted it need not ask again
        session.logout()
    finally:
        again.stop()


def issued(tmp_path: Path, name: str, dns_names: tuple[str, ...]) -> tuple[Path, Path, Path]:
    """A certificate of the test CA for ``dns_names``: (certificate, key, CA file)."""
    files = ca_tool().server_files(tmp_path / "certs" / name, ["127.0.0.1"], dns_names,
                                   ca_dir=tmp_path / "ca", common_name=dns_names[0])
    return files.certificate, files.key, files.ca


def tls_config(certificate: Path, key: Path, *sni: tuple[Path, Path]) -> str:
    text = f'{UNTRUSTED}[tls]\ncertificate = "{certificate}"\nprivate_key = "{key}"\n'
    for extra_certificate, extra_key in sni:
        text += f'[[tls.sni]]\ncertificate = "{extra_certificate}"\nprivate_key = "{extra_key}"\n'
    return text


def test_sni_picks_the_certificate_for_the_name_asked_for(tmp_path: Path, provisioned: Path) -> None:
    first = issued(tmp_path, "first", ("mail.example.test", "localhost"))
    other = issued(tmp_path, "other", ("mail.other.test",))
    node = node_with(tmp_path, provisioned, tls_config(first[0], first[1], (other[0], other[1])))
    try:
        context = ssl.create_default_context(cafile=str(first[2]))
        seen = {}
        for name in ("mail.example.test", "mail.other.test", "localhost"):
            with socket.create_connection(("127.0.0.1", node.imaps), timeout=10) as sock:
                with context.wrap_socket(sock, server_hostname=name) as tls:  # verifies the name too
                    seen[name] = tls.getpeercert()["subject"]
        assert seen["mail.other.test"] == ((("commonName", "mail.other.test"),),)
        assert seen["mail.example.test"] == seen["localhost"] == ((("commonName", "mail.example.test"),),)
        no_sni = ssl.create_default_context(cafile=str(first[2]))
        no_sni.check_hostname = False
        with socket.create_connection(("127.0.0.1", node.imaps), timeout=10) as sock:
            with no_sni.wrap_socket(sock) as tls:  # no server name at all: the default (first) one
                assert tls.getpeercert()["subject"] == ((("commonName", "mail.example.test"),),)
    finally:
        node.stop()


def test_sighup_reloads_the_certificates_and_open_connections_carry_on(tmp_path: Path, provisioned: Path) -> None:
    live = tmp_path / "live"
    live.mkdir()
    certificate, key = live / "fullchain.pem", live / "privkey.pem"
    old = issued(tmp_path, "old", ("localhost",))
    new = issued(tmp_path, "new", ("localhost",))
    for source, target in ((old[0], certificate), (old[1], key)):
        target.write_bytes(source.read_bytes())
    key.chmod(0o600)
    node = node_with(tmp_path, provisioned, tls_config(certificate, key))
    assert node.process is not None
    context = ssl.create_default_context(cafile=str(old[2]))
    try:
        before = imaplib.IMAP4_SSL("localhost", node.imaps, ssl_context=context, timeout=10)
        before.login(ALICE, PASSWORD)
        old_fingerprint = peer_fingerprint(before.sock)
        for source, target in ((new[0], certificate), (new[1], key)):  # what certbot's renewal does
            target.write_bytes(source.read_bytes())
        node.process.send_signal(signal.SIGHUP)
        wait_for_event(node, "tls.reloaded")
        assert before.select("INBOX")[0] == "OK"  # opened before the reload: still served
        after = imaplib.IMAP4_SSL("localhost", node.imaps, ssl_context=context, timeout=10)
        new_fingerprint = peer_fingerprint(after.sock)
        assert new_fingerprint != old_fingerprint
        after.logout()

        certificate.write_text("not a certificate\n")  # a reload that fails keeps what was in use
        node.process.send_signal(signal.SIGHUP)
        failed = wait_for_event(node, "tls.reload_failed")
        assert str(certificate) in str(failed["problem"])
        kept = imaplib.IMAP4_SSL("localhost", node.imaps, ssl_context=context, timeout=10)
        assert peer_fingerprint(kept.sock) == new_fingerprint
        kept.logout()
        before.logout()
    finally:
        node.stop()


def refused_start(tmp_path: Path, provisioned: Path, config: str) -> list[str]:
    toml = tmp_path / "refused.toml"
    toml.write_text(config)
    result = subprocess.run(
        [str(BIN / "twistd"), "-n", "--pidfile=", "mailcluster", "--data", str(provisioned),
         "--smtp", f"tcp:{free_port()}:interface=127.0.0.1", "--config", str(toml)],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    return result.stderr.strip().splitlines()


def test_unusable_certificate_files_stop_start_up_with_one_line(tmp_path: Path, provisioned: Path) -> None:
    first = issued(tmp_path, "first", ("localhost",))
    other = issued(tmp_path, "other", ("localhost",))
    assert refused_start(tmp_path, provisioned, tls_config(first[0], other[1])) == [
        f"twistd mailcluster: tls.private_key: {other[1]} is not the key of the certificate {first[0]}"
    ]
    missing = tmp_path / "missing.pem"
    (line,) = refused_start(tmp_path, provisioned, tls_config(missing, first[1]))
    assert line == f"twistd mailcluster: tls.certificate: cannot read {missing}: No such file or directory"
    (line,) = refused_start(tmp_path, provisioned, tls_config(first[0], first[0]))
    assert line == f"twistd mailcluster: tls.private_key: {first[0]} holds no PEM private key"


def test_a_private_key_other_users_can_read_is_a_warning(tmp_path: Path, provisioned: Path) -> None:
    certificate, key, ca = issued(tmp_path, "open", ("localhost",))
    key.chmod(0o644)
    node = node_with(tmp_path, provisioned, tls_config(certificate, key))
    try:
        warning = wait_for_event(node, "tls.warning")
        assert str(key) in str(warning["problem"]) and "0644" in str(warning["problem"])
        context = ssl.create_default_context(cafile=str(ca))
        imaplib.IMAP4_SSL("localhost", node.imaps, ssl_context=context, timeout=10).logout()  # and it serves
    finally:
        node.stop()
