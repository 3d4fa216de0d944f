"""mutt, as a person uses it, against a real ``twistd mailcluster``: under tmux, reading the screen.

mutt is run in a detached tmux session on a private tmux socket; the test
types keys with ``send-keys`` and reads what a person would see with
``capture-pane``.  Every wait is for a specific text on the screen, with a
deadline, so a failure shows the last screen instead of hanging.
"""

from __future__ import annotations

import imaplib
import shutil
import smtplib
import subprocess
import tempfile
import time
from collections.abc import Iterator
from email.message import EmailMessage
from pathlib import Path

import pytest

from tests.helpers.mailserver import DOMAIN, PASSWORD, MailServer

ALICE = f"alice@{DOMAIN}"


def deliver(server: MailServer, subject: str, body: str) -> None:
    msg = EmailMessage()
    msg["From"] = "Sender <sender@remote.test>"
    msg["To"] = ALICE
    msg["Subject"] = subject
    msg.set_content(body)
    with smtplib.SMTP("127.0.0.1", server.smtp, timeout=30) as smtp:
        smtp.send_message(msg, from_addr="sender@remote.test", to_addrs=[ALICE])


class Tmux:
    """One private tmux server on its own socket, so nobody else's sessions are touched.

    The socket lives in a short temporary folder (a Unix socket path must fit
    in 108 bytes, which pytest's tmp_path may not) removed afterwards.
    """

    def __init__(self, env: dict[str, str]) -> None:
        tmux = shutil.which("tmux")
        if tmux is None:
            pytest.fail("tmux is not installed: tools/install-test-deps installs it")
        self.tmux = tmux
        self.folder = Path(tempfile.mkdtemp(prefix="mc-tmux-"))
        self.socket = str(self.folder / "socket")
        self.env = env

    def run(self, *args: str) -> str:
        result = subprocess.run(
            [self.tmux, "-S", self.socket, "-f", "/dev/null", *args],
            env=self.env, capture_output=True, text=True, timeout=30,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def start(self, command: list[str]) -> None:
        self.run("new-session", "-d", "-s", "mutt", "-x", "160", "-y", "40", *command)

    def keys(self, *keys: str) -> None:
        self.run("send-keys", "-t", "mutt", *keys)

    def screen(self) -> str:
        return self.run("capture-pane", "-p", "-t", "mutt")

    def wait_for(self, text: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        screen = ""
        while time.monotonic() < deadline:
            screen = self.screen()
            if text in screen:
                return screen
            time.sleep(0.1)
        raise AssertionError(f"{text!r} never appeared; last screen:\n{screen}")

    def quit_mutt(self, index_text: str) -> None:
        """From mutt's pager: back to the index (showing ``index_text``), quit, and wait until it is gone."""
        self.keys("q")
        self.wait_for(index_text)
        self.keys("q")
        deadline = time.monotonic() + 30
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not self.alive(), self.screen()

    def alive(self) -> bool:
        return subprocess.run(
            [self.tmux, "-S", self.socket, "has-session", "-t", "mutt"],
            env=self.env, capture_output=True, timeout=30,
        ).returncode == 0

    def kill(self) -> None:
        subprocess.run([self.tmux, "-S", self.socket, "kill-server"], env=self.env, capture_output=True, timeout=30)
        shutil.rmtree(self.folder, ignore_errors=True)


@pytest.fixture
def tmux(isolated_home: dict[str, str]) -> Iterator[Tmux]:
    env = dict(isolated_home, TERM="xterm-256color", LANG="C.UTF-8", LC_ALL="C.UTF-8")
    session = Tmux(env)
    try:
        yield session
    finally:
        session.kill()


def muttrc(server: MailServer, home: Path) -> Path:
    path = home / "muttrc"
    path.write_text(
        f"""set imap_user="{ALICE}"
set imap_pass="{PASSWORD}"
set folder="imap://127.0.0.1:{server.imap}/"
set spoolfile="+INBOX"
set ssl_starttls=no
set ssl_force_tls=no
set header_cache=""
set message_cachedir=""
set move=no
set mark_old=no
set beep=no
set wait_key=no
set pager_stop=yes
set sort=date
set index_format="%4C %Z %-20.20n %s"
"""
    )
    return path


def test_mutt_shows_the_subject_of_a_delivered_message_and_reads_it(
    server: MailServer, tmux: Tmux, isolated_home: dict[str, str]
) -> None:
    mutt = shutil.which("mutt")
    if mutt is None:
        pytest.fail("mutt is not installed: tools/install-test-deps installs it")
    deliver(server, "Lunch on Thursday?", "Shall we try the new place by the river?\n")
    config = muttrc(server, Path(isolated_home["HOME"]))
    tmux.start([mutt, "-n", "-F", str(config), "-f", f"imap://127.0.0.1:{server.imap}/INBOX"])

    index = tmux.wait_for("Lunch on Thursday?")
    row = next(line for line in index.splitlines() if "Lunch on Thursday?" in line)
    assert row.split()[:3] == ["1", "N", "Sender"], row  # message 1, new, from "Sender"

    tmux.keys("Enter")  # open it in the pager
    tmux.wait_for("Shall we try the new place by the river?")
    tmux.quit_mutt("Lunch on Thursday?")

    # Reading it in mutt set \Seen on the server.
    imap = imaplib.IMAP4("127.0.0.1", server.imap, timeout=30)
    imap.login(ALICE, PASSWORD)
    imap.select("INBOX", readonly=True)
    _, data = imap.fetch("1", "(FLAGS)")
    imap.logout()
    assert data == [b"1 (FLAGS (\\Seen))"]
