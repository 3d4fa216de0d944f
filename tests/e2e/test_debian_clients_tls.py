"""Debian's mail clients over TLS, each verifying the node's certificate, as users set them up.

The node does not trust loopback (``auth.trusted_networks = []``), so every
login here works only because the client really negotiated TLS: STARTTLS or
STLS on the plain ports, or implicit TLS on IMAPS/POP3S.  Each client is
given the node's self-signed certificate as the one to trust, as a user who
compared its fingerprint (``mailcluster-admin tls show``) would.
"""

from __future__ import annotations

import os
import poplib
import ssl
import stat
from pathlib import Path

import pytest

from tests.helpers.getmail import getmail_folders

from tests.helpers.mailserver import DOMAIN, PASSWORD, MailServer
from .test_debian_clients import deliver, maildir_messages, mbsync_config, require, run
from .test_mutt import Tmux, deliver as deliver_to_mutt

ALICE = f"alice@{DOMAIN}"


def certificate(untrusted: MailServer) -> Path:
    return untrusted.data / "tls" / "self-signed.pem"


def pop3_count(untrusted: MailServer) -> int:
    context = ssl.create_default_context(cafile=str(certificate(untrusted)))
    pop = poplib.POP3_SSL("localhost", untrusted.pop3s, context=context, timeout=30)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    count = pop.stat()[0]
    pop.quit()
    return count


def test_swaks_starttls_with_auth(untrusted: MailServer, isolated_home: dict[str, str], tmp_path: Path) -> None:
    swaks = require("swaks")
    result = run([swaks, "--server", "127.0.0.1", "--port", str(untrusted.smtp), "--helo", "client.test",
                  "--tls", "--tls-verify", "--tls-ca-path", str(certificate(untrusted)), "--tls-sni", "localhost",
                  "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
                  "--from", ALICE, "--to", ALICE, "--h-Subject", "swaks over tls", "--body", "hello"],
                 isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout and "235 2.7.0" in result.stdout, result.stdout
    assert pop3_count(untrusted) == 1


@pytest.mark.parametrize("ssl_type", ["STARTTLS", "IMAPS"])
def test_mbsync_over_starttls_and_imaps(
    untrusted: MailServer, isolated_home: dict[str, str], tmp_path: Path, ssl_type: str
) -> None:
    mbsync = require("mbsync")
    deliver(untrusted, f"for mbsync over {ssl_type}")
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(untrusted, maildir, ssl_type, certificate(untrusted)))
    result = run([mbsync, "-c", str(config), "-V", "mail"], isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (pulled,) = maildir_messages(maildir / "INBOX")
    assert f"Subject: for mbsync over {ssl_type}".encode() in pulled.read_bytes()


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_over_stls_and_pop3s(
    untrusted: MailServer, isolated_home: dict[str, str], tmp_path: Path, implicit: bool
) -> None:
    fetchmail = require("fetchmail")
    deliver(untrusted, "for fetchmail over tls")
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    port = untrusted.pop3s if implicit else untrusted.pop3
    # Without "ssl", "sslproto TLS1.2+" makes fetchmail use STLS and insist on it.
    tls = "ssl" if implicit else "sslproto TLS1.2+"
    rc.write_text(f"""set no bouncemail
set no syslog
poll localhost service {port} protocol POP3 auth password timeout 30
  user "{ALICE}" there with password "{PASSWORD}" is "root" here keep fetchall no rewrite
  {tls} sslcertck sslcertfile "{certificate(untrusted)}"
  mda "/bin/sh -c 'cat > {outdir}/msg.$$'"
""")
    os.chmod(rc, 0o600)
    result = run([fetchmail, "-f", str(rc), "--nodetach", "-v"], isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = outdir.iterdir()
    assert b"Subject: for fetchmail over tls" in message.read_bytes()
    assert "TLS" in result.stdout + result.stderr  # fetchmail says which connection it made


def test_getmail_simple_pop3_ssl_retriever(untrusted: MailServer, tmp_path: Path) -> None:
    getmail = require("getmail")
    deliver(untrusted, "for getmail over pop3s")
    with getmail_folders() as folders:
        rc = folders.state / "getmailrc"
        rc.write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f"port = {untrusted.pop3s}\nusername = {ALICE}\npassword = {PASSWORD}\n"
            f"ca_certs = {certificate(untrusted)}\nssl_cert_hostname = localhost\n"
            f"[destination]\ntype = Maildir\npath = {folders.maildir}/\n{folders.user_line}"
            "[options]\nread_all = true\ndelete = false\nverbose = 2\n"
        )
        rc.chmod(stat.S_IRUSR | stat.S_IWUSR)
        result = run([getmail, f"--getmaildir={folders.state}", f"--rcfile={rc}"], dict(os.environ), folders.base)
        assert result.returncode == 0, result.stdout + result.stderr
        (message,) = (folders.maildir / "new").iterdir()
        assert b"Subject: for getmail over pop3s" in message.read_bytes()


def test_mutt_reads_over_imaps(untrusted: MailServer, isolated_home: dict[str, str]) -> None:
    mutt = require("mutt")
    deliver_to_mutt(untrusted, "Over IMAPS", "Read over implicit TLS.\n")
    home = Path(isolated_home["HOME"])
    config = home / "muttrc"
    config.write_text(
        f"""set imap_user="{ALICE}"
set imap_pass="{PASSWORD}"
set folder="imaps://localhost:{untrusted.imaps}/"
set spoolfile="+INBOX"
set certificate_file="{certificate(untrusted)}"
set ssl_force_tls=yes
set header_cache=""
set message_cachedir=""
set move=no
set wait_key=no
set index_format="%4C %Z %-20.20n %s"
"""
    )
    env = dict(isolated_home, TERM="xterm-256color", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    tmux = Tmux(env)
    try:
        tmux.start([mutt, "-n", "-F", str(config), "-f", f"imaps://localhost:{untrusted.imaps}/INBOX"])
        tmux.wait_for("Over IMAPS")
        tmux.keys("Enter")  # open it in the pager
        tmux.wait_for("Read over implicit TLS.")
        tmux.quit_mutt("Over IMAPS")
    finally:
        tmux.kill()
    logins = [e for e in untrusted.log_events() if e["event"] == "login.success" and e.get("protocol") == "imap"]
    assert logins and all(str(e.get("tls", "")).startswith("TLSv1.") for e in logins)
