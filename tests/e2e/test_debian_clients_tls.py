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
import pwd
import shutil
import ssl
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from .conftest import DOMAIN, PASSWORD, MailServer
from .test_debian_clients import deliver, maildir_messages, require, run
from .test_mutt import Tmux, deliver as deliver_to_mutt
from .test_tls import UNTRUSTED, node_with

ALICE = f"alice@{DOMAIN}"


@pytest.fixture
def node(tmp_path: Path, provisioned: Path) -> Iterator[MailServer]:
    server = node_with(tmp_path, provisioned, UNTRUSTED)
    try:
        yield server
    finally:
        if server.process is not None:
            server.stop()


def certificate(node: MailServer) -> Path:
    return node.data / "tls" / "self-signed.pem"


def pop3_count(node: MailServer) -> int:
    pop = poplib.POP3_SSL("localhost", node.pop3s, context=ssl.create_default_context(cafile=str(certificate(node))),
                          timeout=30)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    count = pop.stat()[0]
    pop.quit()
    return count


def test_swaks_starttls_with_auth(node: MailServer, isolated_home: dict[str, str], tmp_path: Path) -> None:
    swaks = require("swaks")
    result = run([swaks, "--server", "127.0.0.1", "--port", str(node.smtp), "--helo", "client.test",
                  "--tls", "--tls-verify", "--tls-ca-path", str(certificate(node)), "--tls-sni", "localhost",
                  "--auth", "PLAIN", "--auth-user", ALICE, "--auth-password", PASSWORD,
                  "--from", ALICE, "--to", ALICE, "--h-Subject", "swaks over tls", "--body", "hello"],
                 isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "TLS started" in result.stdout and "235 2.7.0" in result.stdout, result.stdout
    assert pop3_count(node) == 1


def mbsync_config(node: MailServer, maildir: Path, ssl_type: str, port: int) -> str:
    return f"""
IMAPAccount test
Host localhost
Port {port}
User {ALICE}
Pass "{PASSWORD}"
SSLType {ssl_type}
CertificateFile {certificate(node)}
AuthMechs PLAIN

IMAPStore remote
Account test

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel mail
Far :remote:
Near :local:
Patterns INBOX
Create Near
Sync Pull
SyncState *
"""


@pytest.mark.parametrize("ssl_type", ["STARTTLS", "IMAPS"])
def test_mbsync_over_starttls_and_imaps(
    node: MailServer, isolated_home: dict[str, str], tmp_path: Path, ssl_type: str
) -> None:
    mbsync = require("mbsync")
    deliver(node, f"for mbsync over {ssl_type}")
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(node, maildir, ssl_type, node.imap if ssl_type == "STARTTLS" else node.imaps))
    result = run([mbsync, "-c", str(config), "-V", "mail"], isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (pulled,) = maildir_messages(maildir / "INBOX")
    assert f"Subject: for mbsync over {ssl_type}".encode() in pulled.read_bytes()


@pytest.mark.parametrize("implicit", [False, True], ids=["stls", "pop3s"])
def test_fetchmail_over_stls_and_pop3s(
    node: MailServer, isolated_home: dict[str, str], tmp_path: Path, implicit: bool
) -> None:
    fetchmail = require("fetchmail")
    deliver(node, "for fetchmail over tls")
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    port = node.pop3s if implicit else node.pop3
    # Without "ssl", "sslproto TLS1.2+" makes fetchmail use STLS and insist on it.
    tls = "ssl" if implicit else "sslproto TLS1.2+"
    rc.write_text(f"""set no bouncemail
set no syslog
poll localhost service {port} protocol POP3 auth password timeout 30
  user "{ALICE}" there with password "{PASSWORD}" is "root" here keep fetchall no rewrite
  {tls} sslcertck sslcertfile "{certificate(node)}"
  mda "/bin/sh -c 'cat > {outdir}/msg.$$'"
""")
    os.chmod(rc, 0o600)
    result = run([fetchmail, "-f", str(rc), "--nodetach", "-v"], isolated_home, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    (message,) = outdir.iterdir()
    assert b"Subject: for fetchmail over tls" in message.read_bytes()
    assert "TLS" in result.stdout + result.stderr  # fetchmail says which connection it made


def test_getmail_simple_pop3_ssl_retriever(node: MailServer, tmp_path: Path) -> None:
    getmail = require("getmail")
    deliver(node, "for getmail over pop3s")
    # getmail refuses to deliver as root: as root it delivers as "nobody", who
    # must reach the maildir (pytest's tmp_path is 0700).
    as_root = os.geteuid() == 0
    base = Path(tempfile.mkdtemp(prefix="getmail-tls-"))
    try:
        base.chmod(0o755)
        state = base / "state"
        state.mkdir()
        maildir = base / "Maildir"
        for sub in ("cur", "new", "tmp"):
            (maildir / sub).mkdir(parents=True)
        if as_root:
            nobody = pwd.getpwnam("nobody")
            for folder in (maildir, maildir / "cur", maildir / "new", maildir / "tmp"):
                os.chown(folder, nobody.pw_uid, nobody.pw_gid)
        rc = state / "getmailrc"
        rc.write_text(
            "[retriever]\ntype = SimplePOP3SSLRetriever\nserver = 127.0.0.1\n"
            f"port = {node.pop3s}\nusername = {ALICE}\npassword = {PASSWORD}\n"
            f"ca_certs = {certificate(node)}\nssl_cert_hostname = localhost\n"
            f"[destination]\ntype = Maildir\npath = {maildir}/\n" + ("user = nobody\n" if as_root else "")
            + "[options]\nread_all = true\ndelete = false\nverbose = 2\n"
        )
        rc.chmod(stat.S_IRUSR | stat.S_IWUSR)
        result = run([getmail, f"--getmaildir={state}", f"--rcfile={rc}"], dict(os.environ), base)
        assert result.returncode == 0, result.stdout + result.stderr
        (message,) = (maildir / "new").iterdir()
        assert b"Subject: for getmail over pop3s" in message.read_bytes()
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_mutt_reads_over_imaps(node: MailServer, isolated_home: dict[str, str]) -> None:
    mutt = require("mutt")
    deliver_to_mutt(node, "Over IMAPS", "Read over implicit TLS.\n")
    home = Path(isolated_home["HOME"])
    config = home / "muttrc"
    config.write_text(
        f"""set imap_user="{ALICE}"
set imap_pass="{PASSWORD}"
set folder="imaps://localhost:{node.imaps}/"
set spoolfile="+INBOX"
set certificate_file="{certificate(node)}"
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
        tmux.start([mutt, "-n", "-F", str(config), "-f", f"imaps://localhost:{node.imaps}/INBOX"])
        tmux.wait_for("Over IMAPS")
        tmux.keys("Enter")  # open it in the pager
        tmux.wait_for("Read over implicit TLS.")
        tmux.keys("q")  # back to the index
        tmux.wait_for("Over IMAPS")
        tmux.keys("q")  # quit mutt
        deadline = time.monotonic() + 30
        while tmux.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not tmux.alive(), tmux.screen()
    finally:
        tmux.kill()
    logins = [e for e in node.log_events() if e["event"] == "login.success" and e.get("protocol") == "imap"]
    assert logins and all(str(e.get("tls", "")).startswith("TLSv1.") for e in logins)
