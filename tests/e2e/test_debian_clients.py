"""Interoperability with Debian's mail clients against a real `twistd mailcluster`.

mbsync (isync) is the strict one: it checks UIDVALIDITY, relies on UIDPLUS
(APPENDUID), syncs flags both ways and uploads with APPEND.  fetchmail is the
classic POP3 client: UIDL, RETR, DELE and QUIT.
"""

from __future__ import annotations

import imaplib
import os
import poplib
import shutil
import smtplib
import subprocess
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.helpers.mailserver import DOMAIN, PASSWORD, MailServer

ALICE = f"alice@{DOMAIN}"


def deliver(server: MailServer, subject: str, body: str = "Sent over SMTP.\n") -> None:
    msg = EmailMessage()
    msg["From"] = "sender@remote.test"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", server.smtp, timeout=30) as smtp:
        smtp.send_message(msg, from_addr="sender@remote.test", to_addrs=[ALICE])


def require(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is not installed: tools/install-test-deps installs it")
    return path


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def mbsync_config(server: MailServer, maildir: Path, ssl_type: str = "None", certificate: Path | None = None) -> str:
    """A complete mbsyncrc; ``ssl_type`` STARTTLS or IMAPS with the server's ``certificate`` to trust."""
    port = server.imaps if ssl_type == "IMAPS" else server.imap
    tls = f"CertificateFile {certificate}\n" if certificate is not None else ""
    return f"""
IMAPAccount test
Host {"localhost" if certificate is not None else "127.0.0.1"}
Port {port}
User {ALICE}
Pass "{PASSWORD}"
SSLType {ssl_type}
{tls}AuthMechs LOGIN PLAIN

IMAPStore remote
Account test

MaildirStore local
Path {maildir}/
Inbox {maildir}/INBOX
SubFolders Verbatim

Channel mail
Far :remote:
Near :local:
Patterns *
Create Near
Sync All
Expunge Both
SyncState *
"""


def maildir_messages(folder: Path) -> list[Path]:
    return sorted([*(folder / "cur").glob("*"), *(folder / "new").glob("*")])


def test_mbsync_syncs_both_ways(server: MailServer, isolated_home: dict[str, str], tmp_path: Path) -> None:
    mbsync = require("mbsync")
    deliver(server, "for mbsync one")
    deliver(server, "for mbsync two")
    maildir = tmp_path / "Maildir"
    maildir.mkdir()
    config = tmp_path / "mbsyncrc"
    config.write_text(mbsync_config(server, maildir))
    first = run([mbsync, "-c", str(config), "-V", "mail"], isolated_home, tmp_path)
    assert first.returncode == 0, first.stdout + first.stderr
    pulled = maildir_messages(maildir / "INBOX")
    assert len(pulled) == 2
    subjects = sorted(p.read_bytes().split(b"Subject: ")[1].split(b"\n")[0].strip() for p in pulled)
    assert subjects == [b"for mbsync one", b"for mbsync two"]
    for folder in ("Sent", "Drafts", "Trash", "Junk"):
        assert (maildir / folder).is_dir()

    # Locally: mark the first message seen (maildir flag S), write a draft to upload.
    seen_file = pulled[0]
    target = maildir / "INBOX" / "cur" / (seen_file.name.split(":2,")[0] + ":2,S")
    seen_file.rename(target)
    draft = maildir / "Drafts" / "new" / "1700000000.draft.localhost"
    draft.write_bytes(b"From: alice@example.test\nSubject: uploaded draft\n\nwritten offline\n")
    second = run([mbsync, "-c", str(config), "-V", "mail"], isolated_home, tmp_path)
    assert second.returncode == 0, second.stdout + second.stderr

    imap = imaplib.IMAP4("127.0.0.1", server.imap, timeout=30)
    imap.login(ALICE, PASSWORD)
    imap.select("INBOX", readonly=True)
    _, seen = imap.search(None, "SEEN")
    assert len(seen[0].split()) == 1
    imap.select("Drafts", readonly=True)
    _, data = imap.fetch("1:*", "(FLAGS BODY.PEEK[HEADER.FIELDS (SUBJECT)])")
    imap.logout()
    assert b"Subject: uploaded draft" in data[0][1]

    # A third run with nothing new changes nothing and reports no error.
    third = run([mbsync, "-c", str(config), "-V", "mail"], isolated_home, tmp_path)
    assert third.returncode == 0, third.stdout + third.stderr
    assert len(maildir_messages(maildir / "INBOX")) == 2


def fetchmailrc(server: MailServer, outdir: Path, keep: bool) -> str:
    keep_option = "keep" if keep else "nokeep"
    return f"""set no bouncemail
set no syslog
poll 127.0.0.1 service {server.pop3} protocol POP3 auth password timeout 30
  user "{ALICE}" there with password "{PASSWORD}" is "root" here {keep_option} fetchall no rewrite sslproto ''
  mda "/bin/sh -c 'cat > {outdir}/msg.$$'"
"""


def test_fetchmail_retrieves_then_deletes(server: MailServer, isolated_home: dict[str, str], tmp_path: Path) -> None:
    fetchmail = require("fetchmail")
    deliver(server, "for fetchmail one", "first body\n.leading dot line\n")
    deliver(server, "for fetchmail two")
    outdir = tmp_path / "out"
    outdir.mkdir()
    rc = tmp_path / "fetchmailrc"
    rc.write_text(fetchmailrc(server, outdir, keep=True))
    os.chmod(rc, 0o600)
    kept = run([fetchmail, "-f", str(rc), "--nodetach", "-v"], isolated_home, tmp_path)
    assert kept.returncode == 0, kept.stdout + kept.stderr
    bodies = [p.read_bytes() for p in sorted(outdir.iterdir())]
    assert len(bodies) == 2
    assert any(b"\n.leading dot line\n" in b for b in bodies)  # dot-stuffing undone exactly

    for p in outdir.iterdir():
        p.unlink()
    rc.write_text(fetchmailrc(server, outdir, keep=False))
    os.chmod(rc, 0o600)
    flushed = run([fetchmail, "-f", str(rc), "--nodetach", "-v"], isolated_home, tmp_path)
    assert flushed.returncode == 0, flushed.stdout + flushed.stderr
    assert len(list(outdir.iterdir())) == 2

    pop = poplib.POP3("127.0.0.1", server.pop3, timeout=30)
    pop.user(ALICE)
    pop.pass_(PASSWORD)
    assert pop.stat() == (0, 0)
    pop.quit()
